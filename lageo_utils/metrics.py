"""Evaluation metrics for a predictions table: classification, distance, calibration, uncertainty.

A predictions table has one row per image with at least ``true_region``, ``pred_region``,
``confidence`` and ``error_km`` (see the project's predictions contract); ``location_id``
groups the headings of one capture point for the bootstrap. ``regions`` is the region
GeoDataFrame (or a plain list of region ids): every region is a label, so a region absent
from the test set still appears (support 0) and counts as 0 in the macro averages.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, precision_recall_fscore_support
from tqdm.auto import tqdm

from lageo_utils.geo import DEFAULT_THRESHOLDS_KM, acc_at_km

REQUIRED_COLUMNS = ["true_region", "pred_region", "confidence", "error_km"]
ECE_BINS = 15
CI_METRICS = ("accuracy", "f1_macro", "median_error_km", "acc_at_km")

# A custom bootstrap metric: (predictions, per-row resampling weights) -> a number or a dict of numbers.
MetricFn = Callable[[pd.DataFrame, np.ndarray], float | dict[str, float]]


def compute_metrics(predictions: pd.DataFrame, regions) -> dict:
    """The metrics dict M: accuracy, macro/weighted P/R/F1, ACC@km, error km, ECE and per-region scores."""
    _check(predictions)
    ids, _ = _labels(regions, predictions)
    y_true, y_pred = predictions["true_region"], predictions["pred_region"]
    errors = predictions["error_km"].to_numpy(dtype=float)
    m: dict = {"n_images": len(predictions), "accuracy": float(accuracy_score(y_true, y_pred))}
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=ids, average=average, zero_division=0)
        m.update({f"precision_{average}": float(p), f"recall_{average}": float(r), f"f1_{average}": float(f)})
    m["acc_at_km"] = acc_at_km(errors)
    m["median_error_km"] = float(np.median(errors))
    m["mean_error_km"] = float(np.mean(errors))
    m["ece"] = expected_calibration_error(predictions)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=ids, average=None, zero_division=0)
    m["per_region"] = {
        rid: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        for i, rid in enumerate(ids)
    }
    return m


def reliability_table(predictions: pd.DataFrame, n_bins: int = ECE_BINS) -> pd.DataFrame:
    """Top-1 confidence in ``n_bins`` equal-width bins: mean confidence, accuracy and count per bin.

    Bin ``b`` holds confidences in ``(b/n, (b+1)/n]`` (a confidence of 0 goes to bin 0); empty
    bins are listed with count 0 and NaN confidence and accuracy. Hand-written because
    scikit-learn's ``calibration_curve`` drops empty bins and does not return the counts.
    """
    _check(predictions)
    confidence = predictions["confidence"].to_numpy(dtype=float)
    correct = (predictions["true_region"] == predictions["pred_region"]).to_numpy(dtype=float)
    bins = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    grouped = pd.DataFrame({"bin": bins, "confidence": confidence, "accuracy": correct}).groupby("bin")
    table = grouped.agg(confidence=("confidence", "mean"), accuracy=("accuracy", "mean"), count=("bin", "size"))
    table = table.reindex(range(n_bins)).rename_axis("bin").reset_index()
    table["count"] = table["count"].fillna(0).astype(int)
    table.insert(1, "lower", table["bin"] / n_bins)
    table.insert(2, "upper", (table["bin"] + 1) / n_bins)
    return table


def expected_calibration_error(predictions: pd.DataFrame, n_bins: int = ECE_BINS) -> float:
    """ECE of the top-1 confidence: sum over bins of (share of images) x |accuracy - mean confidence|."""
    table = reliability_table(predictions, n_bins)
    used = table[table["count"] > 0]
    gap = (used["accuracy"] - used["confidence"]).abs()
    return float((gap * used["count"]).sum() / used["count"].sum())


def classification_report_text(predictions: pd.DataFrame, regions, digits: int = 2) -> str:
    """The per-region report in the seed's layout (scikit-learn's), rows named by region display name."""
    _check(predictions)
    ids, names = _labels(regions, predictions)
    return classification_report(
        predictions["true_region"], predictions["pred_region"], labels=ids, target_names=names,
        digits=digits, zero_division=0,
    )


def confusion(predictions: pd.DataFrame, regions) -> pd.DataFrame:
    """Confusion counts: rows are true regions, columns predicted regions, both by display name."""
    _check(predictions)
    ids, names = _labels(regions, predictions)
    counts = confusion_matrix(predictions["true_region"], predictions["pred_region"], labels=ids)
    return pd.DataFrame(
        counts, index=pd.Index(names, name="true"), columns=pd.Index(names, name="predicted")
    )


def bootstrap_ci(
    predictions: pd.DataFrame,
    metrics: Sequence[str] | Mapping[str, MetricFn] = CI_METRICS,
    *,
    regions=None,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    group: str | None = "location_id",
) -> dict:
    """Percentile bootstrap confidence intervals, resampling capture points when ``group`` exists.

    ``metrics`` names built-ins (``accuracy``, ``f1_macro``, ``f1_weighted``, ``median_error_km``,
    ``mean_error_km``, ``acc_at_km``) or maps names to functions ``fn(predictions, weights)``
    whose ``weights`` are each row's multiplicity in the resample. The headings of one capture
    point are not independent, so whole ``group`` clusters are drawn when that column exists
    (else single images). Returns ``{name: [lo, hi]}``, nested like M for ``acc_at_km``.
    """
    _check(predictions)
    fns = _metric_fns(metrics, regions, predictions)
    clusters = _clusters(predictions, group)
    samples = [_flatten({k: fn(w) for k, fn in fns.items()}) for w in _resample(clusters, n_boot, seed)]
    values = pd.DataFrame(samples)
    tail = (1 - ci) / 2 * 100
    bounds = {k: [_float(np.nanpercentile(v, tail)), _float(np.nanpercentile(v, 100 - tail))] for k, v in values.items()}
    return _unflatten(bounds)


def compare_models(
    pred_a: pd.DataFrame,
    pred_b: pd.DataFrame,
    *,
    metric: str = "accuracy",
    regions=None,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    group: str | None = "location_id",
) -> dict:
    """Paired bootstrap of ``metric(a) - metric(b)`` on the same images: both models see each resample.

    The tables are matched on ``image_path`` and must hold the same images; ``metric`` is a
    scalar built-in of ``bootstrap_ci`` (e.g. ``accuracy``, ``f1_macro``, ``median_error_km``).
    """
    if metric == "acc_at_km":
        raise ValueError("compare_models needs a scalar metric; acc_at_km is a dict of thresholds")
    _check(pred_a)
    _check(pred_b)
    a, b = _paired(pred_a, pred_b)
    if regions is None:
        regions = _labels(None, pd.concat([a, b]))[0]
    fn_a = _metric_fns([metric], regions, a)[metric]
    fn_b = _metric_fns([metric], regions, b)[metric]
    diffs = np.array([fn_a(w) - fn_b(w) for w in _resample(_clusters(a, group), n_boot, seed)], dtype=float)
    tail = (1 - ci) / 2 * 100
    ones = np.ones(len(a), dtype=int)
    value_a, value_b = fn_a(ones), fn_b(ones)
    return {
        "metric": metric,
        "value_a": _float(value_a),
        "value_b": _float(value_b),
        "difference": _float(value_a - value_b),
        "ci": [_float(np.percentile(diffs, tail)), _float(np.percentile(diffs, 100 - tail))],
        "ci_level": ci,
        "n_boot": n_boot,
        "resampled": group if group in a.columns else "image",
    }


def metrics_json(
    zeroshot_preds: pd.DataFrame | None,
    finetuned_preds: pd.DataFrame,
    regions,
    params: Mapping,
    data_counts: Mapping,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> dict:
    """The ``metrics.json`` document: M (with a ``ci`` dict) per model, params, data counts, comparison.

    ``comparison`` is the paired bootstrap of fine-tuned minus zero-shot accuracy; ``bootstrap``
    records how the intervals were drawn. Without zero-shot predictions (an image-only backbone)
    the document has no ``zeroshot`` and no ``comparison``. The result is JSON-safe: numpy scalars become Python
    numbers and NaN/inf become None.
    """
    missing = [k for k in ("train", "val", "test") if k not in data_counts]
    if missing:
        raise ValueError(f"data_counts lacks {missing}: it needs the train, val and test image counts")
    doc: dict = {}
    for name, preds in (("zeroshot", zeroshot_preds), ("finetuned", finetuned_preds)):
        if preds is None:
            continue
        m = compute_metrics(preds, regions)
        m["ci"] = bootstrap_ci(preds, regions=regions, n_boot=n_boot, seed=seed, ci=ci)
        doc[name] = m
    doc["params"] = dict(params)
    doc["data"] = dict(data_counts)
    resampled = "location_id" if "location_id" in finetuned_preds.columns else "image"  # as bootstrap_ci draws
    if zeroshot_preds is not None:
        comparison = compare_models(finetuned_preds, zeroshot_preds, regions=regions, n_boot=n_boot, seed=seed, ci=ci)
        doc["comparison"] = {"a": "finetuned", "b": "zeroshot", **comparison}
        resampled = comparison["resampled"]
    doc["bootstrap"] = {"n_boot": n_boot, "seed": seed, "ci_level": ci, "resampled": resampled}
    return to_json_safe(doc)


def to_json_safe(obj):
    """Recursively convert numpy/pandas values to JSON types; NaN and infinities become None."""
    if isinstance(obj, Mapping):
        return {str(k): to_json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | np.ndarray | pd.Series):
        return [to_json_safe(v) for v in obj]
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return _float(obj)
    if obj is None or isinstance(obj, str):
        return obj
    if obj is pd.NA or obj is pd.NaT:
        return None
    return str(obj)


# -- built-in bootstrap metrics: weighted versions of the M entries -------------------------


def _metric_fns(metrics, regions, predictions: pd.DataFrame) -> dict[str, Callable[[np.ndarray], object]]:
    """Bind each metric to one predictions table: ``fn(weights) -> value``."""
    if isinstance(metrics, Mapping):
        return {name: partial(fn, predictions) for name, fn in metrics.items()}
    ids, _ = _labels(regions, predictions)
    builtins = _builtin_metrics(predictions, ids)
    unknown = [m for m in metrics if m not in builtins]
    if unknown:
        raise ValueError(f"unknown bootstrap metrics {unknown}; built-ins are {sorted(builtins)}")
    return {m: builtins[m] for m in metrics}


def _builtin_metrics(predictions: pd.DataFrame, ids: list[str]) -> dict[str, Callable[[np.ndarray], object]]:
    """Weighted accuracy, F1, error and ACC@km computed from label codes with bincounts.

    Hand-written because the bootstrap calls them thousands of times and scikit-learn's input
    validation costs about 10 ms a call; the tests check them against scikit-learn's values.
    """
    codes = {rid: i for i, rid in enumerate(ids)}
    true = predictions["true_region"].map(codes).to_numpy(dtype=int)
    pred = predictions["pred_region"].map(codes).to_numpy(dtype=int)
    correct = true == pred
    errors = predictions["error_km"].to_numpy(dtype=float)
    k = len(ids)

    def f1_per_region(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        tp = np.bincount(true[correct], weights=w[correct], minlength=k)
        support = np.bincount(true, weights=w, minlength=k)
        predicted = np.bincount(pred, weights=w, minlength=k)
        denominator = support + predicted  # F1 = 2 TP / (2 TP + FP + FN) = 2 TP / (support + predicted)
        f1 = np.divide(2 * tp, denominator, out=np.zeros(k), where=denominator > 0)
        return f1, support

    def f1_weighted(w: np.ndarray) -> float:
        f1, support = f1_per_region(w)
        return float(np.sum(f1 * support) / support.sum())

    def repeated_errors(w: np.ndarray) -> np.ndarray:
        return np.repeat(errors, w.astype(int))

    return {
        "accuracy": lambda w: float(np.sum(w * correct) / np.sum(w)),
        "f1_macro": lambda w: float(np.mean(f1_per_region(w)[0])),
        "f1_weighted": f1_weighted,
        "median_error_km": lambda w: float(np.median(repeated_errors(w))),
        "mean_error_km": lambda w: float(np.average(errors, weights=w)),
        "acc_at_km": lambda w: acc_at_km(repeated_errors(w), DEFAULT_THRESHOLDS_KM),
    }


# -- resampling ---------------------------------------------------------------------------------


def _clusters(predictions: pd.DataFrame, group: str | None) -> np.ndarray:
    """Integer cluster code per row: its capture point when ``group`` is a column, else the row itself."""
    if group and group in predictions.columns:
        if predictions[group].isna().any():
            raise ValueError(f"predictions column {group!r} has missing values; fill it or pass group=None")
        return pd.factorize(predictions[group])[0]
    return np.arange(len(predictions))


def _resample(clusters: np.ndarray, n_boot: int, seed: int):
    """Yield per-row weights of ``n_boot`` cluster bootstrap resamples.

    Hand-written: scipy.stats.bootstrap resamples independent observations, not clusters of rows.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, not {n_boot}")
    n_clusters = int(clusters.max()) + 1
    rng = np.random.default_rng(seed)
    for _ in tqdm(range(n_boot), desc="bootstrap", unit="resample", leave=False):
        drawn = np.bincount(rng.integers(0, n_clusters, n_clusters), minlength=n_clusters)
        yield drawn[clusters]


def _paired(pred_a: pd.DataFrame, pred_b: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    for name, df in (("pred_a", pred_a), ("pred_b", pred_b)):
        if "image_path" not in df.columns:
            raise ValueError(f"{name}: compare_models needs an 'image_path' column to pair the images")
        if df["image_path"].duplicated().any():
            raise ValueError(f"{name}: duplicate image_path values, cannot pair the images")
    unpaired = set(pred_a["image_path"]) ^ set(pred_b["image_path"])
    if unpaired:
        raise ValueError(f"the two prediction tables hold different images, e.g. {sorted(unpaired)[:3]}")
    b = pred_b.set_index("image_path").loc[pred_a["image_path"]].reset_index()
    return pred_a.reset_index(drop=True), b


# -- helpers ------------------------------------------------------------------------------------


def _check(predictions: pd.DataFrame) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in predictions.columns]
    if missing:
        raise ValueError(f"predictions table lacks columns {missing} (has {list(predictions.columns)})")
    if len(predictions) == 0:
        raise ValueError("predictions table is empty: no metrics can be computed")


def _labels(regions, predictions: pd.DataFrame) -> tuple[list[str], list[str]]:
    """Region ids (class order) and display names; ``None`` means the labels seen in the predictions."""
    if regions is None:
        ids = sorted(map(str, set(predictions["true_region"]) | set(predictions["pred_region"])))
        return ids, ids
    if isinstance(regions, pd.DataFrame):
        ids = regions["id"].astype(str).tolist()
        names = regions["name"].astype(str).tolist() if "name" in regions.columns else ids
    else:
        ids = [str(r) for r in regions]
        names = ids
    unknown = sorted(map(str, (set(predictions["true_region"]) | set(predictions["pred_region"])) - set(ids)))
    if unknown:
        raise ValueError(f"predictions name regions that are not in the region list: {unknown}")
    return ids, names


def _flatten(values: Mapping) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            out.update({f"{key}\x00{k}": float(v) for k, v in value.items()})
        else:
            out[key] = float(value)
    return out


def _unflatten(values: Mapping) -> dict:
    out: dict = {}
    for key, value in values.items():
        outer, _, inner = key.partition("\x00")
        if inner:
            out.setdefault(outer, {})[inner] = value
        else:
            out[outer] = value
    return out


def _float(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def trained_untrained(predictions: pd.DataFrame, train_regions: Sequence[str], *, n_boot: int = 1000, seed: int = 0,
                      ci: float = 0.95) -> dict:
    """A model on the regions fine-tuning saw and on the others, each with a bootstrap interval over capture points.

    ``trained``/``untrained``: images, accuracy, macro recall over the regions present; for the
    untrained regions also ``pulled_into_trained``, the share of their images answered with a
    trained region (what fine-tuning on some regions does to the rest).
    """
    trained = set(train_regions)
    inside = predictions["true_region"].isin(trained).to_numpy()
    result = {}
    for name, mask in (("trained", inside), ("untrained", ~inside)):
        part = predictions[mask].reset_index(drop=True)
        if part.empty:
            result[name] = None
            continue
        fns: dict[str, MetricFn] = {"accuracy": lambda df, w: float(np.average(df["correct"], weights=w))}
        if name == "untrained":
            fns["pulled_into_trained"] = lambda df, w: float(np.average(df["pred_region"].isin(trained), weights=w))
        bounds = bootstrap_ci(part, fns, n_boot=n_boot, seed=seed, ci=ci)
        present = sorted(part["true_region"].unique())
        result[name] = {
            "n_images": len(part),
            "regions": present,
            "accuracy": float(part["correct"].mean()),
            "recall_macro": float(precision_recall_fscore_support(part["true_region"], part["pred_region"],
                                                                  labels=present, average="macro",
                                                                  zero_division=0)[1]),
            "ci": bounds,
        }
        if name == "untrained":
            result[name]["pulled_into_trained"] = float(part["pred_region"].isin(trained).mean())
    return result


def calibration_summary(predictions: pd.DataFrame) -> dict:
    """Temperature scaling's effect on the test split: the fitted temperature and the ECE before and after."""
    before = predictions.assign(confidence=predictions["confidence_uncalibrated"])
    return {"temperature": float(predictions.attrs.get("temperature", 1.0)),
            "ece_uncalibrated": expected_calibration_error(before), "ece": expected_calibration_error(predictions)}
