import json

import numpy as np
import pandas as pd
import pytest

from lageo_utils.cli import main
from lageo_utils.data import from_authors_metadata, prepare_manifest
from lageo_utils.geo import nearest_km
from lageo_utils.sampling import area_normalized_sample, sampling_summary
from lageo_utils.splits import audit_leakage, split


@pytest.fixture(scope="module")
def reference_manifest(reference_dir, regions):
    frames = [pd.read_csv(reference_dir / f"{s}_metadata.csv") for s in ("train", "val", "test")]
    manifest, _ = prepare_manifest(from_authors_metadata(pd.concat(frames, ignore_index=True)), regions)
    return manifest


def test_audit_reproduces_published_overlap(reference_dir, capsys):
    published = pd.read_csv(reference_dir / "spatial_overlap_summary.csv").iloc[0].to_dict()
    assert main(["data", "audit", "--train", str(reference_dir / "train_metadata.csv"),
                 "--test", str(reference_dir / "test_metadata.csv")]) == 0
    assert json.loads(capsys.readouterr().out) == {k: int(v) for k, v in published.items()}


def test_image_split_matches_authors_sizes(reference_manifest):
    parts = split(reference_manifest, "image", seed=42)
    assert [len(parts[k]) for k in ("train", "val", "test")] == [6359, 1363, 1363]
    # stratified: every region's share is the same in each split (within one image)
    share = {k: parts[k]["region_id"].value_counts(normalize=True) for k in ("train", "test")}
    assert np.allclose(share["train"], share["test"].loc[share["train"].index], atol=0.002)
    assert audit_leakage(parts["train"], parts["test"])["exact_train_coordinate"] > 500


def test_location_split_has_no_shared_capture_points(reference_manifest):
    parts = split(reference_manifest, "location", seed=42)
    sizes = np.array([len(parts[k]) for k in ("train", "val", "test")])
    assert sizes.sum() == len(reference_manifest)
    assert np.allclose(sizes / sizes.sum(), [0.70, 0.15, 0.15], atol=0.02)
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not set(parts[a]["location_id"]) & set(parts[b]["location_id"])
    assert audit_leakage(parts["train"], parts["test"])["exact_train_coordinate"] == 0
    for rid in reference_manifest["region_id"].unique():  # stratified: each region in each split
        assert all((parts[k]["region_id"] == rid).any() for k in ("train", "val", "test"))


def test_location_split_is_seeded(reference_manifest):
    a = split(reference_manifest, "location", seed=7)["test"]["image_path"].tolist()
    b = split(reference_manifest, "location", seed=7)["test"]["image_path"].tolist()
    c = split(reference_manifest, "location", seed=8)["test"]["image_path"].tolist()
    assert a == b and a != c


def test_buffer_excludes_nearby_evaluation_points(reference_manifest):
    parts = split(reference_manifest, "location", seed=42, buffer_m=50)
    for name in ("val", "test"):
        d, _ = nearest_km(parts[name]["latitude"], parts[name]["longitude"],
                          parts["train"]["latitude"], parts["train"]["longitude"])
        assert d.min() * 1000 > 50
    assert sum(len(p) for p in parts.values()) == len(reference_manifest)  # nothing lost
    assert len(parts["excluded"]) > 0


def test_bad_split_parameters(reference_manifest):
    with pytest.raises(ValueError, match="strategy"):
        split(reference_manifest, "random")
    with pytest.raises(ValueError, match="fractions"):
        split(reference_manifest, fractions=(0.5, 0.5, 0.5))


def test_area_normalized_sample_follows_authors_scheme(reference_dir, regions):
    # Build a synthetic "available" pool with the published availability per region.
    published = pd.read_csv(reference_dir / "sampling_summary.csv").set_index("region_id")
    rng = np.random.default_rng(0)
    r = regions.set_index("id")
    rows = []
    for rid, n in published["available_images"].items():
        w, s, e, n_ = r.loc[rid, "geometry"].bounds
        rows.append(pd.DataFrame({"image_path": [f"{rid}_{i}.jpg" for i in range(n)],
                                  "latitude": rng.uniform(s, n_, n), "longitude": rng.uniform(w, e, n),
                                  "region_id": rid}))
    pool, _ = prepare_manifest(pd.concat(rows, ignore_index=True), regions)
    summary = sampling_summary(pool, regions)
    assert summary["target_density"].iloc[0] == pytest.approx(194.4934, rel=0.005)
    assert (summary["sampled_images"] - published["sampled_images"]).abs().max() <= 6  # areas agree within 0.5%
    sample = area_normalized_sample(pool, regions, seed=42)
    assert sample["region_id"].value_counts().to_dict() == summary["sampled_images"].to_dict()
    assert sample.equals(area_normalized_sample(pool, regions, seed=42))


def test_cli_split_writes_files(reference_dir, tmp_path, capsys):
    out = tmp_path / "splits"
    assert main(["data", "split", str(reference_dir / "test_metadata.csv"), "--out", str(out),
                 "--strategy", "location", "--seed", "42"]) == 0
    audit = json.loads((out / "audit.json").read_text())
    assert audit["exact_train_coordinate"] == 0 and audit["test_images"] > 0
    train = pd.read_csv(out / "train.csv")
    assert list(train.columns[:7]) == ["image_path", "latitude", "longitude", "heading", "region_id",
                                       "location_id", "source"]
    assert sum(len(pd.read_csv(out / f"{k}.csv")) for k in ("train", "val", "test")) == 1363


def test_location_split_gives_every_split_a_point_in_small_regions(regions):
    rows = [{"image_path": f"{rid}_{p}_{h}.jpg", "latitude": lat + p * 1e-3, "longitude": lon, "heading": h}
            for rid, lat, lon in regions[["id", "centroid_lat", "centroid_lon"]].itertuples(index=False)
            for p in range(3) for h in (0, 90, 180, 270)]
    manifest, _ = prepare_manifest(pd.DataFrame(rows), regions)
    parts = split(manifest, "location", seed=0)
    for name in ("train", "val", "test"):
        assert parts[name].groupby("region_id")["location_id"].nunique().eq(1).all()
        assert parts[name]["region_id"].nunique() == 15
