"""Geodesy: great-circle distances and distance-accuracy metrics."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

EARTH_RADIUS_KM = 6371.0088  # IUGG mean Earth radius
DEFAULT_THRESHOLDS_KM = (1, 5, 10, 25)


def haversine_km(lat1, lon1, lat2, lon2) -> np.ndarray:
    """Great-circle distance in km; inputs broadcast (many-to-one, pairwise, ...)."""
    lat1, lon1, lat2, lon2 = (np.radians(np.asarray(v, dtype=float)) for v in (lat1, lon1, lat2, lon2))
    a = np.sin((lat2 - lat1) / 2) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def nearest_km(query_lat, query_lon, ref_lat, ref_lon) -> tuple[np.ndarray, np.ndarray]:
    """For each query point, the distance (km) to and index of its nearest reference point.

    Uses a BallTree with the haversine metric: O((n + m) log m), never an n x m matrix.
    """
    ref = np.radians(np.column_stack([np.asarray(ref_lat, float), np.asarray(ref_lon, float)]))
    query = np.radians(np.column_stack([np.asarray(query_lat, float), np.asarray(query_lon, float)]))
    if len(ref) == 0:
        raise ValueError("nearest_km needs at least one reference point")
    if len(query) == 0:
        return np.empty(0), np.empty(0, dtype=int)
    from sklearn.neighbors import BallTree  # here: scikit-learn takes seconds to import (`lageo train` needs none)

    dist, idx = BallTree(ref, metric="haversine").query(query, k=1)
    return dist[:, 0] * EARTH_RADIUS_KM, idx[:, 0]


def acc_at_km(errors_km, thresholds: Iterable[float] = DEFAULT_THRESHOLDS_KM) -> dict[str, float]:
    """Share of predictions whose error is at most each threshold, keyed by the threshold as text."""
    errors = np.asarray(errors_km, dtype=float)
    if errors.size == 0:
        return {_key(t): float("nan") for t in thresholds}
    return {_key(t): float(np.mean(errors <= t)) for t in thresholds}


def _key(threshold: float) -> str:
    return f"{threshold:g}"
