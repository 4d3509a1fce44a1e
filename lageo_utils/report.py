"""Pieces of the rendered report (notebook 05): headers, tables and embedded figures.

Functions return Markdown strings, DataFrames or IPython images; notebook 05 only displays them.
"""

from __future__ import annotations

import json

import pandas as pd
import yaml
from IPython.display import Image

from lageo_utils.runs import MODEL_LABELS, RunDir

COMPARISON_COLUMNS = {
    "accuracy": "Accuracy",
    "precision_macro": "Precision (macro)",
    "recall_macro": "Recall (macro)",
    "f1_macro": "F1 (macro)",
    "precision_weighted": "Precision (weighted)",
    "recall_weighted": "Recall (weighted)",
    "f1_weighted": "F1 (weighted)",
}


def is_demo(params: dict) -> bool:
    """Synthetic images or random weights: numbers show the pipeline, not geolocation skill."""
    return params.get("data_source") == "demo" or str(params.get("pretrained")).lower() in ("none", "null")


def load_metrics(run: RunDir) -> dict:
    return json.loads(run.metrics.read_text())


def header(run: RunDir, params: dict) -> str:
    """Title, run id and date, with a plain warning at the top of demo reports."""
    doc = yaml.safe_load(run.params_file.read_text())
    lines = [
        "# LA County sub-city geolocation with CLIP",
        f"Run `{doc['run_id']}` · created {doc['created_utc']} · model `{params['model']}` "
        f"(weights: `{params['pretrained']}`) · fine-tuning strategy `{params['strategy']}`, "
        f"{params['epochs']} epochs",
    ]
    if is_demo(params):
        lines.append(
            "> **Demo run — not a geolocation result.** The images are synthetic street scenes drawn by "
            "`lageo_utils.demo`, and the model starts from random weights (`--pretrained none`). The "
            "figures show that the pipeline works end to end; they say nothing about how well CLIP "
            "geolocates real photos."
        )
    return "\n\n".join(lines)


def comparison_table(metrics: dict) -> pd.DataFrame:
    """Zero-shot vs fine-tuned: classification, distance and calibration metrics (95% CI where computed)."""
    rows = {}
    for key, label in MODEL_LABELS.items():
        m = metrics[key]
        ci = m.get("ci", {})
        row = {col: _with_ci(m[k], ci.get(k)) for k, col in COMPARISON_COLUMNS.items()}
        for t, v in m["acc_at_km"].items():
            row[f"ACC@{t} km"] = _with_ci(v, ci.get("acc_at_km", {}).get(t))
        row["Median error (km)"] = _with_ci(m["median_error_km"], ci.get("median_error_km"), digits=2)
        row["Mean error (km)"] = _fmt(m["mean_error_km"], 2)
        row["ECE"] = _fmt(m["ece"])
        row["Images"] = m["n_images"]
        rows[label] = row
    return pd.DataFrame(rows).T


def comparison_markdown(metrics: dict) -> str:
    """The paired bootstrap of the accuracy gain, in one sentence."""
    c = metrics.get("comparison")
    if not c or c.get("difference") is None:
        return ""
    lo, hi = c["ci"]
    return (
        f"Fine-tuned minus zero-shot {c['metric']}: **{c['difference']:+.3f}** "
        f"({c['ci_level']:.0%} CI [{lo:+.3f}, {hi:+.3f}], paired bootstrap over {c['resampled']} clusters, "
        f"{c['n_boot']} resamples)."
    )


def classification_report(run: RunDir, model: str) -> str:
    """The per-region report in the seed's layout, as written by step 04."""
    return run.classification_report(model).read_text()


def classification_reports_markdown(run: RunDir) -> str:
    return "\n\n".join(
        f"**{label}**\n\n```\n{classification_report(run, key)}\n```" for key, label in MODEL_LABELS.items()
    )


def figure(run: RunDir, name: str) -> Image:
    """A saved figure, embedded in the notebook (and so in the single-file HTML report)."""
    return Image(filename=str(run.figure(name)), embed=True, alt=name.replace("_", " "))


def training_summary(run: RunDir) -> pd.Series:
    return pd.Series(json.loads(run.train_summary.read_text()), name="value", dtype=object)


def data_markdown(run: RunDir) -> str:
    data = json.loads(run.data_file.read_text())
    audit = json.loads(run.audit.read_text())
    counts = " · ".join(f"{k}: {v}" for k, v in data["counts"].items())
    lines = [
        f"Images per split: {counts}.",
        f"Leakage audit of the test split: {audit['exact_train_coordinate']} of {audit['test_images']} test "
        f"images share an exact coordinate with a training image, {audit['within_50m_of_train']} lie within "
        f"50 m of one, {audit['beyond_50m_from_train']} farther.",
        "Manifest checksums (SHA-256): " + ", ".join(f"`{k}` {v[:12]}…" for k, v in data["sha256"].items()),
    ]
    lines += [f"- note: {m}" for m in data["manifest_report"][:20]]
    return "\n\n".join(lines)


def run_markdown(run: RunDir, params: dict) -> str:
    doc = yaml.safe_load(run.params_file.read_text())
    prov = doc["provenance"]
    table = "\n".join(f"| `{k}` | `{v}` |" for k, v in params.items())
    versions = ", ".join(f"{k} {v}" for k, v in prov["versions"].items())
    return (
        f"Run id `{doc['run_id']}`, created {doc['created_utc']}, git commit `{prov['git_commit']}`, "
        f"platform {prov['platform']}.\n\nSoftware: {versions}.\n\n| parameter | value |\n|---|---|\n{table}"
    )


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _with_ci(value, ci, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if not ci or ci[0] is None:
        return _fmt(value, digits)
    return f"{value:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
