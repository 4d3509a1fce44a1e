"""Region definitions: load, validate and query the LA County region boxes.

Regions are axis-aligned latitude/longitude boxes. The canonical file is
``regions/la_county_regions.geojson`` (one Polygon feature per region with
``id``, ``name`` and ``description`` properties); the seed authors' JSON format
(``regions[].bbox.corners``) is read as well. Everything returns a
GeoDataFrame in EPSG:4326 whose row order is the class order.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import geopandas as gpd
import numpy as np
from pyproj import Geod
from shapely.geometry import box

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REGIONS_PATH = PROJECT_ROOT / "regions" / "la_county_regions.geojson"
REGION_COLUMNS = ["id", "name", "description", "geometry", "centroid_lat", "centroid_lon", "area_km2"]

_GEOD = Geod(ellps="WGS84")


class RegionsError(ValueError):
    """A region file is malformed; the message names the region and the problem."""


def default_regions_path() -> Path:
    """The region file used when none is given (``LAGEO_REGIONS`` overrides it)."""
    return Path(os.environ.get("LAGEO_REGIONS", DEFAULT_REGIONS_PATH))


def load_regions(path: str | os.PathLike | None = None) -> gpd.GeoDataFrame:
    """Read regions from GeoJSON or the authors' JSON format and validate them."""
    path = Path(path) if path is not None else default_regions_path()
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise RegionsError(f"{path}: region file not found") from None
    except json.JSONDecodeError as exc:
        raise RegionsError(f"{path}: not valid JSON ({exc})") from None
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        records = [_record_from_feature(f, i, path) for i, f in enumerate(doc.get("features", []))]
    elif isinstance(doc, dict) and isinstance(doc.get("regions"), list):
        records = [_record_from_authors(r, i, path) for i, r in enumerate(doc["regions"])]
    else:
        raise RegionsError(f"{path}: expected a GeoJSON FeatureCollection or a {{'regions': [...]}} document")
    return regions_from_boxes(records, source=str(path))


def regions_from_boxes(records: list[dict], source: str = "<memory>") -> gpd.GeoDataFrame:
    """Build the validated region GeoDataFrame from dicts with id, name, description, south, west, north, east."""
    if not records:
        raise RegionsError(f"{source}: no regions defined")
    seen: set[str] = set()
    for rec in records:
        _validate_box(rec, source)
        if rec["id"] in seen:
            raise RegionsError(f"{source}: duplicate region id {rec['id']!r}")
        seen.add(rec["id"])
    geoms = [box(r["west"], r["south"], r["east"], r["north"]) for r in records]
    gdf = gpd.GeoDataFrame(
        {
            "id": [r["id"] for r in records],
            "name": [r.get("name") or r["id"] for r in records],
            "description": [r.get("description", "") for r in records],
        },
        geometry=geoms,
        crs="EPSG:4326",
    )
    # The seed defines a region's centroid as the centre of its box.
    gdf["centroid_lat"] = [(r["south"] + r["north"]) / 2 for r in records]
    gdf["centroid_lon"] = [(r["west"] + r["east"]) / 2 for r in records]
    gdf["area_km2"] = [abs(_GEOD.geometry_area_perimeter(g)[0]) / 1e6 for g in geoms]
    overlaps = find_overlaps(gdf)
    if overlaps:
        a, b = overlaps[0]
        raise RegionsError(f"{source}: regions {a!r} and {b!r} overlap (boxes must be disjoint)")
    return gdf[REGION_COLUMNS]


def find_overlaps(regions: gpd.GeoDataFrame) -> list[tuple[str, str]]:
    """Pairs of region ids whose boxes share interior area (touching edges are allowed).

    ``intersects`` plus an area test, because shapely's ``overlaps`` is false when one box
    contains or equals another.
    """
    left, right = regions.sindex.query(regions.geometry, predicate="intersects")
    ids = regions["id"].to_numpy()
    geoms = regions.geometry.to_numpy()
    return sorted({(ids[i], ids[j]) for i, j in zip(left, right)
                   if i < j and geoms[i].intersection(geoms[j]).area > 0})


def assign_regions(lat, lon, regions: gpd.GeoDataFrame | None = None) -> np.ndarray:
    """Map points to the id of the box that contains them (edges inclusive), or None.

    Vectorised over points and boxes: a (points x regions) boolean test, which for
    15 boxes is far cheaper than building point geometries.
    """
    regions = load_regions() if regions is None else regions
    lat = np.asarray(lat, dtype=float).reshape(-1, 1)
    lon = np.asarray(lon, dtype=float).reshape(-1, 1)
    bounds = regions.geometry.bounds  # minx=west, miny=south, maxx=east, maxy=north
    inside = (
        (lat >= bounds["miny"].to_numpy())
        & (lat <= bounds["maxy"].to_numpy())
        & (lon >= bounds["minx"].to_numpy())
        & (lon <= bounds["maxx"].to_numpy())
    )
    ids = regions["id"].to_numpy(dtype=object)
    out = np.full(len(lat), None, dtype=object)
    hit = inside.any(axis=1)
    out[hit] = ids[inside[hit].argmax(axis=1)]
    return out


def regions_summary(regions: gpd.GeoDataFrame) -> dict:
    """The JSON summary printed by ``lageo regions check``."""
    return {
        "regions": len(regions),
        "ids": regions["id"].tolist(),
        "overlaps": [list(p) for p in find_overlaps(regions)],
        "area_km2": {rid: round(float(a), 4) for rid, a in zip(regions["id"], regions["area_km2"])},
    }


def _record_from_feature(feature: dict, index: int, path: Path) -> dict:
    props = feature.get("properties") or {}
    rid = props.get("id")
    label = rid if rid else f"feature #{index}"
    if not rid:
        raise RegionsError(f"{path}: {label} has no 'id' property")
    geometry = feature.get("geometry") or {}
    if geometry.get("type") != "Polygon" or not geometry.get("coordinates"):
        raise RegionsError(f"{path}: region {label!r} geometry must be a Polygon (its bounding box)")
    try:
        ring = np.asarray(geometry["coordinates"][0], dtype=float)
        lons, lats = ring[:, 0], ring[:, 1]
    except (ValueError, IndexError, TypeError):
        raise RegionsError(f"{path}: region {label!r} has malformed coordinates") from None
    on_edge = np.isin(lats, [lats.min(), lats.max()]) & np.isin(lons, [lons.min(), lons.max()])
    if not on_edge.all():
        raise RegionsError(f"{path}: region {label!r} polygon is not an axis-aligned bounding box")
    return _bounds_record(rid, props, lats, lons)


def _record_from_authors(region: dict, index: int, path: Path) -> dict:
    rid = region.get("id")
    label = rid if rid else f"region #{index}"
    if not rid:
        raise RegionsError(f"{path}: {label} has no 'id'")
    try:
        corners = {c.get("name", str(i)): c for i, c in enumerate(region["bbox"]["corners"])}
        lats = np.array([c["latitude"] for c in corners.values()], dtype=float)
        lons = np.array([c["longitude"] for c in corners.values()], dtype=float)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise RegionsError(f"{path}: region {label!r} needs bbox.corners with latitude and longitude") from None
    record = _bounds_record(rid, region, lats, lons)
    if {"southwest", "northeast"} <= corners.keys():
        # Named corners let us detect a box whose north lies below its south (inverted).
        record.update(
            south=float(corners["southwest"]["latitude"]),
            west=float(corners["southwest"]["longitude"]),
            north=float(corners["northeast"]["latitude"]),
            east=float(corners["northeast"]["longitude"]),
        )
    return record


def _bounds_record(rid: str, props: dict, lats: np.ndarray, lons: np.ndarray) -> dict:
    return {
        "id": rid,
        "name": props.get("name") or rid,
        "description": props.get("description", ""),
        "south": float(lats.min()),
        "north": float(lats.max()),
        "west": float(lons.min()),
        "east": float(lons.max()),
    }


def _validate_box(rec: dict, source: str) -> None:
    rid = rec.get("id")
    if not rid:
        raise RegionsError(f"{source}: a region has no id")
    s, n, w, e = rec["south"], rec["north"], rec["west"], rec["east"]
    if not all(np.isfinite([s, n, w, e])):
        raise RegionsError(f"{source}: region {rid!r} has non-finite coordinates")
    if not (-90 <= s <= 90 and -90 <= n <= 90):
        raise RegionsError(f"{source}: region {rid!r} latitude out of range [-90, 90]: {s}, {n}")
    if not (-180 <= w <= 180 and -180 <= e <= 180):
        raise RegionsError(f"{source}: region {rid!r} longitude out of range [-180, 180]: {w}, {e}")
    if s >= n or w >= e:
        raise RegionsError(
            f"{source}: region {rid!r} box is inverted or degenerate (south={s}, north={n}, west={w}, east={e})"
        )
