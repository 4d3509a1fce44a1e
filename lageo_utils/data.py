"""The canonical image manifest: read, import, label with regions and validate.

One table describes every image (see ``MANIFEST_COLUMNS``); every later step
(splits, embeddings, predictions) reads it. Extra columns (e.g. ``pano_id`` from
the Street View collector) are carried along untouched.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import charset_normalizer
import geopandas as gpd
import numpy as np
import pandas as pd

from lageo_utils.geo import haversine_km
from lageo_utils.regions import assign_regions

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["image_path", "latitude", "longitude", "heading", "region_id", "location_id", "source"]
REQUIRED_COLUMNS = ["image_path", "latitude", "longitude"]
TEXT_COLUMNS = {"region_id": "string", "location_id": "string", "image_path": "string"}
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
    duplicates: list[str] = field(default_factory=list)  # repeated image_path rows removed by dedupe
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
            out.append(f"{len(self.duplicates)} repeated image_path rows removed (dedupe kept the first of each): "
                       f"{self.duplicates[:5]}")
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
    """Read a manifest file: CSV/TSV (any common encoding and delimiter, e.g. Excel's exports), Parquet or Excel.

    ``ManifestError`` names the file when it is missing, empty, has a header but no rows, or is
    not a table at all.
    """
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"{path}: file not found")
    if path.is_dir():
        raise ManifestError(f"{path}: is a folder; give the manifest file inside it")
    if path.stat().st_size == 0:
        raise ManifestError(f"{path}: the file is empty")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            table = pd.read_parquet(path)
        elif suffix in (".xlsx", ".xlsm"):
            table = pd.read_excel(path, dtype=TEXT_COLUMNS)
        elif suffix in (".csv", ".tsv", ".txt"):
            table = _read_delimited(path)
        else:
            raise ManifestError(f"{path}: unsupported manifest type {path.suffix!r} (use .csv, .tsv, .parquet or .xlsx)")
    except ManifestError:
        raise
    except Exception as exc:  # pandas, pyarrow and openpyxl raise many types for files that are not tables
        raise ManifestError(f"{path}: not a readable {suffix.lstrip('.')} table ({type(exc).__name__}: {exc})") from None
    table.columns = [str(c).strip() for c in table.columns]
    if table.empty:
        raise ManifestError(f"{path}: has a header ({', '.join(table.columns)}) but no rows")
    return table


def _read_delimited(path: Path) -> pd.DataFrame:
    """A delimited text table; the encoding and the delimiter are detected, not assumed."""
    raw = path.read_bytes()
    if b"\x00" in raw[:4096]:
        raise ManifestError(f"{path}: a binary file, not a CSV table")
    try:
        text = raw.decode("utf-8-sig")  # the BOM Excel writes is dropped
    except UnicodeDecodeError:
        best = charset_normalizer.from_bytes(raw).best()  # e.g. Windows-1252 from older Excel exports
        if best is None:
            raise ManifestError(f"{path}: not a text file in any known encoding") from None
        log.info("%s: read as %s (not UTF-8)", path, best.encoding)
        text = str(best)
    header = text.split("\n", 1)[0]
    delimiter = max(",;\t|", key=header.count)  # the separator the header uses most
    if not header.count(delimiter):
        delimiter = ","
    return pd.read_csv(io.StringIO(text), sep=delimiter, dtype=TEXT_COLUMNS, skipinitialspace=True)


def read_manifest(
    path: str | os.PathLike,
    regions: gpd.GeoDataFrame,
    *,
    outside: str = "keep",
    unlabeled: str = "drop",
    image_root: str | os.PathLike | None = None,
    dedupe: bool = False,
) -> tuple[pd.DataFrame, ManifestReport]:
    """Read a canonical manifest or the authors' metadata, then label and validate it."""
    raw = read_table(path)
    if is_authors_format(raw.columns) and "image_path" not in raw.columns:
        raw = from_authors_metadata(raw)
    return prepare_manifest(raw, regions, outside=outside, unlabeled=unlabeled, image_root=image_root, name=str(path),
                            dedupe=dedupe)


def prepare_manifest(
    df: pd.DataFrame,
    regions: gpd.GeoDataFrame,
    *,
    outside: str = "keep",
    unlabeled: str = "drop",
    image_root: str | os.PathLike | None = None,
    name: str = "manifest",
    dedupe: bool = False,
) -> tuple[pd.DataFrame, ManifestReport]:
    """Validate columns and coordinates, fill region labels and location ids, report problems.

    - column names are matched without regard to case or surrounding spaces;
    - a row with a ``region_id`` keeps it; a row outside its labelled box is reported with its
      distance to the box and kept, dropped or rejected (``outside``);
    - a row without one gets the region whose box holds it; one outside every box is dropped
      and counted, or rejected (``unlabeled``);
    - a repeated image path is an error naming its rows, unless ``dedupe`` keeps the first of each
      (the others are listed in the report);
    - (with ``image_root``) missing files are listed, never fatal.
    """
    if outside not in OUTSIDE_POLICIES:
        raise ValueError(f"outside must be one of {OUTSIDE_POLICIES}, not {outside!r}")
    if unlabeled not in UNLABELED_POLICIES:
        raise ValueError(f"unlabeled must be one of {UNLABELED_POLICIES}, not {unlabeled!r}")
    df = _canonical_column_names(df)
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(f"{name}: missing required columns {missing} (has {list(df.columns)})")
    df = df.reset_index(drop=True).copy()
    for col in MANIFEST_COLUMNS:
        if col not in df.columns:
            df[col] = None
    _check_image_paths(df, name)
    _check_coordinates(df, name)
    df["heading"] = pd.to_numeric(df["heading"], errors="coerce")
    df["source"] = df["source"].fillna("unknown").astype(str)

    report = ManifestReport()
    dup = df["image_path"].duplicated(keep="first")
    if dup.any():
        if not dedupe:
            first = df.loc[dup, "image_path"].iloc[0]
            rows = _row_numbers(df["image_path"] == first)
            raise ManifestError(
                f"{name}: {int(dup.sum())} repeated image_path values, e.g. {first!r} in data rows {rows[:10]}; "
                "remove the repeats, or pass --dedupe (parameter dedupe: true) to keep the first of each"
            )
        report.duplicates = df.loc[dup, "image_path"].tolist()
        df = df[~dup].reset_index(drop=True)
    df = _label_regions(df, regions, outside, unlabeled, report, name)
    no_location = df["location_id"].isna()
    df.loc[no_location, "location_id"] = location_ids(
        df.loc[no_location, "latitude"], df.loc[no_location, "longitude"]
    ).to_numpy()
    if image_root is not None:
        root = Path(image_root)
        exists = np.array([(root / p).is_file() for p in df["image_path"]], dtype=bool)
        report.missing_files = df.loc[~exists, "image_path"].tolist()
    for message in report.messages():
        log.warning("%s: %s", name, message)
    return _ordered(df), report


def _canonical_column_names(df: pd.DataFrame) -> pd.DataFrame:
    """``Latitude``, `` image_path `` and the like renamed to the canonical column names."""
    renames = {}
    for column in df.columns:
        canonical = str(column).strip().lower()
        if canonical in MANIFEST_COLUMNS and column != canonical and canonical not in df.columns:
            renames[column] = canonical
    return df.rename(columns=renames)


def _check_image_paths(df: pd.DataFrame, name: str) -> None:
    paths = df["image_path"].astype("string").str.strip()
    empty = paths.isna() | (paths == "")
    if empty.any():
        rows = _row_numbers(empty)
        raise ManifestError(f"{name}: column 'image_path' is empty in data rows {rows[:10]}"
                            + (f" and {len(rows) - 10} more" if len(rows) > 10 else ""))
    df["image_path"] = paths.astype(str)


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
        column = df[col]
        if column.dtype == object or pd.api.types.is_string_dtype(column):
            text = column.astype("string").str.strip()
            if text.str.fullmatch(r"-?\d+,\d+").fillna(True).all():  # decimal commas (European spreadsheets)
                text = text.str.replace(",", ".", regex=False)
            column = text
        values = pd.to_numeric(column, errors="coerce")
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
