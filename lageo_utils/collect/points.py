"""Capture points inside region boxes: a regular grid or a seeded random sample, a minimum distance apart."""

from __future__ import annotations

import math

import geopandas as gpd
import numpy as np
import pandas as pd

from lageo_utils.geo import haversine_km

POINT_COLUMNS = ["point_id", "region_id", "latitude", "longitude"]
METHODS = ("grid", "random")
RANDOM_TRIES_PER_POINT = 50  # candidates drawn per wanted point before giving up on a crowded box


def sample_points(
    regions: gpd.GeoDataFrame,
    per_region: int,
    method: str = "grid",
    min_distance_m: float = 10.0,
    seed: int = 0,
) -> pd.DataFrame:
    """``per_region`` points inside each region box, pairwise at least ``min_distance_m`` apart.

    ``grid`` spreads points over a near-square grid of cell centres (deterministic; when the grid has
    more cells than points, evenly spaced cells are kept); ``random`` draws uniformly in the box with
    ``seed``. Returns ``point_id, region_id, latitude, longitude`` in region order. A box too small
    for that many points at that distance raises ``ValueError`` naming the region.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    if per_region < 1:
        raise ValueError(f"per_region must be at least 1, not {per_region}")
    if min_distance_m < 0:
        raise ValueError(f"min_distance_m must be >= 0, not {min_distance_m}")
    frames = []
    bounds = regions.geometry.bounds
    for index, (rid, b) in enumerate(zip(regions["id"], bounds.itertuples(), strict=True)):
        box = (b.miny, b.minx, b.maxy, b.maxx)  # south, west, north, east
        if method == "grid":
            lat, lon = _grid(box, per_region, min_distance_m, rid)
        else:
            lat, lon = _random(box, per_region, min_distance_m, np.random.default_rng([seed, index]), rid)
        frames.append(pd.DataFrame({
            "point_id": [f"{rid}_{i:05d}" for i in range(len(lat))],
            "region_id": rid,
            "latitude": lat,
            "longitude": lon,
        }))
    return pd.concat(frames, ignore_index=True)[POINT_COLUMNS]


def thin_points(lat, lon, n: int, min_distance_m: float, taken_lat=(), taken_lon=()) -> np.ndarray:
    """Indices of up to ``n`` points, taken in the given order, each ``min_distance_m`` from all kept ones.

    Points already ``taken`` count as kept. Greedy in order: shuffle first for a random sample.
    """
    lat = np.asarray(lat, dtype=float)
    lon = np.asarray(lon, dtype=float)
    kept_lat = list(np.asarray(taken_lat, dtype=float))
    kept_lon = list(np.asarray(taken_lon, dtype=float))
    chosen: list[int] = []
    for i in range(len(lat)):
        if len(chosen) >= n:
            break
        if kept_lat and haversine_km(lat[i], lon[i], kept_lat, kept_lon).min() * 1000 < min_distance_m:
            continue
        chosen.append(i)
        kept_lat.append(lat[i])
        kept_lon.append(lon[i])
    return np.asarray(chosen, dtype=int)


def _grid(box, n: int, min_distance_m: float, rid: str) -> tuple[np.ndarray, np.ndarray]:
    south, west, north, east = box
    mid = (south + north) / 2
    width_m = float(haversine_km(mid, west, mid, east)) * 1000
    height_m = float(haversine_km(south, west, north, west)) * 1000
    cols = max(1, round(math.sqrt(n * width_m / height_m)))
    rows = math.ceil(n / cols)
    lat_centres = south + (np.arange(rows) + 0.5) * (north - south) / rows
    lon_centres = west + (np.arange(cols) + 0.5) * (east - west) / cols
    # Neighbours are closest along a row at the row nearest the pole (meridians converge).
    edge_lat = lat_centres[np.argmax(np.abs(lat_centres))]
    spacing_m = 1000 * min(
        float(haversine_km(edge_lat, west, edge_lat, west + (east - west) / cols)) if cols > 1 else math.inf,
        float(haversine_km(south, west, south + (north - south) / rows, west)) if rows > 1 else math.inf,
    )
    if spacing_m < min_distance_m:
        raise ValueError(
            f"region {rid!r}: a grid of {n} points is {spacing_m:.1f} m apart, closer than min_distance_m="
            f"{min_distance_m:g}; ask for fewer points"
        )
    grid_lat, grid_lon = (a.ravel() for a in np.meshgrid(lat_centres, lon_centres, indexing="ij"))
    keep = np.unique(np.linspace(0, len(grid_lat) - 1, n).round().astype(int))
    return grid_lat[keep], grid_lon[keep]


def _random(box, n: int, min_distance_m: float, rng: np.random.Generator, rid: str) -> tuple[np.ndarray, np.ndarray]:
    south, west, north, east = box
    tries = n * RANDOM_TRIES_PER_POINT
    lat = rng.uniform(south, north, tries)
    lon = rng.uniform(west, east, tries)
    keep = thin_points(lat, lon, n, min_distance_m)
    if len(keep) < n:
        raise ValueError(
            f"region {rid!r}: only {len(keep)} of {n} random points fit at least {min_distance_m:g} m apart "
            f"after {tries} draws; ask for fewer points or a smaller min_distance_m"
        )
    return lat[keep], lon[keep]
