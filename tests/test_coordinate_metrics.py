import json

import h3
import numpy as np
import pandas as pd
import pytest

from lageo_utils.bench import benchmark_gallery
from lageo_utils.coordinate_metrics import (
    COORDINATE_THRESHOLDS_KM,
    centroid_ceiling_km,
    chance_baseline,
    coordinate_metrics_json,
    coordinate_summary,
    geocell_ceiling_km,
    paired_difference,
    reference_tables,
    retrieval_ceiling_km,
    risk_coverage,
)
from lageo_utils.geo import DEFAULT_THRESHOLDS_KM, acc_at_km, haversine_km
from lageo_utils.geolocate import build_geocells, spherical_mean

STREET_KEYS = ["0.025", "0.1", "0.5", "1", "5", "10", "25"]


def answers(errors, confidence=None, n_per_point: int = 1, seed: int = 0) -> pd.DataFrame:
    n = len(errors)
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "image_path": [f"img_{i:04d}.jpg" for i in range(n)],
        "location_id": [f"p{i // n_per_point}" for i in range(n)],
        "error_km": np.asarray(errors, float),
        "confidence": rng.random(n) if confidence is None else np.asarray(confidence, float),
    })


def test_summary_keys_extend_the_existing_thresholds_and_match_by_hand():
    assert [f"{t:g}" for t in COORDINATE_THRESHOLDS_KM] == STREET_KEYS
    assert set(acc_at_km([1.0], DEFAULT_THRESHOLDS_KM)) <= set(STREET_KEYS)  # "1", "5", "10", "25" stay
    errors = [0.01, 0.05, 0.3, 0.8, 3, 8, 20, 40]
    s = coordinate_summary(answers(errors), n_boot=200)
    assert list(s["acc_at_km"]) == STREET_KEYS
    assert s["acc_at_km"] == pytest.approx(dict(zip(STREET_KEYS, [1 / 8, 2 / 8, 3 / 8, 4 / 8, 5 / 8, 6 / 8, 7 / 8])))
    assert s["median_error_km"] == pytest.approx((0.8 + 3) / 2) and s["mean_error_km"] == pytest.approx(np.mean(errors))
    assert s["n_images"] == 8


def test_bootstrap_intervals_contain_the_estimate_and_are_seeded():
    rng = np.random.default_rng(1)
    table = answers(rng.exponential(2.0, 400), n_per_point=4)
    s = coordinate_summary(table, n_boot=300, seed=3)
    for key in STREET_KEYS:
        lo, hi = s["acc_at_km_ci95"][key]
        assert lo <= s["acc_at_km"][key] <= hi
    for name in ("median_error_km", "mean_error_km"):
        lo, hi = s[f"{name}_ci95"]
        assert lo < s[name] < hi
    assert coordinate_summary(table, n_boot=300, seed=3) == s
    assert coordinate_summary(table, n_boot=300, seed=4) != s


def test_bootstrap_resamples_capture_points():
    # Every heading of a point has the point's error: clusters of 4 make the interval about twice as wide.
    rng = np.random.default_rng(2)
    table = answers(np.repeat(rng.exponential(2.0, 150), 4), n_per_point=4)
    clustered = coordinate_summary(table, n_boot=400)["acc_at_km_ci95"]["1"]
    by_image = coordinate_summary(table, n_boot=400, group=None)["acc_at_km_ci95"]["1"]
    assert 1.5 < (clustered[1] - clustered[0]) / (by_image[1] - by_image[0]) < 2.6


def test_paired_difference_against_centroid():
    rng = np.random.default_rng(4)
    base = rng.uniform(0.5, 5, 300)
    reference = answers(base, n_per_point=3)
    better = answers(base * 0.3, n_per_point=3).sample(frac=1, random_state=0)  # order must not matter
    out = paired_difference(better, reference, n_boot=300)
    d = out["acc_at_km"]["1"]
    assert d["difference"] == pytest.approx(np.mean(base * 0.3 <= 1) - np.mean(base <= 1))
    assert 0 < d["ci"][0] <= d["difference"] <= d["ci"][1]
    assert out["median_error_km"]["ci"][1] < 0 and out["resampled"] == "location_id"
    same = paired_difference(reference, reference, n_boot=50)
    assert same["acc_at_km"]["1"] == {"difference": 0.0, "ci": [0.0, 0.0]}


def test_risk_coverage_by_hand():
    # Ranked by confidence the 1 km hits are 1, 0, 1, 0: selective accuracy 1, 1/2, 2/3, 1/2,
    # risks 0, 1/2, 1/3, 1/2, area (0 + 1/2 + 1/3 + 1/2) / 4 = 1/3.
    table = answers([2.0, 0.1, 3.0, 0.2], confidence=[0.8, 0.9, 0.6, 0.7])
    rc = risk_coverage(table, points=4)
    assert rc["coverage"] == [0.25, 0.5, 0.75, 1.0]
    assert rc["acc_at_km"]["1"] == pytest.approx([1, 0.5, 2 / 3, 0.5])
    assert rc["aurc"]["1"] == pytest.approx(1 / 3)
    assert rc["median_error_km"] == pytest.approx([0.1, 1.05, 0.2, 1.1])
    assert rc["min_confidence"] == [0.9, 0.8, 0.7, 0.6]
    with_regions = risk_coverage(table.assign(correct=[True, False, False, True]), points=4)
    assert with_regions["accuracy"] == pytest.approx([0, 0.5, 2 / 3, 0.5])  # ranked: F, T, T, F
    # Confidence that ranks the wrong answers first: risks 1, 1, 2/3, 1/2.
    worst = risk_coverage(table.assign(confidence=[0.2, 0.05, 0.15, 0.1]), points=4)
    assert worst["aurc"]["1"] == pytest.approx((1 + 1 + 2 / 3 + 1 / 2) / 4)


# -- ceilings and baselines ---------------------------------------------------------------------


def test_ceilings_equal_a_direct_computation():
    rng = np.random.default_rng(5)
    centroids = np.array([[34.05, -118.25], [34.10, -118.33]])
    lat, lon = rng.uniform(34.0, 34.12, 30), rng.uniform(-118.4, -118.2, 30)
    true = rng.integers(0, 2, 30)
    direct = [haversine_km(a, b, *centroids[t]) for a, b, t in zip(lat, lon, true)]
    assert np.allclose(centroid_ceiling_km(lat, lon, true, centroids), direct)
    g_lat, g_lon = rng.uniform(34.0, 34.12, 200), rng.uniform(-118.4, -118.2, 200)
    nearest = [min(haversine_km(a, b, g_lat, g_lon)) for a, b in zip(lat, lon)]
    assert np.allclose(retrieval_ceiling_km(lat, lon, g_lat, g_lon), nearest)
    cells, _ = build_geocells(g_lat, g_lon, resolution=8, min_cell_images=3)
    for a, b, err, err_centre in zip(lat, lon, geocell_ceiling_km(lat, lon, cells),
                                     geocell_ceiling_km(lat, lon, cells, "centre")):
        ancestors = [h3.cell_to_parent(h3.latlng_to_cell(a, b, 8), r) for r in range(8, -1, -1)]
        held = [c for c in ancestors if c in cells.ids]
        i = cells.ids.index(held[0]) if held else int(np.argmin(haversine_km(a, b, cells.lat, cells.lon)))
        assert err == pytest.approx(haversine_km(a, b, cells.lat[i], cells.lon[i]))
        assert err_centre == pytest.approx(haversine_km(a, b, *h3.cell_to_latlng(cells.ids[i])))


def test_baselines():
    rng = np.random.default_rng(6)
    centroids = np.array([[34.05, -118.25], [34.10, -118.33], [34.02, -118.49]])
    test = pd.DataFrame({"image_path": [f"t{i}" for i in range(40)], "location_id": [f"p{i // 4}" for i in range(40)],
                         "latitude": rng.uniform(34.0, 34.1, 40), "longitude": rng.uniform(-118.5, -118.2, 40),
                         "region_id": rng.choice(["a", "b", "c"], 40)})
    g_lat, g_lon = rng.uniform(34.0, 34.1, 50), rng.uniform(-118.5, -118.2, 50)
    ceilings, baselines = reference_tables(test, centroids, ["a", "b", "c"], g_lat, g_lon, ["b"] * 5 + ["a"] * 3,
                                           seed=1)
    assert set(ceilings) == {"centroid", "retrieval"} and set(baselines) == {"majority_region", "fixed_point",
                                                                             "random_gallery_image"}
    majority = baselines["majority_region"]
    assert majority.attrs["info"]["region"] == "b"
    assert majority.attrs["info"]["accuracy"] == pytest.approx(np.mean(test["region_id"] == "b"))
    assert np.allclose(majority["error_km"], haversine_km(test["latitude"], test["longitude"], *centroids[1]))
    f_lat, f_lon = spherical_mean(g_lat, g_lon)
    assert np.allclose(baselines["fixed_point"]["error_km"], haversine_km(test["latitude"], test["longitude"], f_lat,
                                                                          f_lon))
    again = reference_tables(test, centroids, ["a", "b", "c"], g_lat, g_lon, ["b"], seed=1)[1]
    other = reference_tables(test, centroids, ["a", "b", "c"], g_lat, g_lon, ["b"], seed=2)[1]
    random_errors = baselines["random_gallery_image"]["error_km"]
    assert np.array_equal(again["random_gallery_image"]["error_km"], random_errors)
    assert not np.array_equal(other["random_gallery_image"]["error_km"], random_errors)
    assert np.all(random_errors >= retrieval_ceiling_km(test["latitude"], test["longitude"], g_lat, g_lon) - 1e-9)
    chance = chance_baseline(test["latitude"], test["longitude"], centroids)
    assert chance["accuracy"] == pytest.approx(1 / 3)
    per_region = [np.mean(haversine_km(test["latitude"], test["longitude"], *c) <= 5) for c in centroids]
    assert chance["acc_at_km"]["5"] == pytest.approx(np.mean(per_region))
    with pytest.raises(ValueError, match="t0"):
        reference_tables(test.assign(region_id="zz"), centroids, ["a", "b", "c"], g_lat, g_lon, ["a"])


# -- the metrics.json fragment ------------------------------------------------------------------


def test_coordinate_metrics_json_structure():
    rng = np.random.default_rng(7)
    base = rng.uniform(0.5, 8, 60)
    tables = {
        "zeroshot": {"centroid": answers(base, n_per_point=3), "retrieval": answers(base * 0.5, n_per_point=3)},
        "finetuned": {"centroid": answers(base * 0.9, n_per_point=3), "retrieval": answers(base * 0.2, n_per_point=3)},
    }
    voted = {"zeroshot": {"retrieval": answers(base * 0.4, n_per_point=3)}}
    ceilings = {"centroid": answers(base * 0.1, n_per_point=3)}
    doc = coordinate_metrics_json(tables, voted=voted, ceilings=ceilings,
                                  baselines={"chance": {"accuracy": 1 / 15}}, n_boot=100)
    assert {"methods", "ceilings", "baselines", "risk_coverage", "paired_vs_centroid"} <= set(doc)
    method = doc["methods"]["zeroshot"]["retrieval"]
    assert {"acc_at_km", "acc_at_km_ci95", "median_error_km", "median_error_km_ci95", "per_capture_point"} <= set(method)
    assert method["per_capture_point"]["n_capture_points"] == 20
    assert method["per_capture_point"]["median_error_km"] == pytest.approx(np.median(base * 0.4))
    assert "per_capture_point" not in doc["methods"]["finetuned"]["retrieval"]
    assert set(doc["paired_vs_centroid"]["finetuned"]) == {"retrieval"}  # the reference is not paired with itself
    assert doc["paired_vs_centroid"]["finetuned"]["retrieval"]["acc_at_km"]["1"]["difference"] == pytest.approx(
        np.mean(base * 0.2 <= 1) - np.mean(base * 0.9 <= 1))
    assert doc["ceilings"]["centroid"]["median_error_km"] == pytest.approx(np.median(base * 0.1))
    assert doc["baselines"]["chance"] == {"accuracy": pytest.approx(1 / 15)}
    assert list(doc["risk_coverage"]["zeroshot"]["centroid"]["acc_at_km"]) == STREET_KEYS
    assert json.loads(json.dumps(doc, allow_nan=False)) == doc
    with pytest.raises(ValueError, match="zeroshot/centroid.*img_0002"):
        bad = answers(base)
        bad.loc[2, "error_km"] = np.nan
        coordinate_metrics_json({"zeroshot": {"centroid": bad}}, n_boot=10)


# -- benchmark ----------------------------------------------------------------------------------


def test_benchmark_gallery_runs_on_tiny_sizes():
    out = benchmark_gallery(sizes=(300, 600), dim=16, queries=20, k=5, nprobe=1000)
    assert [r["gallery_size"] for r in out["results"]] == [300, 600]
    for row in out["results"]:
        assert row["faiss"]["recall_at_k"] == 1.0  # IndexFlatIP is exact
        assert row["faiss_ivf"]["recall_at_k"] == 1.0  # probing every list is exact too
        assert row["exact"]["queries_per_s"] > 0 and row["gallery_mb"] == pytest.approx(row["gallery_size"] * 64 / 2**20)
