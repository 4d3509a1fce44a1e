"""lageo: sub-city image geolocation in Los Angeles County with CLIP."""

__version__ = "0.1.0"
