"""Data collection: capture points, the Street View and Mapillary downloaders, and your own photos.

Every path writes a folder with ``images/`` and a canonical ``manifest.csv`` (``image_path``
relative to the folder) that ``lageo_utils.data.read_manifest`` and ``lageo run --profile la`` read.
"""

from lageo_utils.collect.byo import import_images, read_exif_gps
from lageo_utils.collect.http import AuthError, CollectError, RetryPolicy
from lageo_utils.collect.mapillary import collect_mapillary
from lageo_utils.collect.points import sample_points, thin_points
from lageo_utils.collect.streetview import StreetViewOptions, collect_streetview

__all__ = [
    "AuthError",
    "CollectError",
    "RetryPolicy",
    "StreetViewOptions",
    "collect_mapillary",
    "collect_streetview",
    "import_images",
    "read_exif_gps",
    "sample_points",
    "thin_points",
]
