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


def test_duplicates_and_missing_files_are_listed_not_fatal(regions, tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    df = pd.DataFrame({"image_path": ["a.jpg", "a.jpg", "gone.jpg"], "latitude": [34.045] * 3,
                       "longitude": [-118.25] * 3})
    manifest, report = prepare_manifest(df, regions, image_root=tmp_path)
    assert len(manifest) == 3
    assert report.duplicates == ["a.jpg"]
    assert report.missing_files == ["gone.jpg"]
    assert any("do not exist" in m for m in report.messages())


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
