"""Bring your own images: a folder of geotagged JPEG/PNG photos, or a CSV of paths and coordinates.

Coordinates come from the photo's EXIF GPS block (read with Pillow) or from the CSV. Each image
is checked to decode and labelled with the region box that holds it; what cannot be used is
skipped with its reason (no GPS, outside every region, unreadable, bad coordinates) and reported.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections import Counter
from pathlib import Path

import geopandas as gpd
import pandas as pd
from PIL import ExifTags, Image, UnidentifiedImageError

from lageo_utils.collect.store import IMAGES_DIR, MANIFEST_NAME, image_problem
from lageo_utils.data import ManifestError, location_ids, write_manifest
from lageo_utils.regions import assign_regions

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
PATH_COLUMNS = ("image_path", "path", "filename", "file")
LAT_COLUMNS = ("latitude", "lat")
LON_COLUMNS = ("longitude", "lon", "lng")
HEADING_COLUMNS = ("heading", "compass_angle")
REPORT_NAME = "import_report.json"
GPS = ExifTags.GPS


def read_exif_gps(path: str | os.PathLike) -> dict | None:
    """``{latitude, longitude, heading, captured_at}`` from a photo's EXIF, or None without a usable GPS fix."""
    with Image.open(path) as img:
        exif = img.getexif()
        gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
        taken = exif.get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.DateTimeOriginal)
    lat = _degrees(gps.get(GPS.GPSLatitude), gps.get(GPS.GPSLatitudeRef), "S")
    lon = _degrees(gps.get(GPS.GPSLongitude), gps.get(GPS.GPSLongitudeRef), "W")
    if lat is None or lon is None or abs(lat) > 90 or abs(lon) > 180:
        return None
    direction = gps.get(GPS.GPSImgDirection)
    heading = float(direction) if direction is not None and math.isfinite(float(direction)) else None
    return {"latitude": lat, "longitude": lon, "heading": heading, "captured_at": _exif_time(taken)}


def import_images(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    regions: gpd.GeoDataFrame,
    *,
    copy: bool = False,
    recursive: bool = True,
) -> tuple[pd.DataFrame, dict]:
    """Build ``out_dir/manifest.csv`` from a photo folder (EXIF GPS) or a CSV (path + coordinates).

    ``image_path`` is relative to ``out_dir``; with ``copy`` the images are copied to
    ``out_dir/images/`` so the folder stands alone. Writes ``out_dir/import_report.json`` and
    returns ``(manifest, report)``; the report lists every skipped file with its reason. A manifest
    in ``out_dir`` is replaced only if an earlier import wrote it (a collector's is never overwritten).
    """
    source = Path(source)
    out = Path(out_dir)
    if (out / MANIFEST_NAME).exists() and not (out / REPORT_NAME).exists():
        raise ManifestError(f"{out / MANIFEST_NAME} exists and was not written by an import; choose another --out")
    if source.is_dir():
        found, skipped = _from_folder(source, out, recursive)
        root = source
    elif source.is_file():
        found, skipped = _from_csv(source)
        root = source.parent
    else:
        raise ManifestError(f"{source}: no such folder or CSV file")
    labels = assign_regions([r["latitude"] for r in found], [r["longitude"] for r in found], regions) if found else []
    rows = []
    out.mkdir(parents=True, exist_ok=True)
    for rec, region in zip(found, labels, strict=True):
        if region is None:
            skipped.append({"path": rec["name"], "reason": "outside every region"})
            continue
        rows.append({"image_path": _place(rec["file"], root, out, copy), "latitude": rec["latitude"],
                     "longitude": rec["longitude"], "heading": rec["heading"], "region_id": region,
                     "source": "user", "captured_at": rec.get("captured_at")})
    manifest = pd.DataFrame(rows, columns=["image_path", "latitude", "longitude", "heading", "region_id", "source",
                                           "captured_at"])
    manifest.insert(5, "location_id", location_ids(manifest["latitude"], manifest["longitude"]).to_numpy())
    write_manifest(manifest, out / MANIFEST_NAME)
    report = {
        "source": str(source),
        "manifest": str(out / MANIFEST_NAME),
        "imported": len(manifest),
        "skipped": len(skipped),
        "skipped_by_reason": dict(Counter(s["reason"].split(":")[0] for s in skipped)),
        "per_region": {k: int(v) for k, v in manifest["region_id"].value_counts().sort_index().items()},
        "skipped_files": skipped,
    }
    (out / REPORT_NAME).write_text(json.dumps(report, indent=2))
    return manifest, report


def _from_folder(folder: Path, out: Path, recursive: bool) -> tuple[list[dict], list[dict]]:
    pattern = folder.rglob("*") if recursive else folder.glob("*")
    copies = (out / IMAGES_DIR).resolve()
    files = sorted(p for p in pattern if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.resolve().is_relative_to(copies))
    found, skipped = [], []
    for path in files:
        name = path.relative_to(folder).as_posix()
        problem = image_problem(path)
        if problem:
            skipped.append({"path": name, "reason": f"unreadable: {problem}"})
            continue
        try:
            gps = read_exif_gps(path)
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
            skipped.append({"path": name, "reason": f"unreadable EXIF: {exc}"})
            continue
        if gps is None:
            skipped.append({"path": name, "reason": "no GPS position in EXIF"})
            continue
        found.append({"file": path, "name": name, **gps})
    return found, skipped


def _from_csv(path: Path) -> tuple[list[dict], list[dict]]:
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise ManifestError(f"{path}: not a readable CSV ({exc})") from None
    path_col = _column(table, PATH_COLUMNS, path, "image path")
    lat_col = _column(table, LAT_COLUMNS, path, "latitude")
    lon_col = _column(table, LON_COLUMNS, path, "longitude")
    heading_col = next((c for c in HEADING_COLUMNS if c in table.columns), None)
    found, skipped = [], []
    for number, row in enumerate(table.to_dict(orient="records"), start=1):
        name = row[path_col]
        where = f"{path.name} row {number}"
        lat, lon = _number(row[lat_col]), _number(row[lon_col])
        if lat is None or lon is None or abs(lat) > 90 or abs(lon) > 180:
            skipped.append({"path": name or where, "reason": f"bad coordinates: {where} has latitude "
                            f"{row[lat_col]!r}, longitude {row[lon_col]!r}"})
            continue
        file = Path(name) if Path(name).is_absolute() else path.parent / name
        problem = image_problem(file) if name else "no path"
        if problem:
            skipped.append({"path": name or where, "reason": f"unreadable: {problem} ({where})"})
            continue
        heading = _number(row[heading_col]) if heading_col else None
        found.append({"file": file, "name": name, "latitude": lat, "longitude": lon, "heading": heading})
    return found, skipped


def _place(file: Path, root: Path, out: Path, copy: bool) -> str:
    """The manifest's ``image_path`` (relative to ``out``), copying the file there first when asked."""
    if not copy:
        return Path(os.path.relpath(file.resolve(), out.resolve())).as_posix()
    try:
        rel = file.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:  # a CSV may list files outside its folder: keep their names apart by a path hash
        digest = hashlib.sha1(str(file.resolve()).encode()).hexdigest()[:8]
        rel = f"external/{digest}_{file.name}"
    dest = out / IMAGES_DIR / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(file, dest)
    return f"{IMAGES_DIR}/{rel}"


def _column(table: pd.DataFrame, names, path: Path, what: str) -> str:
    lower = {c.lower().strip(): c for c in table.columns}
    for name in names:
        if name in lower:
            return lower[name]
    raise ManifestError(f"{path}: no {what} column (expected one of {list(names)}; has {list(table.columns)})")


def _number(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _degrees(dms, ref, negative: str) -> float | None:
    """Degrees from an EXIF (degrees, minutes, seconds) triple and its N/S or E/W reference."""
    try:
        d, m, s = (float(v) for v in dms)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    value = d + m / 60 + s / 3600
    if not math.isfinite(value):
        return None
    if isinstance(ref, bytes):
        ref = ref.decode("ascii", "replace")
    return -value if str(ref or "").strip().upper() == negative else value


def _exif_time(value) -> str | None:
    """EXIF ``YYYY:MM:DD HH:MM:SS`` as ISO ``YYYY-MM-DDTHH:MM:SS``; None when absent or malformed."""
    if not isinstance(value, str) or len(value) < 19:
        return None
    date, _, clock = value.strip().partition(" ")
    return f"{date.replace(':', '-')}T{clock}" if len(date) == 10 else None
