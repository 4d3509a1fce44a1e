"""Bring your own images: EXIF GPS folders and CSV lists become a canonical manifest (``lageo data import``)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import ExifTags, Image

from lageo_utils.cli import main
from lageo_utils.collect import import_images, read_exif_gps
from lageo_utils.data import MANIFEST_COLUMNS, ManifestError, read_manifest


def dms(value: float) -> tuple[float, float, float]:
    value = abs(value)
    d = int(value)
    m = int((value - d) * 60)
    return float(d), float(m), round((value - d - m / 60) * 3600, 4)


def photo(path: Path, lat: float | None = None, lon: float | None = None, *, heading=None, taken=None,
          fmt="JPEG", color=(90, 120, 200)) -> Path:
    """A small photo, with a GPS block in its EXIF when ``lat``/``lon`` are given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (40, 30), color)
    exif = img.getexif()
    if lat is not None:
        gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
        gps[ExifTags.GPS.GPSLatitudeRef] = "N" if lat >= 0 else "S"
        gps[ExifTags.GPS.GPSLatitude] = dms(lat)
        gps[ExifTags.GPS.GPSLongitudeRef] = "E" if lon >= 0 else "W"
        gps[ExifTags.GPS.GPSLongitude] = dms(lon)
        if heading is not None:
            gps[ExifTags.GPS.GPSImgDirection] = heading
    if taken:
        exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.DateTimeOriginal] = taken
    img.save(path, fmt, exif=exif.tobytes())
    return path


@pytest.fixture
def album(tmp_path) -> Path:
    root = tmp_path / "album"
    photo(root / "downtown.jpg", 34.0451, -118.2502, heading=123.5, taken="2024:05:06 07:08:09")
    photo(root / "trip" / "hollywood.PNG", 34.1003, -118.3301, fmt="PNG")
    photo(root / "trip" / "sydney.jpeg", -33.8688, 151.2093)  # southern and eastern hemispheres: no region
    photo(root / "no_gps.jpg")
    good = photo(root / "cut.jpg", 34.045, -118.25).read_bytes()
    (root / "cut.jpg").write_bytes(good[: len(good) - 200])  # GPS header intact, pixels cut off
    (root / "notes.txt").write_text("not an image")
    return root


def test_exif_gps_is_read_with_hemispheres_heading_and_time(album):
    assert read_exif_gps(album / "downtown.jpg") == {
        "latitude": pytest.approx(34.0451, abs=1e-6), "longitude": pytest.approx(-118.2502, abs=1e-6),
        "heading": 123.5, "captured_at": "2024-05-06T07:08:09"}
    sydney = read_exif_gps(album / "trip" / "sydney.jpeg")
    assert (sydney["latitude"], sydney["longitude"]) == pytest.approx((-33.8688, 151.2093), abs=1e-6)
    assert read_exif_gps(album / "no_gps.jpg") is None


def test_folder_import_labels_regions_and_reports_every_skip(album, tmp_path, regions):
    out = tmp_path / "data"
    manifest, report = import_images(album, out, regions)
    assert manifest["region_id"].tolist() == ["downtown_la", "hollywood"]
    assert report["imported"] == 2 and report["per_region"] == {"downtown_la": 1, "hollywood": 1}
    reasons = {s["path"]: s["reason"] for s in report["skipped_files"]}
    assert reasons["no_gps.jpg"] == "no GPS position in EXIF"
    assert reasons["trip/sydney.jpeg"] == "outside every region"
    assert reasons["cut.jpg"].startswith("unreadable: corrupt or truncated")
    assert len(reasons) == 3  # notes.txt is not a photo
    assert report["skipped_by_reason"] == {"no GPS position in EXIF": 1, "outside every region": 1, "unreadable": 1}
    assert json.loads((out / "import_report.json").read_text())["imported"] == 2

    loaded, problems = read_manifest(out / "manifest.csv", regions, image_root=out)
    assert list(loaded.columns[:7]) == MANIFEST_COLUMNS and problems.missing_files == []
    assert loaded["image_path"].tolist() == ["../album/downtown.jpg", "../album/trip/hollywood.PNG"]
    assert (loaded["source"] == "user").all() and loaded["heading"].iloc[0] == 123.5
    assert loaded["latitude"].tolist() == pytest.approx([34.0451, 34.1003], abs=1e-6)


def test_copy_makes_a_self_contained_folder(album, tmp_path, regions):
    out = album / "dataset"  # inside the album: a second import must not pick up its own copies
    import_images(album, out, regions, copy=True)
    manifest, _ = import_images(album, out, regions, copy=True)
    assert manifest["image_path"].tolist() == ["images/downtown.jpg", "images/trip/hollywood.PNG"]
    _, problems = read_manifest(out / "manifest.csv", regions, image_root=out)
    assert problems.missing_files == []
    assert (out / "images" / "downtown.jpg").read_bytes() == (album / "downtown.jpg").read_bytes()


def test_csv_import_checks_rows_files_and_columns(album, tmp_path, regions):
    listing = tmp_path / "lists" / "list.csv"  # beside no image: every file lies outside its folder
    listing.parent.mkdir()
    pd.DataFrame({
        "path": ["../album/no_gps.jpg", "../album/downtown.jpg", "../album/gone.jpg", str(album / "downtown.jpg")],
        "lat": ["34.10", "north", "34.05", "34.04"],
        "lon": ["-118.33", "-118.25", "-118.25", "-118.25"],
        "heading": ["90", "", "", "270"],
    }).to_csv(listing, index=False)
    out = tmp_path / "data"
    manifest, report = import_images(listing, out, regions, copy=True)
    assert manifest["region_id"].tolist() == ["hollywood", "downtown_la"]
    assert manifest["heading"].tolist() == [90.0, 270.0]
    assert manifest["image_path"].str.fullmatch(r"images/external/[0-9a-f]{8}_(no_gps|downtown)\.jpg").all()
    reasons = [s["reason"] for s in report["skipped_files"]]
    assert reasons == ["bad coordinates: list.csv row 2 has latitude 'north', longitude '-118.25'",
                       "unreadable: file not found (list.csv row 3)"]
    _, problems = read_manifest(out / "manifest.csv", regions, image_root=out)
    assert problems.missing_files == []

    pd.DataFrame({"file": ["a.jpg"], "y": [1], "x": [2]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ManifestError, match=r"bad\.csv: no latitude column \(expected one of \['latitude', 'lat'\]"):
        import_images(tmp_path / "bad.csv", out, regions)


def test_data_import_command(album, tmp_path, capsys):
    out = tmp_path / "data"
    assert main(["data", "import", str(album), "--out", str(out), "--copy"]) == 0
    assert json.loads(capsys.readouterr().out)["imported"] == 2
    empty = tmp_path / "empty"
    photo(empty / "x.jpg")
    assert main(["data", "import", str(empty), "--out", str(tmp_path / "d2")]) == 2
    assert "no image could be imported" in capsys.readouterr().err
    assert main(["data", "import", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "no such folder or CSV file" in capsys.readouterr().err
    collected = tmp_path / "collected"  # a collector's folder: its manifest is never overwritten
    collected.mkdir()
    (collected / "manifest.csv").write_text("image_path,latitude,longitude\nimages/a.jpg,34.04,-118.25\n")
    assert main(["data", "import", str(album), "--out", str(collected)]) == 2
    assert "was not written by an import" in capsys.readouterr().err
    assert (collected / "manifest.csv").read_text().startswith("image_path,latitude,longitude\nimages/a.jpg")
