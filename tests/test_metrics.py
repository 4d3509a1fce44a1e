import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from lageo_utils.metrics import (
    bootstrap_ci,
    classification_report_text,
    compare_models,
    compute_metrics,
    confusion,
    expected_calibration_error,
    metrics_json,
    reliability_table,
)

M_KEYS = {
    "n_images", "accuracy", "precision_macro", "recall_macro", "f1_macro", "precision_weighted",
    "recall_weighted", "f1_weighted", "acc_at_km", "median_error_km", "mean_error_km", "ece", "per_region",
}
SMALL_REGIONS = pd.DataFrame({"id": ["a", "b", "c", "d"], "name": ["Alpha", "Beta", "Gamma", "Delta"]})


def preds(true, pred, confidence=0.9, error_km=1.0, location_id=None) -> pd.DataFrame:
    n = len(true)
    df = pd.DataFrame({
        "image_path": [f"img_{i:05d}.jpg" for i in range(n)],
        "true_region": list(true),
        "pred_region": list(pred),
        "confidence": np.broadcast_to(np.asarray(confidence, dtype=float), n),
        "error_km": np.broadcast_to(np.asarray(error_km, dtype=float), n),
    })
    df["correct"] = df["true_region"] == df["pred_region"]
    if location_id is not None:
        df["location_id"] = list(location_id)
    return df


def random_preds(n_locations: int, accuracy: float, seed: int, headings: int = 4, clustered: bool = True):
    """Predictions for ``n_locations`` capture points; with ``clustered`` all headings of a point share the outcome."""
    rng = np.random.default_rng(seed)
    ids = SMALL_REGIONS["id"].to_numpy()
    true = np.repeat(rng.choice(ids, n_locations), headings)
    hit = rng.random(n_locations) < accuracy
    hit = np.repeat(hit, headings) if clustered else rng.random(len(true)) < accuracy
    wrong = np.array([ids[(np.flatnonzero(ids == t)[0] + 1) % len(ids)] for t in true])
    errors = np.where(hit, rng.uniform(0, 4, len(true)), rng.uniform(6, 40, len(true)))
    return preds(true, np.where(hit, true, wrong), rng.uniform(0.3, 1, len(true)), errors,
                 np.repeat([f"p{i}" for i in range(n_locations)], headings))


# -- point metrics ------------------------------------------------------------------------------


def test_hand_computed_small_case():
    df = preds(list("aaabbc"), list("aabbcc"), confidence=0.9, error_km=[0.5, 2, 7, 30, 3, 12])
    m = compute_metrics(df, SMALL_REGIONS)
    assert set(m) == M_KEYS
    assert m["n_images"] == 6 and m["accuracy"] == pytest.approx(4 / 6)
    f1 = {"a": 0.8, "b": 0.5, "c": 2 / 3, "d": 0.0}  # a: P 1 R 2/3; b: P 1/2 R 1/2; c: P 1/2 R 1; d absent
    assert m["per_region"]["a"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert m["per_region"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["f1_macro"] == pytest.approx(sum(f1.values()) / 4)
    assert m["f1_weighted"] == pytest.approx((3 * 0.8 + 2 * 0.5 + 1 * 2 / 3) / 6)
    assert m["precision_macro"] == pytest.approx((1 + 0.5 + 0.5 + 0) / 4)
    assert m["acc_at_km"] == pytest.approx({"1": 1 / 6, "5": 3 / 6, "10": 4 / 6, "25": 5 / 6})
    assert m["median_error_km"] == pytest.approx(5.0) and m["mean_error_km"] == pytest.approx(54.5 / 6)
    assert m["ece"] == pytest.approx(0.9 - 4 / 6)  # one bin: confidence 0.9, accuracy 2/3


def test_metrics_match_sklearn_on_random_predictions(regions):
    rng = np.random.default_rng(7)
    ids = regions["id"].to_numpy()[:12]  # three regions never appear
    true = rng.choice(ids, 300)
    df = preds(true, np.where(rng.random(300) < 0.4, true, rng.choice(ids, 300)), rng.random(300), rng.random(300))
    m = compute_metrics(df, regions)
    labels = regions["id"].tolist()
    assert m["accuracy"] == pytest.approx(accuracy_score(df["true_region"], df["pred_region"]))
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(df["true_region"], df["pred_region"], labels=labels,
                                                     average=average, zero_division=0)
        assert (m[f"precision_{average}"], m[f"recall_{average}"], m[f"f1_{average}"]) == pytest.approx((p, r, f))
    assert list(m["per_region"]) == labels
    assert [m["per_region"][rid]["support"] for rid in labels[12:]] == [0, 0, 0]
    assert sum(v["support"] for v in m["per_region"].values()) == 300


def test_unknown_region_and_missing_column_are_named():
    with pytest.raises(ValueError, match="zzz"):
        compute_metrics(preds(["a"], ["zzz"]), SMALL_REGIONS)
    with pytest.raises(ValueError, match="error_km"):
        compute_metrics(preds(["a"], ["a"]).drop(columns="error_km"), SMALL_REGIONS)
    with pytest.raises(ValueError, match="empty"):
        compute_metrics(preds([], []), SMALL_REGIONS)


# -- calibration --------------------------------------------------------------------------------


def test_ece_zero_when_accuracy_equals_confidence_in_every_bin():
    confidence = [0.2] * 5 + [0.6] * 5 + [1.0] * 4
    true = ["a"] * 14
    pred = ["a", "b", "b", "b", "b"] + ["a", "a", "a", "b", "b"] + ["a"] * 4  # 1/5, 3/5, 4/4 correct
    assert expected_calibration_error(preds(true, pred, confidence)) == pytest.approx(0.0, abs=1e-12)


def test_ece_of_overconfident_and_of_calibrated_random_sets():
    over = preds(["a"] * 10, ["a"] * 5 + ["b"] * 5, confidence=0.95)
    assert compute_metrics(over, SMALL_REGIONS)["ece"] == pytest.approx(0.45)
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.05, 1, 20_000)
    hit = rng.random(20_000) < confidence
    calibrated = preds(["a"] * 20_000, np.where(hit, "a", "b"), confidence)
    assert expected_calibration_error(calibrated) < 0.02
    assert expected_calibration_error(calibrated.assign(confidence=np.clip(confidence + 0.2, 0, 1))) > 0.15


def test_reliability_table_bins_and_counts():
    confidence = [0.0, 1 / 15, 1 / 15 + 1e-9, 0.5, 1.0, 1.0]
    table = reliability_table(preds(["a"] * 6, ["a", "b", "a", "a", "a", "b"], confidence))
    assert list(table.columns[[0, 3, 4, 5]]) == ["bin", "confidence", "accuracy", "count"]
    assert len(table) == 15 and table["count"].sum() == 6
    counts = dict(zip(table["bin"], table["count"]))
    assert counts[0] == 2 and counts[1] == 1 and counts[7] == 1 and counts[14] == 2  # right-closed bins
    assert table.loc[14, "accuracy"] == 0.5 and table.loc[14, "confidence"] == 1.0
    assert np.isnan(table.loc[3, "accuracy"]) and table.loc[3, "count"] == 0
    assert table.loc[0, "lower"] == 0 and table.loc[14, "upper"] == 1


# -- report tables ------------------------------------------------------------------------------


def test_classification_report_in_seed_layout():
    df = preds(list("aaabbc"), list("aabbcc"))
    text = classification_report_text(df, SMALL_REGIONS)
    lines = [line.split() for line in text.splitlines() if line.strip()]
    assert lines[0] == ["precision", "recall", "f1-score", "support"]
    assert [row[0] for row in lines[1:5]] == ["Alpha", "Beta", "Gamma", "Delta"]
    assert lines[1] == ["Alpha", "1.00", "0.67", "0.80", "3"] and lines[4][-1] == "0"
    assert lines[5][0] == "accuracy" and lines[5][-1] == "6"
    assert lines[6][:2] == ["macro", "avg"] and lines[7][:2] == ["weighted", "avg"]
    assert float(lines[6][4]) == pytest.approx(round((0.8 + 0.5 + 2 / 3) / 4, 2))


def test_confusion_rows_true_columns_predicted():
    table = confusion(preds(list("aaabbc"), list("aabbcc")), SMALL_REGIONS)
    assert table.index.name == "true" and table.columns.name == "predicted"
    assert list(table.index) == list(table.columns) == ["Alpha", "Beta", "Gamma", "Delta"]
    assert table.loc["Alpha", "Alpha"] == 2 and table.loc["Alpha", "Beta"] == 1 and table.loc["Beta", "Gamma"] == 1
    assert table.sum(axis=1).tolist() == [3, 2, 1, 0]


# -- uncertainty --------------------------------------------------------------------------------


def test_bootstrap_ci_contains_estimate_and_narrows_with_more_data():
    small, large = random_preds(30, 0.6, seed=1), random_preds(600, 0.6, seed=1)
    widths = []
    for df in (small, large):
        m = compute_metrics(df, SMALL_REGIONS)
        ci = bootstrap_ci(df, regions=SMALL_REGIONS, n_boot=300, seed=0)
        for name in ("accuracy", "f1_macro", "median_error_km"):
            assert ci[name][0] <= m[name] <= ci[name][1], name
        for threshold, (lo, hi) in ci["acc_at_km"].items():
            assert lo <= m["acc_at_km"][threshold] <= hi
        widths.append(ci["accuracy"][1] - ci["accuracy"][0])
    assert widths[1] < widths[0] / 2.5  # 20x the points: about sqrt(20) = 4.5x narrower


def test_bootstrap_resamples_capture_points_not_images():
    df = random_preds(200, 0.5, seed=2)  # the four headings of a point are all right or all wrong
    clustered = bootstrap_ci(df, ["accuracy"], n_boot=400, seed=0)["accuracy"]
    by_image = bootstrap_ci(df, ["accuracy"], n_boot=400, seed=0, group=None)["accuracy"]
    width_ratio = (clustered[1] - clustered[0]) / (by_image[1] - by_image[0])
    assert 1.6 < width_ratio < 2.5  # perfectly correlated clusters of 4: sqrt(4) = 2x wider
    independent = random_preds(200, 0.5, seed=2, clustered=False)
    ci_ind = bootstrap_ci(independent, ["accuracy"], n_boot=400, seed=0)["accuracy"]
    assert ci_ind[1] - ci_ind[0] < (clustered[1] - clustered[0]) * 0.7


def test_bootstrap_builtins_equal_sklearn_with_resampling_weights():
    df = random_preds(40, 0.5, seed=3, clustered=False)
    labels = SMALL_REGIONS["id"].tolist()

    def sk_accuracy(d, w):
        return accuracy_score(d["true_region"], d["pred_region"], sample_weight=w)

    def sk_f1(average):
        return lambda d, w: precision_recall_fscore_support(
            d["true_region"], d["pred_region"], labels=labels, average=average, sample_weight=w, zero_division=0
        )[2]

    names = ["accuracy", "f1_macro", "f1_weighted", "mean_error_km"]
    custom = {"accuracy": sk_accuracy, "f1_macro": sk_f1("macro"), "f1_weighted": sk_f1("weighted"),
              "mean_error_km": lambda d, w: np.average(d["error_km"], weights=w)}
    builtin = bootstrap_ci(df, names, regions=SMALL_REGIONS, n_boot=60, seed=5)
    reference = bootstrap_ci(df, custom, n_boot=60, seed=5)
    for name in names:
        assert builtin[name] == pytest.approx(reference[name]), name


def test_bootstrap_is_seeded():
    df = random_preds(50, 0.5, seed=4)
    assert bootstrap_ci(df, n_boot=100, seed=1) == bootstrap_ci(df, n_boot=100, seed=1)
    assert bootstrap_ci(df, n_boot=100, seed=1) != bootstrap_ci(df, n_boot=100, seed=2)
    with pytest.raises(ValueError, match="unknown bootstrap metrics"):
        bootstrap_ci(df, ["nope"], n_boot=10)


def test_compare_models_paired_difference():
    a = random_preds(150, 0.8, seed=5)
    b = a.assign(pred_region=random_preds(150, 0.4, seed=5)["pred_region"])
    out = compare_models(a, b.sample(frac=1, random_state=0), n_boot=300, seed=0)  # row order must not matter
    assert out["difference"] == pytest.approx(out["value_a"] - out["value_b"])
    assert out["value_a"] == pytest.approx(compute_metrics(a, SMALL_REGIONS)["accuracy"])
    assert 0 < out["ci"][0] <= out["difference"] <= out["ci"][1]
    assert out["resampled"] == "location_id"
    same = compare_models(a, a, n_boot=50, seed=0)
    assert same["difference"] == 0 and same["ci"] == [0, 0]
    with pytest.raises(ValueError, match="different images"):
        compare_models(a, b.iloc[1:], n_boot=10)


def test_metrics_json_structure_and_json_safety():
    zeroshot, finetuned = random_preds(40, 0.3, seed=6), random_preds(40, 0.7, seed=6)
    finetuned["error_km"] = zeroshot["error_km"].to_numpy()
    params = {"epochs": np.int64(2), "lr": float("nan"), "model": "lageo-tiny"}
    doc = metrics_json(zeroshot, finetuned, SMALL_REGIONS, params, {"train": 10, "val": 2, "test": 160},
                       n_boot=50)
    assert {"zeroshot", "finetuned", "params", "data"} <= set(doc)
    for name in ("zeroshot", "finetuned"):
        assert M_KEYS <= set(doc[name])
        assert set(doc[name]["ci"]) == {"accuracy", "f1_macro", "median_error_km", "acc_at_km"}
        assert set(doc[name]["acc_at_km"]) == {"1", "5", "10", "25"}
    assert doc["finetuned"]["accuracy"] > doc["zeroshot"]["accuracy"]
    assert doc["params"] == {"epochs": 2, "lr": None, "model": "lageo-tiny"}
    assert doc["data"] == {"train": 10, "val": 2, "test": 160}
    assert doc["comparison"]["a"] == "finetuned" and doc["comparison"]["difference"] > 0
    assert json.loads(json.dumps(doc, allow_nan=False)) == doc
    with pytest.raises(ValueError, match="val"):
        metrics_json(zeroshot, finetuned, SMALL_REGIONS, {}, {"train": 1, "test": 1}, n_boot=10)



def test_trained_untrained_breakdown_matches_a_direct_count():
    from lageo_utils.metrics import calibration_summary, trained_untrained

    table = pd.DataFrame({
        "true_region": ["a", "a", "b", "b", "c", "c", "c", "c"],
        "pred_region": ["a", "b", "b", "b", "a", "c", "b", "c"],
        "location_id": ["p1", "p1", "p2", "p2", "p3", "p3", "p4", "p4"],
    })
    table["correct"] = table["true_region"] == table["pred_region"]
    table["confidence"], table["confidence_uncalibrated"], table["error_km"] = 0.9, 0.99, 1.0
    result = trained_untrained(table, ["a", "b"], n_boot=200, seed=1)
    assert result["trained"]["n_images"] == 4 and result["trained"]["accuracy"] == 3 / 4
    assert result["untrained"]["accuracy"] == 2 / 4 and result["untrained"]["pulled_into_trained"] == 2 / 4
    assert result["untrained"]["regions"] == ["c"] and result["trained"]["recall_macro"] == (1 / 2 + 1) / 2
    lo, hi = result["untrained"]["ci"]["pulled_into_trained"]
    assert 0 <= lo <= 0.5 <= hi <= 1
    assert trained_untrained(table, ["a", "b", "c"], n_boot=50)["untrained"] is None

    table.attrs["temperature"] = 2.0
    summary = calibration_summary(table)
    assert summary["temperature"] == 2.0 and summary["ece_uncalibrated"] > summary["ece"]


def test_metrics_json_without_a_zero_shot_model():
    """An image-only backbone has no zero-shot predictions: the fine-tuned model only, no comparison."""
    finetuned = random_preds(40, 0.7, seed=6)
    doc = metrics_json(None, finetuned, SMALL_REGIONS, {}, {"train": 10, "val": 2, "test": 40}, n_boot=20)
    assert "zeroshot" not in doc and "comparison" not in doc
    assert M_KEYS <= set(doc["finetuned"]) and doc["bootstrap"]["resampled"] == "location_id"
    with_zeroshot = metrics_json(random_preds(40, 0.3, seed=6), finetuned, SMALL_REGIONS, {},
                                 {"train": 10, "val": 2, "test": 40}, n_boot=20)
    assert doc["finetuned"] == with_zeroshot["finetuned"] and doc["bootstrap"] == with_zeroshot["bootstrap"]
