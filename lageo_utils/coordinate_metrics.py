"""Coordinate metrics: street-level distance accuracy with capture-point bootstrap intervals, paired
comparisons against the centroid answer, ceilings, baselines and risk-coverage curves.

An answers table (see :func:`lageo_utils.geolocate.answers_table`) has one row per test image
with ``image_path``, ``error_km``, ``confidence`` and, for the bootstrap, ``location_id``: the
headings of one capture point are resampled together, as in :mod:`lageo_utils.metrics`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from lageo_utils.geo import acc_at_km, haversine_km, nearest_km
from lageo_utils.geolocate import GeoCells, spherical_mean
from lageo_utils.metrics import _clusters, _float, _paired, _resample, to_json_safe

# Street level to city level; the keys ("0.025", ..., "1", "5", "10", "25") extend metrics.json's "1".."25".
COORDINATE_THRESHOLDS_KM = (0.025, 0.1, 0.5, 1, 5, 10, 25)
RISK_COVERAGE_POINTS = 20


# -- summaries with intervals -------------------------------------------------------------------


def coordinate_summary(table: pd.DataFrame, thresholds_km: Sequence[float] = COORDINATE_THRESHOLDS_KM, *,
                       n_boot: int = 1000, seed: int = 0, ci: float = 0.95, group: str | None = "location_id",
                       name: str = "answers") -> dict:
    """ACC@km, median and mean error of one answers table, each with a percentile bootstrap interval.

    Capture points (``group``) are resampled when the column exists, else images. Keys:
    ``n_images``, ``acc_at_km``, ``acc_at_km_ci95``, ``median_error_km``, ``median_error_km_ci95``,
    ``mean_error_km``, ``mean_error_km_ci95`` (the ``ci95`` keys hold the ``ci`` level asked for);
    ``accuracy`` too when the table has ``correct``.
    """
    errors = _errors(table, name)
    thresholds = np.asarray(thresholds_km, float)
    hits = (errors[:, None] <= thresholds[None, :]).astype(float)
    acc_samples, median_samples, mean_samples = [], [], []
    for w in _resample(_clusters(table, group), n_boot, seed):
        acc_samples.append(w @ hits / w.sum())
        median_samples.append(np.median(np.repeat(errors, w)))
        mean_samples.append(np.average(errors, weights=w))
    keys = list(acc_at_km(errors, thresholds))
    acc_lo, acc_hi = _interval(np.array(acc_samples), ci)
    out = {
        "n_images": len(errors),
        "acc_at_km": acc_at_km(errors, thresholds),
        "acc_at_km_ci95": {k: [lo, hi] for k, lo, hi in zip(keys, acc_lo, acc_hi)},
        "median_error_km": float(np.median(errors)),
        "median_error_km_ci95": list(_interval(np.array(median_samples), ci)),
        "mean_error_km": float(np.mean(errors)),
        "mean_error_km_ci95": list(_interval(np.array(mean_samples), ci)),
    }
    if "correct" in table.columns:
        out["accuracy"] = float(table["correct"].astype(float).mean())
    return out


def paired_difference(table: pd.DataFrame, reference: pd.DataFrame,
                      thresholds_km: Sequence[float] = COORDINATE_THRESHOLDS_KM, *, n_boot: int = 1000, seed: int = 0,
                      ci: float = 0.95, group: str | None = "location_id", name: str = "answers") -> dict:
    """Paired bootstrap of ``table - reference`` on the same images (matched on ``image_path``).

    ``{"acc_at_km": {t: {"difference", "ci"}}, "median_error_km": {...}, "mean_error_km": {...}}``:
    a positive ACC difference and a negative error difference favour ``table``.
    """
    a, b = _paired(table, reference)
    err_a, err_b = _errors(a, name), _errors(b, f"{name} (reference)")
    thresholds = np.asarray(thresholds_km, float)
    hits = (err_a[:, None] <= thresholds).astype(float) - (err_b[:, None] <= thresholds).astype(float)
    acc, median, mean = [], [], []
    for w in _resample(_clusters(a, group), n_boot, seed):
        acc.append(w @ hits / w.sum())
        median.append(np.median(np.repeat(err_a, w)) - np.median(np.repeat(err_b, w)))
        mean.append(np.average(err_a - err_b, weights=w))
    keys = list(acc_at_km(err_a, thresholds))
    acc_lo, acc_hi = _interval(np.array(acc), ci)
    point = hits.mean(axis=0)
    return {
        "acc_at_km": {k: {"difference": float(d), "ci": [lo, hi]} for k, d, lo, hi in zip(keys, point, acc_lo, acc_hi)},
        "median_error_km": {"difference": float(np.median(err_a) - np.median(err_b)),
                            "ci": list(_interval(np.array(median), ci))},
        "mean_error_km": {"difference": float(np.mean(err_a - err_b)), "ci": list(_interval(np.array(mean), ci))},
        "resampled": group if group and group in a.columns else "image",
    }


# -- abstention ---------------------------------------------------------------------------------


def risk_coverage(table: pd.DataFrame, thresholds_km: Sequence[float] = COORDINATE_THRESHOLDS_KM,
                  points: int = RISK_COVERAGE_POINTS, name: str = "answers") -> dict:
    """Accuracy and median error of the most confident answers as coverage shrinks.

    Answers are ranked by ``confidence`` (ties keep table order); coverage c keeps the top
    ``ceil(c * n)`` of them, for c = 1/points, ..., 1. ``aurc`` is the area under the
    risk-coverage curve with risk = 1 - ACC@t, computed exactly (the mean selective risk over
    every number of kept answers; lower is better); ``aurc_median_error_km`` is the mean of the
    median error over the coverage grid. With a ``correct`` column (region right) the region
    ``accuracy`` is traced too.
    """
    errors = _errors(table, name)
    if "confidence" not in table.columns:
        raise ValueError(f"{name}: risk-coverage needs a 'confidence' column")
    order = np.argsort(-table["confidence"].to_numpy(float), kind="stable")
    errors, confidence = errors[order], table["confidence"].to_numpy(float)[order]
    n = len(errors)
    kept = np.maximum(1, np.ceil(np.arange(1, points + 1) / points * n).astype(int))
    thresholds = np.asarray(thresholds_km, float)
    keys = list(acc_at_km(errors, thresholds))
    cumulative = np.cumsum(errors[:, None] <= thresholds, axis=0) / np.arange(1, n + 1)[:, None]  # ACC of the top i
    medians = [float(np.median(errors[:m])) for m in kept]
    out = {
        "coverage": (kept / n).tolist(),
        "min_confidence": confidence[kept - 1].tolist(),
        "acc_at_km": {k: cumulative[kept - 1, j].tolist() for j, k in enumerate(keys)},
        "median_error_km": medians,
        "aurc": {k: float(np.mean(1 - cumulative[:, j])) for j, k in enumerate(keys)},
        "aurc_median_error_km": float(np.mean(medians)),
    }
    if "correct" in table.columns:
        correct = table["correct"].to_numpy(float)[order]
        out["accuracy"] = (np.cumsum(correct)[kept - 1] / kept).tolist()
    return out


# -- ceilings and baselines ---------------------------------------------------------------------


def centroid_ceiling_km(lat, lon, true_region, centroids) -> np.ndarray:
    """Error of the centroid answer with every region right: distance to the true region's centroid."""
    centroids = np.asarray(centroids, float)
    true_region = np.asarray(true_region, dtype=np.int64)
    return haversine_km(lat, lon, centroids[true_region, 0], centroids[true_region, 1])


def retrieval_ceiling_km(lat, lon, gallery_lat, gallery_lon) -> np.ndarray:
    """Distance to the nearest gallery image: the best any answer that returns one gallery image can do.

    A weighted mean of several neighbours (retrieval with k > 1) can land closer than every
    gallery image, so this bounds k = 1 retrieval exactly and weighted retrieval only roughly.
    """
    return nearest_km(lat, lon, gallery_lat, gallery_lon)[0]


def geocell_ceiling_km(lat, lon, cells: GeoCells, point: str = "centroid") -> np.ndarray:
    """Error of the geocell answer with every cell right: distance to the true cell's training-image centroid
    (``point="centroid"``, the geocell answer) or its H3 centre (``point="centre"``)."""
    if point not in ("centroid", "centre"):
        raise ValueError(f"point must be 'centroid' or 'centre', not {point!r}")
    cell = cells.assign(lat, lon)
    if point == "centroid":
        return haversine_km(lat, lon, cells.lat[cell], cells.lon[cell])
    return haversine_km(lat, lon, cells.centre_lat[cell], cells.centre_lon[cell])


def chance_baseline(lat, lon, centroids, thresholds_km: Sequence[float] = COORDINATE_THRESHOLDS_KM) -> dict:
    """A uniformly random region answered by its centroid: accuracy 1/n_regions and the expected ACC@km
    and mean error (averaged exactly over the regions, no sampling)."""
    centroids = np.asarray(centroids, float)
    d = haversine_km(np.asarray(lat, float)[:, None], np.asarray(lon, float)[:, None], centroids[:, 0], centroids[:, 1])
    return {
        "accuracy": 1 / len(centroids),
        "acc_at_km": {k: float(np.mean(d <= t)) for t, k in zip(thresholds_km, acc_at_km([], thresholds_km))},
        "mean_error_km": float(d.mean()),
    }


def reference_tables(test_rows: pd.DataFrame, centroids, region_ids: Sequence[str], gallery_lat, gallery_lon,
                     train_region_ids: Sequence[str], *, cells: GeoCells | None = None,
                     seed: int = 0) -> tuple[dict[str, pd.DataFrame], dict[str, pd.DataFrame]]:
    """Ceiling and baseline error tables for the test images, ready for :func:`coordinate_metrics_json`.

    ``test_rows``: ``image_path``, ``latitude``, ``longitude``, ``region_id`` (and ``location_id``).
    Ceilings: ``centroid``, ``retrieval``, and with ``cells`` ``geocell`` (cell centroid) and
    ``geocell_centre``. Baselines: ``majority_region`` (the training split's most frequent
    region, answered by its centroid), ``fixed_point`` (the gallery's mean coordinate for
    every image), ``random_gallery_image`` (a seeded random gallery image per test image).
    Each table's ``attrs["info"]`` says what it answered.
    """
    missing = [c for c in ("image_path", "latitude", "longitude", "region_id") if c not in test_rows.columns]
    if missing:
        raise ValueError(f"test rows lack column(s) {missing}")
    rows = test_rows.reset_index(drop=True)
    lat, lon = rows["latitude"].to_numpy(float), rows["longitude"].to_numpy(float)
    codes = {r: i for i, r in enumerate(region_ids)}
    true = rows["region_id"].map(codes)
    if true.isna().any():
        i = int(np.flatnonzero(true.isna())[0])
        raise ValueError(f"test row {i} ({rows['image_path'].iloc[i]}) has region_id {rows['region_id'].iloc[i]!r}, "
                         "not in region_ids")
    gallery_lat, gallery_lon = np.asarray(gallery_lat, float), np.asarray(gallery_lon, float)
    keep = [c for c in ("image_path", "location_id") if c in rows.columns]

    def table(errors, **info) -> pd.DataFrame:
        t = rows[keep].assign(error_km=errors)
        t.attrs["info"] = info
        return t

    ceilings = {
        "centroid": table(centroid_ceiling_km(lat, lon, true.to_numpy(int), centroids)),
        "retrieval": table(retrieval_ceiling_km(lat, lon, gallery_lat, gallery_lon)),
    }
    if cells is not None:
        ceilings["geocell"] = table(geocell_ceiling_km(lat, lon, cells, "centroid"))
        ceilings["geocell_centre"] = table(geocell_ceiling_km(lat, lon, cells, "centre"))
    counts = pd.Series(list(train_region_ids)).value_counts()
    majority = str(sorted(counts[counts == counts.max()].index)[0])  # ties: the first id alphabetically
    m_lat, m_lon = np.asarray(centroids, float)[codes[majority]]
    f_lat, f_lon = spherical_mean(gallery_lat, gallery_lon)
    pick = np.random.default_rng(seed).integers(0, len(gallery_lat), len(rows))
    baselines = {
        "majority_region": table(haversine_km(lat, lon, m_lat, m_lon), region=majority,
                                 accuracy=float(np.mean(rows["region_id"].to_numpy() == majority))),
        "fixed_point": table(haversine_km(lat, lon, f_lat, f_lon), lat=float(f_lat), lon=float(f_lon)),
        "random_gallery_image": table(haversine_km(lat, lon, gallery_lat[pick], gallery_lon[pick]), seed=seed),
    }
    return ceilings, baselines


# -- the metrics.json fragment ------------------------------------------------------------------


def coordinate_metrics_json(answers: Mapping[str, Mapping[str, pd.DataFrame]], *,
                            voted: Mapping[str, Mapping[str, pd.DataFrame]] | None = None,
                            ceilings: Mapping[str, pd.DataFrame] | None = None,
                            baselines: Mapping[str, pd.DataFrame | Mapping] | None = None,
                            reference: str = "centroid", thresholds_km: Sequence[float] = COORDINATE_THRESHOLDS_KM,
                            n_boot: int = 1000, seed: int = 0, ci: float = 0.95,
                            group: str | None = "location_id") -> dict:
    """The coordinate part of ``metrics.json`` (JSON-safe), to merge into the existing document.

    ``answers``: model -> method -> answers table (one row per test image); ``voted``: the same
    after capture-point voting (reported as each method's ``per_capture_point``, counted per
    image); ``ceilings``/``baselines``: name -> error table (see :func:`reference_tables`), or a
    ready dict such as :func:`chance_baseline`'s. Keys: ``methods`` {model: {method: summary
    (+ ``per_capture_point``)}}, ``ceilings``, ``baselines``, ``risk_coverage`` {model: {method}},
    ``paired_vs_centroid`` {model: {method: paired difference (+ ``per_capture_point``)}} and
    ``coordinate_bootstrap`` (how the intervals were drawn).
    """
    kw = {"n_boot": n_boot, "seed": seed, "ci": ci, "group": group}
    voted = voted or {}
    doc: dict = {"methods": {}, "ceilings": {}, "baselines": {}, "risk_coverage": {}, "paired_vs_centroid": {}}
    for model, methods in answers.items():
        doc["methods"][model], doc["risk_coverage"][model], doc["paired_vs_centroid"][model] = {}, {}, {}
        model_voted = voted.get(model, {})
        for method, table in methods.items():
            label = f"{model}/{method}"
            summary = coordinate_summary(table, thresholds_km, name=label, **kw)
            if method in model_voted:
                v = model_voted[method]
                summary["per_capture_point"] = {
                    **coordinate_summary(v, thresholds_km, name=f"{label} (voted)", **kw),
                    "n_capture_points": int(v["location_id"].nunique()) if "location_id" in v.columns else len(v),
                }
            doc["methods"][model][method] = summary
            doc["risk_coverage"][model][method] = risk_coverage(table, thresholds_km, name=label)
            if method != reference and reference in methods:
                paired = paired_difference(table, methods[reference], thresholds_km, name=label, **kw)
                if method in model_voted and reference in model_voted:
                    paired["per_capture_point"] = paired_difference(model_voted[method], model_voted[reference],
                                                                    thresholds_km, name=f"{label} (voted)", **kw)
                doc["paired_vs_centroid"][model][method] = paired
    for section, tables in (("ceilings", ceilings or {}), ("baselines", baselines or {})):
        for name, value in tables.items():
            if isinstance(value, pd.DataFrame):
                doc[section][name] = {**value.attrs.get("info", {}),
                                      **coordinate_summary(value, thresholds_km, name=name, **kw)}
            else:
                doc[section][name] = dict(value)
    doc["coordinate_bootstrap"] = {"n_boot": n_boot, "seed": seed, "ci_level": ci, "reference": reference,
                                   "thresholds_km": list(thresholds_km)}
    return to_json_safe(doc)


# -- helpers ------------------------------------------------------------------------------------


def _errors(table: pd.DataFrame, name: str) -> np.ndarray:
    if "error_km" not in table.columns:
        raise ValueError(f"{name}: the answers table has no 'error_km' column (columns: {list(table.columns)})")
    if len(table) == 0:
        raise ValueError(f"{name}: the answers table is empty")
    errors = table["error_km"].to_numpy(float)
    bad = np.flatnonzero(~np.isfinite(errors) | (errors < 0))
    if len(bad):
        where = table["image_path"].iloc[bad[0]] if "image_path" in table.columns else f"row {bad[0]}"
        raise ValueError(f"{name}: error_km of {where} is {errors[bad[0]]}")
    return errors


def _interval(samples: np.ndarray, ci: float) -> tuple:
    """Percentile interval over axis 0 (a pair of floats, or a pair of arrays for 2-D samples)."""
    tail = (1 - ci) / 2 * 100
    lo, hi = np.percentile(samples, tail, axis=0), np.percentile(samples, 100 - tail, axis=0)
    if np.ndim(lo) == 0:
        return _float(lo), _float(hi)
    return [_float(v) for v in lo], [_float(v) for v in hi]
