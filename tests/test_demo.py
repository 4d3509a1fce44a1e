import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupShuffleSplit

from lageo_utils.cli import main
from lageo_utils.data import MANIFEST_COLUMNS, read_manifest
from lageo_utils.demo import (
    DEMO_POINTS_PATH,
    HEADINGS,
    LOOK_FIELDS,
    STYLES,
    build_demo,
    capture_points,
    draw_scene,
    read_demo_points,
    reference_points,
    street_look,
)
from lageo_utils.geo import haversine_km
from lageo_utils.images import open_rgb
from lageo_utils.regions import assign_regions
from lageo_utils.splits import split

SHARED = ["downtown_la", "hollywood", "beverly_hills", "santa_monica", "venice_beach", "koreatown", "pasadena",
          "long_beach"]
SEA_RGB = np.array([40, 105, 160])


def digest_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def centre(regions, region_id: str) -> tuple[float, float]:
    row = regions.set_index("id").loc[region_id]
    return float(row["centroid_lat"]), float(row["centroid_lon"])


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=float)


def sea_share(image: Image.Image) -> float:
    """Share of pixels near the sea colour (lighting, colour cast and noise stay within 40 levels)."""
    return float(np.mean(np.abs(np.asarray(image, dtype=int) - SEA_RGB).max(axis=2) < 40))


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory, regions):
    out = tmp_path_factory.mktemp("demo") / "a"
    return out, build_demo(out, points_per_region=2, seed=0, image_size=48, regions=regions)


def test_same_seed_gives_byte_identical_dataset(small_demo, tmp_path, regions):
    out, _ = small_demo
    build_demo(tmp_path / "b", points_per_region=2, seed=0, image_size=48, regions=regions)
    first, second = digest_tree(out), digest_tree(tmp_path / "b")
    assert len(first) == 15 * 2 * 4 + 1 and first == second
    build_demo(tmp_path / "c", points_per_region=2, seed=1, image_size=48, regions=regions)
    other = digest_tree(tmp_path / "c")
    assert other["manifest.csv"] != first["manifest.csv"]
    assert sum(other[k] == v for k, v in first.items()) == 0  # every image changes with the seed


def test_manifest_is_canonical_and_complete(small_demo, regions):
    out, manifest = small_demo
    assert list(manifest.columns[: len(MANIFEST_COLUMNS)]) == MANIFEST_COLUMNS
    reread, report = read_manifest(out / "manifest.csv", regions, outside="fail", unlabeled="fail", image_root=out)
    assert report.messages() == [] and len(reread) == 120
    assert (reread["source"] == "demo-synthetic").all()
    assert (assign_regions(reread["latitude"], reread["longitude"], regions) == reread["region_id"]).all()
    assert reread.groupby("region_id")["location_id"].nunique().to_dict() == {rid: 2 for rid in regions["id"]}
    per_point = reread.groupby("location_id")["heading"].apply(sorted)
    assert all(h == list(HEADINGS) for h in per_point)
    assert reread["image_path"].str.fullmatch(r"images/[a-z_]+_p\d{3}_h(000|090|180|270)\.jpg").all()
    assert reread.loc[0, "image_path"] == "images/downtown_la_p000_h000.jpg"
    with pytest.raises(FileExistsError):
        build_demo(out, points_per_region=1, image_size=48, regions=regions)


def test_images_are_jpegs_of_the_requested_size_and_all_differ(small_demo):
    out, manifest = small_demo
    image = open_rgb(out / manifest.loc[0, "image_path"])
    assert image.size == (48, 48)
    with Image.open(out / manifest.loc[0, "image_path"]) as raw:
        assert raw.format == "JPEG"
    assert len({v for k, v in digest_tree(out).items() if k.endswith(".jpg")}) == 120


def test_shared_regions_use_real_reference_points(small_demo, reference_dir, regions):
    _, manifest = small_demo
    meta = pd.concat([pd.read_csv(reference_dir / f"{s}_metadata.csv") for s in ("train", "val", "test")])
    real = set(zip(meta["latitude"].round(6), meta["longitude"].round(6)))
    shipped = read_demo_points()
    assert set(shipped["region_id"]) == set(SHARED)
    assert shipped.groupby("region_id").size().eq(40).all()
    assert set(zip(shipped["latitude"], shipped["longitude"])) <= real
    used = manifest[manifest["region_id"].isin(SHARED)]
    assert (used["point_origin"] == "clip-geolocation").all()
    assert set(zip(used["latitude"], used["longitude"])) <= real
    others = manifest[~manifest["region_id"].isin(SHARED)]
    assert (others["point_origin"] == "random").all() and not set(zip(others["latitude"], others["longitude"])) & real
    # The shipped file is exactly what reference_points selects from the released CSVs.
    pd.testing.assert_frame_equal(reference_points(meta, regions), shipped, check_exact=False, atol=5e-7)


def test_points_file_carries_the_authors_licence(reference_dir):
    assert DEMO_POINTS_PATH.read_text().startswith("# ")
    notice = (reference_dir / "LICENSE").read_text().strip()
    assert notice in (DEMO_POINTS_PATH.parent / "DEMO_POINTS_LICENSE.txt").read_text()
    assert "Geolocation Representation Research Group" in DEMO_POINTS_PATH.read_text()


def test_capture_points_top_up_with_random_points_in_the_box(regions):
    points = capture_points(regions, 45, seed=3)
    counts = points.groupby(["region_id", "point_origin"]).size()
    assert counts[("pasadena", "clip-geolocation")] == 40 and counts[("pasadena", "random")] == 5
    assert counts[("malibu", "random")] == 45
    assert (assign_regions(points["latitude"], points["longitude"], regions) == points["region_id"]).all()
    assert not points.duplicated(["latitude", "longitude"]).any()
    with pytest.raises(ValueError, match="points_per_region"):
        capture_points(regions, 0)


def test_sea_only_where_coastal_and_facing_the_ocean(regions):
    coastal = [rid for rid, style in STYLES.items() if style.sea_heading is not None]
    assert sorted(coastal) == ["long_beach", "malibu", "manhattan_beach", "santa_monica", "venice_beach"]
    for rid in coastal:
        facing = STYLES[rid].sea_heading
        assert sea_share(draw_scene(rid, facing, *centre(regions, rid), size=96)) > 0.05, rid  # a full-width band
        assert sea_share(draw_scene(rid, (facing + 180) % 360, *centre(regions, rid), size=96)) < 0.02, rid
    for rid in ("downtown_la", "santa_clarita", "koreatown", "griffith_park"):  # blue cars and glass, no sea
        assert max(sea_share(draw_scene(rid, h, *centre(regions, rid), size=96)) for h in HEADINGS) < 0.04, rid


def random_pairs(regions, n: int, offset_km: float, seed: int = 0):
    """``n`` (region, point, point ``offset_km`` away in a random direction) triples inside the fifteen boxes."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        region = regions.iloc[i % len(regions)]
        west, south, east, north = region.geometry.bounds
        lat, lon = rng.uniform(south, north), rng.uniform(west, east)
        bearing = rng.uniform(0, 2 * np.pi)
        other = (lat + offset_km / 111.2 * np.cos(bearing), lon + offset_km / (111.2 * np.cos(np.radians(lat))) * np.sin(bearing))
        pairs.append((region.id, (lat, lon), other))
    return pairs


def test_street_look_is_smooth_in_space_and_seeded(regions):
    def look_gap(offset_km: float) -> np.ndarray:
        return np.array([
            np.abs(np.subtract(list(street_look(rid, *a).values()), list(street_look(rid, *b).values()))).mean()
            for rid, a, b in random_pairs(regions, 60, offset_km)
        ])

    near, far = look_gap(0.05), look_gap(2.0)
    assert near.mean() < 0.03 < 0.15 < far.mean(), (near.mean(), far.mean())  # fields are uniform on (0, 1)
    assert (near < far).mean() > 0.9
    look = street_look("hollywood", 34.1, -118.335)
    assert set(look) == set(LOOK_FIELDS) and all(0 < v < 1 for v in look.values())
    assert look == street_look("hollywood", 34.1, -118.335, seed=0)
    assert look != street_look("hollywood", 34.1, -118.335, seed=1)
    assert look != street_look("pasadena", 34.1, -118.335)  # every region has its own fields


def test_neighbouring_points_look_alike_and_headings_differ(regions):
    near_gap, far_gap, heading_gap = [], [], []
    for (rid, a, near), (_, _, far) in zip(random_pairs(regions, 30, 0.05), random_pairs(regions, 30, 2.0)):
        for heading in (0, 90):
            image = pixels(draw_scene(rid, heading, *a, size=64))
            near_gap.append(np.abs(image - pixels(draw_scene(rid, heading, *near, size=64))).mean())
            far_gap.append(np.abs(image - pixels(draw_scene(rid, heading, *far, size=64))).mean())
            heading_gap.append(np.abs(image - pixels(draw_scene(rid, heading + 180, *a, size=64))).mean())
    near_gap, far_gap, heading_gap = map(np.array, (near_gap, far_gap, heading_gap))
    assert near_gap.mean() * 1.5 < far_gap.mean(), (near_gap.mean(), far_gap.mean())
    assert (near_gap < far_gap).mean() > 0.75
    assert near_gap.mean() * 1.5 < heading_gap.mean(), (near_gap.mean(), heading_gap.mean())


def test_regions_are_learnable_from_random_tiny_model_features(tmp_path, regions):
    from lageo_utils.model import load_clip

    manifest = build_demo(tmp_path, points_per_region=6, seed=0, image_size=64, regions=regions)
    torch.manual_seed(0)
    model, preprocess, _ = load_clip("lageo-tiny", pretrained=None, device="cpu")
    with torch.no_grad():
        pixels = torch.stack([preprocess(open_rgb(tmp_path / p)) for p in manifest["image_path"]])
        features = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1).numpy()
    train, test = next(GroupShuffleSplit(1, test_size=0.3, random_state=0).split(features,
                                                                                 groups=manifest["location_id"]))
    probe = LogisticRegression(max_iter=2000, C=10).fit(features[train], manifest["region_id"][train])
    accuracy = probe.score(features[test], manifest["region_id"][test])
    assert accuracy > 3 / len(regions), accuracy  # chance is 1/15


def test_retrieval_beats_the_region_centroid_on_random_tiny_model_features(tmp_path, regions):
    """Nearby scenes look alike, so the nearest training image (cosine) lies closer than the region's centre."""
    from lageo_utils.model import load_clip

    some = regions[regions["id"].isin(["downtown_la", "hollywood", "santa_monica", "malibu", "pasadena"])]
    manifest = build_demo(tmp_path, points_per_region=24, seed=0, image_size=64, regions=some.reset_index(drop=True))
    torch.manual_seed(42)
    model, preprocess, _ = load_clip("lageo-tiny", pretrained=None, device="cpu")
    with torch.no_grad():
        batch = torch.stack([preprocess(open_rgb(tmp_path / p)) for p in manifest["image_path"]])
        features = torch.nn.functional.normalize(model.encode_image(batch), dim=-1).numpy()
    parts = split(manifest.assign(row=np.arange(len(manifest))), "location", seed=42)
    train, test = parts["train"], parts["test"]
    nearest = (features[test["row"]] @ features[train["row"]].T).argmax(axis=1)
    retrieval_km = haversine_km(test["latitude"], test["longitude"], train["latitude"].to_numpy()[nearest],
                                train["longitude"].to_numpy()[nearest])
    centroids = some.set_index("id").loc[test["region_id"]]
    centroid_km = haversine_km(test["latitude"], test["longitude"], centroids["centroid_lat"].to_numpy(),
                               centroids["centroid_lon"].to_numpy())
    assert len(test) == 5 * 3 * 4  # three test capture points per region
    assert np.median(retrieval_km) < 0.6 * np.median(centroid_km), (np.median(retrieval_km), np.median(centroid_km))
    assert np.mean(retrieval_km <= 1) > np.mean(centroid_km <= 1) + 0.15


def test_cli_builds_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "build", "--out", str(out), "--points-per-region", "1", "--size", "32"]) == 0
    assert '"images": 60' in capsys.readouterr().out
    assert len(pd.read_csv(out / "manifest.csv")) == 60
    assert main(["demo", "build", "--out", str(out), "--points-per-region", "1"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["demo", "build", "--out", str(out), "--points-per-region", "1", "--size", "32", "--force"]) == 0
    assert main(["demo", "build", "--out", str(tmp_path / "other"), "--points-per-region", "0"]) == 2
    assert "points_per_region" in capsys.readouterr().err
