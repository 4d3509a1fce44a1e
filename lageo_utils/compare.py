"""Runs side by side (``lageo compare``): headline metrics with intervals, what differs, paired tests.

One row per run x model (and coordinate method, where the run has them); the parameters that
differ between the runs; a figure; and, for runs evaluated on the same test images (the same
SHA-256 of ``test.csv``), paired bootstrap differences of each model they share.
"""

from __future__ import annotations

import base64
import json
from itertools import combinations
from pathlib import Path

import pandas as pd
import yaml

from lageo_utils.files import atomic_write
from lageo_utils.metrics import compare_models
from lageo_utils.runs import RunDir, RunError

ROW_METRICS = ("accuracy", "f1_macro", "median_error_km")


def load_run(path: str | Path) -> tuple[RunDir, dict, dict]:
    """A finished run: its directory, ``params.yaml`` document and ``metrics.json``."""
    run = RunDir(Path(path).resolve())
    if not run.metrics.is_file():
        raise RunError(f"{run}: no {run.metrics.name}; only evaluated runs (step 04 done) can be compared")
    return run, yaml.safe_load(run.params_file.read_text()), json.loads(run.metrics.read_text())


def comparison_rows(runs: list[tuple[RunDir, dict, dict]]) -> pd.DataFrame:
    """One row per run x model (x coordinate method): headline metrics and their 95% intervals."""
    rows = []
    for run, _, metrics in runs:
        classified = _models(metrics)
        # an image-only backbone's frozen model has coordinate answers (retrieval, geocell, GeoCLIP) but no classes
        for model in [*classified, *(m for m in metrics.get("methods", {}) if m not in classified)]:
            if model in classified:
                m = metrics[model]
                row = {"run": run.name, "model": model, "method": "region (centroid)", "n_images": m["n_images"]}
                for name in ROW_METRICS:
                    row[name] = m[name]
                    low, high = (m.get("ci", {}).get(name) or [None, None])
                    row[f"{name}_ci95"] = None if low is None else f"[{low:.3f}, {high:.3f}]"
                row["acc_at_1km"] = m["acc_at_km"]["1"]
                rows.append(row)
            for method, values in metrics.get("methods", {}).get(model, {}).items():
                if method == "centroid":
                    continue
                low, high = values.get("median_error_km_ci95") or [None, None]
                rows.append({"run": run.name, "model": model, "method": method, "n_images": values["n_images"],
                             "median_error_km": values.get("median_error_km"),
                             "median_error_km_ci95": None if low is None else f"[{low:.3f}, {high:.3f}]",
                             "acc_at_1km": values.get("acc_at_km", {}).get("1")})
    return pd.DataFrame(rows)


def differing_params(runs: list[tuple[RunDir, dict, dict]]) -> pd.DataFrame:
    """The parameters whose values are not the same in every run (rows: parameter, columns: run)."""
    table = pd.DataFrame({run.name: doc["params"] for run, doc, _ in runs})
    differs = table.astype(str).nunique(axis=1) > 1
    return table[differs]


def paired_comparisons(runs: list[tuple[RunDir, dict, dict]], n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Accuracy differences of each model two runs share, paired on the same test images."""
    rows = []
    for (run_a, _, m_a), (run_b, _, m_b) in combinations(runs, 2):
        if _test_hash(run_a) != _test_hash(run_b):
            continue
        for model in sorted(set(_models(m_a)) & set(_models(m_b))):
            a, b = (pd.read_parquet(run.predictions(model)) for run in (run_a, run_b))
            result = compare_models(a, b, n_boot=n_boot, seed=seed)
            rows.append({"run_a": run_a.name, "run_b": run_b.name, "model": model, "metric": result["metric"],
                         "a": result["value_a"], "b": result["value_b"], "a_minus_b": result["difference"],
                         "ci95": f"[{result['ci'][0]:+.3f}, {result['ci'][1]:+.3f}]"})
    return pd.DataFrame(rows)


def write_comparison(paths: list[str | Path], out_dir: str | Path, n_boot: int = 1000, seed: int = 0) -> Path:
    """``comparison.csv`` and a self-contained ``comparison.html`` in ``out_dir``; returns the HTML path."""
    from lageo_utils.figures import comparison_bar, save_figure

    if len(paths) < 2:
        raise RunError("give at least two run directories to compare")
    runs = [load_run(p) for p in paths]
    rows = comparison_rows(runs)
    params = differing_params(runs)
    paired = paired_comparisons(runs, n_boot=n_boot, seed=seed)
    out = Path(out_dir)
    atomic_write(out / "comparison.csv", lambda tmp: rows.to_csv(tmp, index=False))
    labelled = {f"{run.name} · {model}": metrics[model] for run, _, metrics in runs for model in _models(metrics)}
    png = save_figure(comparison_bar(labelled), out / "comparison.png")
    image = base64.b64encode(png.read_bytes()).decode()
    html = "\n".join([
        "<!doctype html><html><head><meta charset='utf-8'><title>lageo: runs compared</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1200px} table{border-collapse:collapse}"
        " td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}</style></head><body>",
        f"<h1>{len(runs)} runs compared</h1>",
        "<h2>Headline metrics (95% bootstrap intervals over capture points)</h2>", rows.to_html(index=False, na_rep=""),
        "<h2>Parameters that differ</h2>",
        params.to_html() if len(params) else "<p>None: the runs share every parameter.</p>",
        "<h2>Paired comparisons (same test images)</h2>",
        paired.to_html(index=False) if len(paired) else "<p>No two runs share their test images.</p>",
        f"<h2>Figure</h2><img alt='metrics of each run and model' src='data:image/png;base64,{image}'>",
        "</body></html>",
    ])
    return atomic_write(out / "comparison.html", lambda tmp: tmp.write_text(html, encoding="utf-8"))


def _models(metrics: dict) -> list[str]:
    return [key for key, value in metrics.items() if isinstance(value, dict) and "accuracy" in value]


def _test_hash(run: RunDir) -> str | None:
    return json.loads(run.data_file.read_text())["sha256"].get("test.csv") if run.data_file.is_file() else None
