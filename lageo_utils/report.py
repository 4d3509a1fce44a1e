"""Pieces of the rendered report (notebook 05): headers, tables and embedded figures.

Functions return Markdown strings, DataFrames or IPython images; notebook 05 only displays them.
"""

from __future__ import annotations

import json

import pandas as pd
import yaml
from IPython.display import Image

from lageo_utils.backbones import is_image_only
from lageo_utils.backbones import skipped_markdown as _skipped_markdown
from lageo_utils.runs import MODEL_LABELS, MODELS, RunDir, model_labels, read_params

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
        f"# LA County sub-city geolocation with {params['model'] if is_image_only(params['model']) else 'CLIP'}",
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


def labels_of(metrics: dict) -> dict[str, str]:
    """The models' display names for the run's backbone (``metrics.json`` records its parameters)."""
    return model_labels(metrics.get("params", {}).get("model", ""))


def models_in(metrics: dict) -> list[str]:
    """The models with test predictions: zero-shot and fine-tuned, or only fine-tuned for an image-only backbone."""
    return [model for model in MODELS if model in metrics]


def skipped_markdown(metrics: dict) -> str:
    """The visible note of the text-side methods an image-only backbone skipped, and why (empty for CLIP)."""
    return _skipped_markdown(metrics.get("skipped") or {})


def comparison_table(metrics: dict) -> pd.DataFrame:
    """Zero-shot vs fine-tuned: classification, distance and calibration metrics (95% CI where computed)."""
    rows = {}
    labels = labels_of(metrics)
    for key in models_in(metrics):
        label = labels[key]
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
    labels = model_labels(read_params(run)["model"])
    return "\n\n".join(
        f"**{label}**\n\n```\n{classification_report(run, key)}\n```" for key, label in labels.items()
        if run.classification_report(key).exists()
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


# -- coordinates: where exactly ------------------------------------------------------------------

CEILING_NOTES = {
    "centroid": "every region right, answered by its centroid",
    "retrieval": "the nearest gallery image (what no single gallery answer can beat)",
    "geocell": "every geocell right, answered by its training-image centroid",
    "geocell_centre": "every geocell right, answered by its H3 centre",
}
BASELINE_NOTES = {
    "chance": "a uniformly random region's centroid (expected value)",
    "majority_region": "the training split's most frequent region, its centroid",
    "fixed_point": "one point for every image: the gallery's mean coordinate",
    "random_gallery_image": "a random training image's coordinate",
}


def _threshold_label(key: str) -> str:
    km = float(key)
    return f"ACC@{km * 1000:g} m" if km < 1 else f"ACC@{key} km"


def coordinate_table(metrics: dict) -> pd.DataFrame:
    """Methods x thresholds, with 95% intervals: each model's methods per image and voted per capture
    point, then the ceilings and the baselines on the same test images."""
    rows: dict[tuple[str, str], dict] = {}

    def add(group: str, name: str, summary: dict) -> None:
        ci = summary.get("acc_at_km_ci95", {})
        row = {_threshold_label(k): _with_ci(v, ci.get(k)) for k, v in summary["acc_at_km"].items()}
        row["Median error (km)"] = _with_ci(summary.get("median_error_km"), summary.get("median_error_km_ci95"),
                                            digits=2)
        row["Images"] = summary.get("n_images", "")
        rows[(group, name)] = row

    labels = labels_of(metrics)
    for model, methods in metrics["methods"].items():
        label = labels.get(model, model)
        for method, summary in methods.items():
            add(label, method, summary)
        for method, summary in methods.items():
            if "per_capture_point" in summary:
                add(f"{label}, voted per capture point", method, summary["per_capture_point"])
    for group, section, notes in (("Ceiling", "ceilings", CEILING_NOTES), ("Baseline", "baselines", BASELINE_NOTES)):
        for name, summary in metrics[section].items():
            add(group, f"{name}: {notes.get(name, name)}", summary)
    table = pd.DataFrame(rows).T.fillna("n/a")
    table.index.names = ["", "method"]
    return table


def coordinate_markdown(metrics: dict, params: dict) -> str:
    """What the coordinate numbers mean: the leak under the image-level split, what validation chose,
    and each method against centroid at 1 km (paired bootstrap)."""
    overlap = metrics["gallery_overlap"]
    lines = [
        "Each method answers with coordinates (docs/geolocation.md): `centroid` is the seed's answer (the top "
        "region's centre), `expected` a probability-weighted mean of region centres, `retrieval` the "
        "similarity-weighted coordinates of the nearest training images (the gallery), `region_retrieval` "
        "retrieval inside the predicted region, `geocell` a classifier over fine H3 cells. Every setting (k, "
        "temperature, geocell resolution and smoothing) was chosen on the validation split; the test split "
        "was answered once. Intervals: 95% bootstrap over capture points.",
    ]
    lines += _peer_lines(metrics.get("peers", {}))
    if params.get("split_strategy") == "image":
        lines.append(
            f"> **Retrieval is leaky under the image-level split.** The other headings of a test panorama are in "
            f"the gallery: {overlap['test_images_with_gallery_image_within_1m']} of {overlap['n_test_images']} "
            "test images have a training image within 1 m of their point, so `retrieval`, `region_retrieval` and "
            "`geocell` numbers here overstate what they do on new places. Use `-p split_strategy location` "
            "(and `buffer_m`) for an honest estimate.")
    else:
        lines.append(
            f"Split `{overlap['split_strategy']}`: {overlap['test_images_with_gallery_image_within_1m']} of "
            f"{overlap['n_test_images']} test images have a training image within 1 m of their point "
            f"(buffer_m {params.get('buffer_m', 0)}).")
    labels = labels_of(metrics)
    for model, best in metrics.get("best_method", {}).items():
        if best:
            lines.append(f"{labels.get(model, model)}: best method on validation **{best}** (the maps show it "
                         "beside centroid).")
    paired = []
    for model, methods in metrics["paired_vs_centroid"].items():
        for method, diff in methods.items():
            d = diff["acc_at_km"].get("1")
            if d is None:
                continue
            lo, hi = d["ci"]
            verdict = "better" if lo is not None and lo > 0 else "worse" if hi is not None and hi < 0 else "no clear difference"
            paired.append(f"| {labels.get(model, model)} | {method} | {d['difference']:+.3f} "
                          f"[{_fmt(lo)}, {_fmt(hi)}] | {diff['median_error_km']['difference']:+.2f} | {verdict} |")
    if paired:
        lines.append("Against `centroid` on the same images (paired bootstrap):\n\n| model | method | ACC@1 km "
                     "difference [95% CI] | median error difference (km) | at 1 km |\n|---|---|---|---|---|\n"
                     + "\n".join(paired))
    return "\n\n".join(lines)


def _peer_lines(peers: dict) -> list[str]:
    """What the GeoCLIP rows are (metrics key ``peers``, written by ``steps.geoclip_summaries``)."""
    lines = []
    for method, peer in peers.items():
        gallery = peer["gallery"]
        what = ("its shipped image head and location encoder" if peer.get("training") is None else
                f"its image head and location encoder fine-tuned on the training split (best epoch "
                f"{peer['training']['best_epoch']} of {peer['training']['config']['epochs']} on validation loss)")
        lines.append(
            f"`{method}` (listed with {MODEL_LABELS.get(peer['coordinates_of'], peer['coordinates_of'])}, paired with "
            f"its centroid answer): GeoCLIP (NeurIPS'23), a peer, not lageo: its backbone `{peer['backbone']}` and "
            f"{what}, answering with the most probable of {gallery['points']:,} LA GPS gallery points (a grid every "
            f"{gallery['spacing_m']:g} m over the region boxes plus the training coordinates); confidence: that "
            "point's probability (docs/peers.md).")
    return lines


# --- strategies side by side (metrics keys: strategies, regions_breakdown, calibration, prompts) ---------------

def strategies_table(metrics: dict) -> pd.DataFrame:
    """Zero-shot and every strategy (and its WiSE-FT model): scores with 95% CIs, trainable parameters, training
    time, and the paired bootstrap of the accuracy gain over zero-shot."""
    rows = {"zero-shot": _strategy_row(metrics["zeroshot"])} if "zeroshot" in metrics else {}
    for strategy, m in metrics.get("strategies", {}).items():
        rows[strategy] = _strategy_row(m)
        if m.get("wise_ft") and "accuracy" in m["wise_ft"]:
            rows[f"{strategy} + WiSE-FT (alpha {m['wise_ft']['alpha']:.2f})"] = _strategy_row(m["wise_ft"])
    table = pd.DataFrame(rows).T
    # An image-only backbone has no zero-shot model to pair with: no column of dashes.
    return table if "zeroshot" in metrics else table.drop(columns="Accuracy minus zero-shot (paired)", errors="ignore")


def _strategy_row(m: dict) -> dict:
    ci = m.get("ci", {})
    paired = m.get("paired_vs_zeroshot")
    return {
        "Accuracy": _with_ci(m["accuracy"], ci.get("accuracy")),
        "F1 (macro)": _with_ci(m["f1_macro"], ci.get("f1_macro")),
        "F1 (weighted)": _fmt(m["f1_weighted"]),
        "ACC@1 km": _with_ci(m["acc_at_km"]["1"], ci.get("acc_at_km", {}).get("1")),
        "ACC@25 km": _with_ci(m["acc_at_km"]["25"], ci.get("acc_at_km", {}).get("25")),
        "Accuracy minus zero-shot (paired)": "–" if not paired else
        f"{paired['difference']:+.3f} [{paired['ci'][0]:+.3f}, {paired['ci'][1]:+.3f}]",
        "Trainable params": f"{m['trainable_params']:,}" if "trainable_params" in m else "0",
        "Training (s)": _fmt(m.get("train_seconds"), 1) if "train_seconds" in m else "–",
    }


def trained_untrained_table(metrics: dict) -> pd.DataFrame | None:
    """Each model on the trained and the untrained regions (None when every region was trained)."""
    breakdown = metrics.get("regions_breakdown") or {}
    if not breakdown:
        return None
    rows = {}
    for model, parts in breakdown.items():
        trained, untrained = parts.get("trained") or {}, parts.get("untrained") or {}
        rows[model] = {
            "Accuracy, trained regions": _with_ci(trained.get("accuracy"), trained.get("ci", {}).get("accuracy")),
            "Accuracy, untrained regions": _with_ci(untrained.get("accuracy"), untrained.get("ci", {}).get("accuracy")),
            "Untrained images pulled into a trained region": _with_ci(
                untrained.get("pulled_into_trained"), untrained.get("ci", {}).get("pulled_into_trained")),
            "Recall (macro), trained / untrained": f"{_fmt(trained.get('recall_macro'))} / "
                                                  f"{_fmt(untrained.get('recall_macro'))}",
        }
    return pd.DataFrame(rows).T


def wise_ft_table(metrics: dict) -> pd.DataFrame | None:
    """The WiSE-FT weights tried on validation for each strategy that changed encoder weights."""
    rows = [{"strategy": strategy, "alpha": row["alpha"], "validation accuracy": _fmt(row["val_accuracy"]),
             "trained regions": _fmt(row["val_accuracy_trained"]), "untrained regions": _fmt(row["val_accuracy_untrained"]),
             "chosen": "✓" if row["alpha"] == m["wise_ft"]["alpha"] else ""}
            for strategy, m in metrics.get("strategies", {}).items() if m.get("wise_ft") for row in m["wise_ft"]["grid"]]
    return pd.DataFrame(rows).set_index(["strategy", "alpha"]) if rows else None


def prompts_table(metrics: dict) -> pd.DataFrame | None:
    """Zero-shot with each prompt variant: does CLIP recognise the place or read its name?"""
    labels = {"name": "region name only", "seed": "the seed's template (name, description)",
              "visual": "visual description, no name", "ensemble": "prompt ensemble"}
    prompts = metrics.get("prompts") or {}
    if not prompts:
        return None
    return pd.DataFrame({labels.get(variant, variant): {
        "Accuracy": _with_ci(m["accuracy"], m["ci"].get("accuracy")), "F1 (macro)": _fmt(m["f1_macro"]),
        "ACC@1 km": _fmt(m["acc_at_km"]["1"]),
        "Accuracy minus zero-shot (paired)": f"{m['paired_vs_zeroshot']['difference']:+.3f} "
                                             f"[{m['paired_vs_zeroshot']['ci'][0]:+.3f}, "
                                             f"{m['paired_vs_zeroshot']['ci'][1]:+.3f}]",
    } for variant, m in prompts.items()}).T


def calibration_table(metrics: dict) -> pd.DataFrame | None:
    """The temperature fitted on validation and the test ECE before and after, per model."""
    calibration = metrics.get("calibration") or {}
    if not calibration:
        return None
    return pd.DataFrame({model: {"Temperature": _fmt(c["temperature"], 3), "ECE before": _fmt(c["ece_uncalibrated"]),
                                 "ECE after": _fmt(c["ece"])} for model, c in calibration.items()}).T


# -- probing: what the model relies on -----------------------------------------------------------

SPLIT_NAMES = {"train": "training", "val": "validation", "test": "test"}
PROBING_ON = "lageo run --profile demo -p interventions grayscale,blur,sky_mask,ground_mask,center_occlude,hflip"


def load_probing(run: RunDir) -> dict | None:
    """``probing.json`` of the run, or None when step 06 did not run (``interventions`` empty)."""
    return json.loads(run.probing.read_text()) if run.probing.exists() else None


def probing_not_run_markdown() -> str:
    return ("Probing was not run for this run (`interventions` is empty). To see which cues the models rely on, "
            f"set the interventions to try, e.g. `{PROBING_ON}`, or use `--profile demo-compare`; "
            "`lageo params` lists them all.")


def probing_notes(doc: dict) -> str:
    """How to read the probing numbers, and what was skipped or could not be estimated."""
    level = doc["bootstrap"]["ci_level"]
    lines = [
        f"Each intervention removes one kind of cue from every {SPLIT_NAMES.get(doc['split'], doc['split'])} image "
        "(thumbnails below); the models "
        "predict again. A **drop** is original minus intervened accuracy: positive means the cue mattered. "
        f"Intervals: {level:.0%} paired bootstrap over capture points ({doc['bootstrap']['n_boot']} resamples). "
        "The regression is a logistic model of a correct answer on intervention + region (log-odds ratios against "
        "the original images, cluster-robust by capture point: negative means the cue mattered); the "
        "likelihood-ratio test of each intervention drops its main effect and its region interactions."]
    for name, reason in doc.get("skipped", {}).items():
        lines.append(f"- `{name}` skipped: {reason}")
    if not doc["models"]:
        lines.append("- No intervention could be run, so there is nothing to show.")
    text = doc.get("text_found")
    if text and text.get("share") is not None:
        lines.append(f"- Tesseract found text in {text['share']:.0%} of the {text['n_images']} images "
                     "(`text_removal` blurs only those words).")
    for model, result in doc["models"].items():
        label = MODEL_LABELS.get(model, model)
        regression = result["regression"]
        if "not_fitted" in regression:
            lines.append(f"- {label}: no regression ({regression['not_fitted']}).")
            continue
        interaction = regression.get("interaction") or {}
        if interaction.get("p_value") is not None:
            lines.append(f"- {label}: do the effects differ between regions? LR test of intervention x region "
                         f"against intervention + region: chi2 {interaction['lr_statistic']:.1f} on "
                         f"{interaction['df']} df, p = {interaction['p_value']:.3g}.")
        if regression.get("dropped_regions"):
            lines.append(f"- {label}: regions answered all right or all wrong under every condition, left out of "
                         f"the regression: {', '.join(regression['dropped_regions'])}.")
        if regression.get("separated_cells"):
            lines.append(f"- {label}: {len(regression['separated_cells'])} intervention x region cells answered all "
                         "right or all wrong (no finite interaction estimate; the LR tests stay valid).")
    return "\n".join(lines[:1] + ([""] + lines[1:] if len(lines) > 1 else []))


def _drop(value, lo, hi) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.3f}" + (f" [{lo:+.3f}, {hi:+.3f}]" if lo is not None and hi is not None else "")


def probing_drops_table(doc: dict) -> pd.DataFrame:
    """Per model and intervention: accuracy and ACC@1 km, original and intervened, and the drops with intervals."""
    rows = {}
    for model, result in doc["models"].items():
        for d in result["drops"]:
            rows[(MODEL_LABELS.get(model, model), d["intervention"])] = {
                "Accuracy (original)": _fmt(d["accuracy_original"]),
                "Accuracy": _fmt(d["accuracy"]),
                "Accuracy drop [CI]": _drop(d["accuracy_drop"], d["accuracy_drop_lo"], d["accuracy_drop_hi"]),
                "ACC@1 km (original)": _fmt(d["acc_1km_original"]),
                "ACC@1 km": _fmt(d["acc_1km"]),
                "ACC@1 km drop [CI]": _drop(d["acc_1km_drop"], d["acc_1km_drop_lo"], d["acc_1km_drop_hi"]),
                "Images": d["n_images"],
            }
    table = pd.DataFrame(rows).T
    table.index.names = ["model", "intervention"]
    return table


def probing_effects_table(doc: dict) -> pd.DataFrame:
    """Per model and intervention: the regression's log-odds ratio with its interval, the odds ratio, the
    cluster-robust Wald p-value and the likelihood-ratio test."""
    rows = {}
    for model, result in doc["models"].items():
        regression = result["regression"]
        if "not_fitted" in regression:
            continue
        tests = {t["intervention"]: t for t in regression["lr_tests"]}
        for e in regression["effects"]:
            lr = tests.get(e["intervention"], {})
            rows[(MODEL_LABELS.get(model, model), e["intervention"])] = {
                f"Log-odds ratio [{regression['ci_level']:.0%} CI]": _drop(e["log_odds_ratio"], e["ci_lo"], e["ci_hi"]),
                "Odds ratio": _fmt(e["odds_ratio"]),
                "p (Wald, clustered)": _p(e["p_value"]),
                "LR statistic (df)": f"{_fmt(lr.get('lr_statistic'), 1)} ({lr.get('df', 'n/a')})",
                "p (LR test)": _p(lr.get("p_value")),
            }
    table = pd.DataFrame(rows).T
    if len(table):
        table.index.names = ["model", "intervention"]
    return table


def _p(value) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def probing_figures(run: RunDir, doc: dict) -> dict[str, Image]:
    """Step 06's saved figures, embedded: ``06_interventions`` and ``06_region_drops_<model>`` per model probed."""
    names = ["06_interventions", *(f"06_region_drops_{model}" for model in doc["models"])]
    return {name: figure(run, name) for name in names if run.figure(name).exists()}
