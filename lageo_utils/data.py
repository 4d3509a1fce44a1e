"""The canonical image manifest: read, import, label with regions and validate.

One table describes every image (see ``MANIFEST_COLUMNS``); every later step
(splits, embeddings, predictions) reads it. Extra columns (e.g. ``pano_id`` from
the Street View collector) are carried along untouched.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd

from lageo_utils.geo import haversine_km
from lageo_utils.regions import assign_regions

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["image_path", "latitude", "longitude", "heading", "region_id", "location_id", "source"]
REQUIRED_COLUMNS = ["image_path", "latitude", "longitude"]
AUTHORS_COLUMNS = {"filename", "latitude", "longitude", "heading", "source_folder"}
OUTSIDE_POLICIES = ("keep", "drop", "fail")
UNLABELED_POLICIES = ("drop", "fail")


class ManifestError(ValueError):
    """A manifest cannot be used; the message names the file, rows or columns at fault."""


@dataclass
class ManifestReport:
    """What labelling and validation found: problems that were kept, dropped or fixed."""

    outside_box: pd.DataFrame = field(default_factory=pd.DataFrame)  # labelled rows outside their box
    dropped_unlabeled: list[str] = field(default_factory=list)  # unlabelled rows outside every box
    duplicates: list[str] = field(default_factory=list)  # image_path values listed more than once
    missing_files: list[str] = field(default_factory=list)  # image_path values absent under image_root

    def to_dict(self) -> dict:
        return {
            "outside_box": self.outside_box.to_dict(orient="records"),
            "dropped_unlabeled": self.dropped_unlabeled,
            "duplicates": self.duplicates,
            "missing_files": self.missing_files,
        }

    def messages(self) -> list[str]:
        out = []
        for row in self.outside_box.itertuples():
            out.append(
                f"{row.image_path}: outside its labelled box {row.region_id!r} by {row.distance_km:.3f} km"
                f" ({'kept' if row.kept else 'dropped'})"
            )
        if self.dropped_unlabeled:
            out.append(f"{len(self.dropped_unlabeled)} unlabelled rows outside every region box were dropped")
        if self.duplicates:
            out.append(f"{len(self.duplicates)} duplicate image_path values: {self.duplicates[:5]}")
        if self.missing_files:
            out.append(f"{len(self.missing_files)} image files do not exist: {self.missing_files[:5]}")
        return out


def is_authors_format(columns) -> bool:
    """True for the seed authors' metadata CSV (``filename, latitude, longitude, heading, ..., source_folder``)."""
    return AUTHORS_COLUMNS <= set(columns)


def location_ids(lat, lon) -> pd.Series:
    """A capture-point id from the coordinate (1e-6 degrees, about 0.1 m): images at one point share it."""
    lat = np.asarray(lat, dtype=float)
    lon = np.asarray(lon, dtype=float)
    return pd.Series([f"{a:.6f},{b:.6f}" for a, b in zip(lat, lon, strict=True)], dtype=object)


def from_authors_metadata(df: pd.DataFrame, source: str = "streetview") -> pd.DataFrame:
    """Convert the authors' metadata table to canonical manifest columns (extra columns kept)."""
    if "status" in df.columns:
        df = df[df["status"].fillna("success") == "success"]
    out = df.rename(columns={"filename": "image_path"}).copy()
    if "region_id" not in out.columns:
        out["region_id"] = None
    out["source"] = source
    out["location_id"] = location_ids(out["latitude"], out["longitude"]).to_numpy()
    return _ordered(out)


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a CSV or Parquet file; ``ManifestError`` if it is missing or of another type."""
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"{path}: file not found")
    if path.suffix.lower() == ".parquet":
        return pd.read_parquet(path)
    if path.suffix.lower() in (".csv", ".txt"):
        return pd.read_csv(path, dtype={"region_id": "string", "location_id": "string", "image_path": "string"})
    raise ManifestError(f"{path}: unsupported manifest type {path.suffix!r} (use .csv or .parquet)")


def read_manifest(
    path: str | os.PathLike,
    regions: gpd.GeoDataFrame,
    *,
    outside: str = "keep",
    unlabeled: str = "drop",
    image_root: str | os.PathLike | None = None,
) -> tuple[pd.DataFrame, ManifestReport]:
    """Read a canonical manifest or the authors' metadata, then label and validate it."""
    raw = read_table(path)
    if is_authors_format(raw.columns) and "image_path" not in raw.columns:
        raw = from_authors_metadata(raw)
    return prepare_manifest(raw, regions, outside=outside, unlabeled=unlabeled, image_root=image_root, name=str(path))


def prepare_manifest(
    df: pd.DataFrame,
    regions: gpd.GeoDataFrame,
    *,
    outside: str = "keep",
    unlabeled: str = "drop",
    image_root: str | os.PathLike | None = None,
    name: str = "manifest",
) -> tuple[pd.DataFrame, ManifestReport]:
    """Validate columns and coordinates, fill region labels and location ids, report problems.

    - a row with a ``region_id`` keeps it; a row outside its labelled box is reported with its
      distance to the box and kept, dropped or rejected (``outside``);
    - a row without one gets the region whose box holds it; one outside every box is dropped
      and counted, or rejected (``unlabeled``);
    - duplicate image paths and (with ``image_root``) missing files are listed, never fatal.
    """
    if outside not in OUTSIDE_POLICIES:
        raise ValueError(f"outside must be one of {OUTSIDE_POLICIES}, not {outside!r}")
    if unlabeled not in UNLABELED_POLICIES:
        raise ValueError(f"unlabeled must be one of {UNLABELED_POLICIES}, not {unlabeled!r}")
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(f"{name}: missing required columns {missing} (has {list(df.columns)})")
    df = df.reset_index(drop=True).copy()
    for col in MANIFEST_COLUMNS:
        if col not in df.columns:
            df[col] = None
    _check_coordinates(df, name)
    df["heading"] = pd.to_numeric(df["heading"], errors="coerce")
    df["image_path"] = df["image_path"].astype(str)
    df["source"] = df["source"].fillna("unknown").astype(str)

    report = ManifestReport()
    df = _label_regions(df, regions, outside, unlabeled, report, name)
    no_location = df["location_id"].isna()
    df.loc[no_location, "location_id"] = location_ids(
        df.loc[no_location, "latitude"], df.loc[no_location, "longitude"]
    ).to_numpy()

    dup = df["image_path"].duplicated(keep="first")
    report.duplicates = df.loc[dup, "image_path"].tolist()
    if image_root is not None:
        root = Path(image_root)
        exists = np.array([(root / p).is_file() for p in df["image_path"]], dtype=bool)
        report.missing_files = df.loc[~exists, "image_path"].tolist()
    for message in report.messages():
        log.warning("%s: %s", name, message)
    return _ordered(df), report


def write_manifest(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a manifest as CSV or Parquet (by suffix), canonical columns first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df = _ordered(df)
    if path.suffix.lower() == ".parquet":
        df.to_parquet(path, index=False)
    else:
        df.to_csv(path, index=False)
    return path


def distance_to_box_km(lat, lon, south, west, north, east) -> np.ndarray:
    """Great-circle distance from points to the nearest point of lat/lon boxes (0 inside)."""
    lat = np.asarray(lat, float)
    lon = np.asarray(lon, float)
    return haversine_km(lat, lon, np.clip(lat, south, north), np.clip(lon, west, east))


def _check_coordinates(df: pd.DataFrame, name: str) -> None:
    for col, limit in (("latitude", 90), ("longitude", 180)):
        values = pd.to_numeric(df[col], errors="coerce")
        bad = values.isna() | (values.abs() > limit)
        if bad.any():
            rows = _row_numbers(bad)
            raise ManifestError(
                f"{name}: column {col!r} is missing, non-numeric or outside [-{limit}, {limit}] in data rows {rows[:10]}"
                + (f" and {len(rows) - 10} more" if len(rows) > 10 else "")
            )
        df[col] = values.astype(float)


def _label_regions(
    df: pd.DataFrame, regions: gpd.GeoDataFrame, outside: str, unlabeled: str, report: ManifestReport, name: str
) -> pd.DataFrame:
    known = set(regions["id"])
    labelled = df["region_id"].notna() & (df["region_id"].astype(str).str.strip() != "")
    unknown = labelled & ~df["region_id"].isin(known)
    if unknown.any():
        bad = sorted(df.loc[unknown, "region_id"].astype(str).unique())
        raise ManifestError(
            f"{name}: region ids {bad} are not in the region file (data rows {_row_numbers(unknown)[:10]})"
        )
    found = assign_regions(df["latitude"], df["longitude"], regions)

    # Labelled rows whose coordinate lies outside their own box (e.g. a snapped panorama).
    bounds = regions.set_index("id").geometry.bounds
    lab = df[labelled]
    b = bounds.loc[lab["region_id"]]
    dist = distance_to_box_km(lab["latitude"], lab["longitude"], b["miny"].to_numpy(), b["minx"].to_numpy(),
                              b["maxy"].to_numpy(), b["maxx"].to_numpy())
    off = lab.index[dist > 0]
    if len(off):
        report.outside_box = pd.DataFrame(
            {
                "row": _row_numbers(df.index.isin(off)),
                "image_path": df.loc[off, "image_path"].to_numpy(),
                "region_id": df.loc[off, "region_id"].to_numpy(),
                "distance_km": dist[dist > 0],
                "kept": outside == "keep",
            }
        )
        if outside == "fail":
            worst = report.outside_box.sort_values("distance_km").iloc[-1]
            raise ManifestError(
                f"{name}: {len(off)} labelled rows lie outside their region box, e.g. data row {worst.row} "
                f"({worst.image_path}) is {worst.distance_km:.3f} km outside {worst.region_id!r}"
            )

    unl = ~labelled
    df.loc[unl, "region_id"] = found[unl.to_numpy()]
    nowhere = unl & df["region_id"].isna()
    if nowhere.any():
        if unlabeled == "fail":
            raise ManifestError(
                f"{name}: {int(nowhere.sum())} rows without region_id lie outside every region box "
                f"(data rows {_row_numbers(nowhere)[:10]})"
            )
        report.dropped_unlabeled = df.loc[nowhere, "image_path"].astype(str).tolist()
    drop = nowhere | (df.index.isin(off) if outside == "drop" else False)
    return df[~drop].reset_index(drop=True)


def _row_numbers(mask) -> list[int]:
    """1-based data row numbers (the header is not counted) for a boolean mask."""
    return [int(i) + 1 for i in np.flatnonzero(np.asarray(mask))]


def _ordered(df: pd.DataFrame) -> pd.DataFrame:
    extra = [c for c in df.columns if c not in MANIFEST_COLUMNS]
    return df[[c for c in MANIFEST_COLUMNS if c in df.columns] + extra]
