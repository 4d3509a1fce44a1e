import pandas as pd
import pytest

from lageo_utils.data import (
    MANIFEST_COLUMNS,
    ManifestError,
    from_authors_metadata,
    prepare_manifest,
    read_manifest,
    write_manifest,
)


@pytest.fixture(scope="module")
def authors_all(reference_dir):
    return pd.concat([pd.read_csv(reference_dir / f"{s}_metadata.csv") for s in ("train", "val", "test")],
                     ignore_index=True)


def test_authors_split_reproduced_with_outside_rows_reported(authors_all, regions):
    manifest, report = prepare_manifest(from_authors_metadata(authors_all), regions)
    assert len(manifest) == 9085  # default keeps rows outside their box: the authors' split is reproduced
    assert list(manifest.columns[:7]) == MANIFEST_COLUMNS
    assert len(report.outside_box) == 17
    by_name = report.outside_box.assign(stem=lambda d: d.image_path.str.extract(r"_([a-z]+_\d+_h\d+)\.jpg")[0])
    dist = by_name.set_index("stem")["distance_km"]
    assert dist["dtla_0740_h180"] == pytest.approx(1.7, abs=0.1)
    assert dist["pas_0594_h180"] == pytest.approx(13.3, abs=0.1)
    assert dist.filter(like="ktown").max() < 0.05  # a few metres
    # the four headings of a capture point share one location id
    assert manifest.groupby("location_id")["heading"].nunique().max() <= 4
    assert manifest["location_id"].nunique() < len(manifest)


def test_outside_policy_drop_and_fail(authors_all, regions):
    dropped, _ = prepare_manifest(from_authors_metadata(authors_all), regions, outside="drop")
    assert len(dropped) == 9085 - 17
    with pytest.raises(ManifestError, match=r"17 labelled rows lie outside.*pas_0594_h180.*13\.277 km"):
        prepare_manifest(from_authors_metadata(authors_all), regions, outside="fail")


def test_unlabelled_rows_get_their_box_or_are_dropped(regions):
    df = pd.DataFrame({"image_path": ["a.jpg", "b.jpg", "c.jpg"], "latitude": [34.045, 34.1, 0.0],
                       "longitude": [-118.25, -118.33, 0.0]})
    manifest, report = prepare_manifest(df, regions)
    assert manifest["region_id"].tolist() == ["downtown_la", "hollywood"]
    assert report.dropped_unlabeled == ["c.jpg"]
    with pytest.raises(ManifestError, match=r"1 rows without region_id lie outside every region box \(data rows \[3\]\)"):
        prepare_manifest(df, regions, unlabeled="fail")


@pytest.mark.parametrize(
    "frame, message",
    [
        ({"image_path": ["a"], "latitude": [34.0]}, r"missing required columns \['longitude'\]"),
        ({"image_path": ["a", "b"], "latitude": [34.0, "north"], "longitude": [-118.2, -118.2]},
         r"'latitude' is missing, non-numeric or outside \[-90, 90\] in data rows \[2\]"),
        ({"image_path": ["a"], "latitude": [34.0], "longitude": [-218.2]}, r"'longitude'.*data rows \[1\]"),
        ({"image_path": ["a"], "latitude": [34.05], "longitude": [-118.25], "region_id": ["atlantis"]},
         r"region ids \['atlantis'\] are not in the region file \(data rows \[1\]\)"),
    ],
)
def test_bad_manifests_name_the_problem(regions, frame, message):
    with pytest.raises(ManifestError, match=message):
        prepare_manifest(pd.DataFrame(frame), regions, name="m.csv")


def test_repeated_rows_are_refused_unless_deduped_and_missing_files_listed(regions, tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    df = pd.DataFrame({"image_path": ["a.jpg", "gone.jpg", "a.jpg"], "latitude": [34.045] * 3,
                       "longitude": [-118.25] * 3})
    with pytest.raises(ManifestError, match=r"m.csv: 1 repeated image_path values, e.g. 'a.jpg' in data rows \[1, 3\].*"
                                            r"--dedupe"):
        prepare_manifest(df, regions, image_root=tmp_path, name="m.csv")
    manifest, report = prepare_manifest(df, regions, image_root=tmp_path, dedupe=True)
    assert manifest["image_path"].tolist() == ["a.jpg", "gone.jpg"]
    assert report.duplicates == ["a.jpg"]
    assert report.missing_files == ["gone.jpg"]
    assert any("do not exist" in m for m in report.messages())
    assert any("1 repeated image_path rows removed" in m for m in report.messages())


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_round_trip_csv_and_parquet(regions, tmp_path, suffix):
    df = pd.DataFrame({"image_path": ["a.jpg", "b.jpg"], "latitude": [34.045, 34.1], "longitude": [-118.25, -118.33],
                       "heading": [0, None], "pano_id": ["p1", "p2"]})
    manifest, _ = prepare_manifest(df, regions)
    path = write_manifest(manifest, tmp_path / f"m{suffix}")
    again, _ = read_manifest(path, regions)
    pd.testing.assert_frame_equal(again, manifest, check_dtype=False)
    assert "pano_id" in again.columns


def test_read_manifest_detects_authors_format(reference_dir, regions):
    manifest, report = read_manifest(reference_dir / "test_metadata.csv", regions)
    assert len(manifest) == 1363 and manifest["source"].eq("streetview").all()
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(reference_dir / "nope.csv", regions)


# --- what researchers' real files look like ---------------------------------------------------------------------

def _write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"m.csv: the file is empty"),
        (b"image_path,latitude,longitude\n", r"m.csv: has a header \(image_path, latitude, longitude\) but no rows"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", r"m.csv: a binary file, not a CSV table"),
        (b"image_path,latitude,longitude\na.jpg,,-118.25\n", r"'latitude' is missing.*data rows \[1\]"),
        (b"image_path,latitude,longitude\na.jpg,134.05,-118.25\n", r"'latitude'.*outside \[-90, 90\].*data rows \[1\]"),
        (b"image_path,latitude,longitude\n ,34.05,-118.25\n", r"column 'image_path' is empty in data rows \[1\]"),
    ],
)
def test_unusable_files_name_file_row_and_field(regions, tmp_path, content, message):
    with pytest.raises(ManifestError, match=message):
        read_manifest(_write(tmp_path / "m.csv", content), regions)


def test_a_folder_or_an_unknown_type_is_named(regions, tmp_path):
    with pytest.raises(ManifestError, match="is a folder"):
        read_manifest(tmp_path, regions)
    with pytest.raises(ManifestError, match=r"unsupported manifest type '.json'"):
        read_manifest(_write(tmp_path / "m.json", b"{}"), regions)
    with pytest.raises(ManifestError, match=r"m.parquet: not a readable parquet table"):
        read_manifest(_write(tmp_path / "m.parquet", b"not parquet at all"), regions)


def test_excel_exports_are_read(regions, tmp_path):
    """Windows-1252 text, a UTF-8 BOM, semicolons with decimal commas, capitalised headers, paths with spaces."""
    cp1252 = "image_path,latitude,longitude,notes\nphotos/café one.jpg,34.045,-118.25,façade\n".encode("cp1252")
    manifest, _ = read_manifest(_write(tmp_path / "a.csv", cp1252), regions)
    assert manifest.loc[0, "image_path"] == "photos/café one.jpg" and manifest.loc[0, "notes"] == "façade"

    european = "\ufeffImage_Path;Latitude;Longitude\nmy photos/a b.jpg ;34,045;-118,25\n".encode()
    manifest, _ = read_manifest(_write(tmp_path / "b.csv", european), regions)
    assert manifest.loc[0, "image_path"] == "my photos/a b.jpg"
    assert manifest.loc[0, "latitude"] == pytest.approx(34.045) and manifest.loc[0, "region_id"] == "downtown_la"

    tsv = b"image_path\tlatitude\tlongitude\na.jpg\t34.045\t-118.25\n"
    assert len(read_manifest(_write(tmp_path / "c.tsv", tsv), regions)[0]) == 1

    pd.DataFrame({"image_path": ["x y.jpg"], "latitude": [34.045], "longitude": [-118.25]}).to_excel(
        tmp_path / "d.xlsx", index=False)
    manifest, _ = read_manifest(tmp_path / "d.xlsx", regions)
    assert manifest.loc[0, "image_path"] == "x y.jpg" and manifest.loc[0, "region_id"] == "downtown_la"


def test_cli_bad_manifest_exits_2_without_traceback(tmp_path, capsys):
    from lageo_utils.cli import main

    bad = _write(tmp_path / "m.csv", b"image_path,latitude,longitude\na.jpg,34.05,-118.25\na.jpg,34.05,-118.25\n")
    assert main(["data", "split", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "repeated image_path values" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert main(["data", "split", str(bad), "--out", str(tmp_path / "out"), "--dedupe"]) == 0
