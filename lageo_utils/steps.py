"""What each notebook does, as plain functions: notebooks call these and display the results.

Every step reads the files the previous steps wrote into the run directory and writes its
own (see ``lageo_utils.runs.STEP_INPUTS``/``STEP_OUTPUTS``), so any notebook can start from
the step before it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pandas as pd

from lageo_utils.data import read_manifest, read_table, write_manifest
from lageo_utils.notebook import setup_notebook
from lageo_utils.regions import load_regions
from lageo_utils.runs import (
    fork_run,
    new_run_dir,
    outputs_dir,
    project_path,
    read_params,
    resolve_params,
    sha256_file,
    start_step,
    step_done,
    update_params,
    write_params,
)

log = logging.getLogger(__name__)
SPLIT_NAMES = ("train", "val", "test")


def open_step(step: str, run_dir: str | os.PathLike | None, profile: str = "demo", **overrides) -> tuple[Path, dict]:
    """The run directory and parameters for a notebook step.

    Notebook parameters left at ``None`` inherit the run's ``params.yaml``; others override it
    (and are recorded there). Step 01 with no ``run_dir`` starts a new run from ``profile``.
    """
    setup_notebook()  # figures display as PNG in every notebook, which all call open_step first
    given = {k: v for k, v in overrides.items() if v is not None}
    if step == "01_explore_data":
        if run_dir is None:
            run = new_run_dir()
            params = resolve_params(profile, overrides=given)
            write_params(run, params)
            return run, params
        run = project_path(run_dir)
        if step_done(run, step):
            run = fork_run(run, step)
    else:
        run = start_step(step, run_dir)
    params = read_params(run)
    if any(params.get(k) != v for k, v in given.items()):
        params = {**params, **given}
        update_params(run, params)
    return run, params


def regions_of(params: dict):
    return load_regions(project_path(params["regions"]))


def image_root(run: Path) -> Path:
    return Path(json.loads((run / "data.json").read_text())["image_root"])


def load_split(run: Path, name: str) -> pd.DataFrame:
    """A split (or ``manifest``) of the run as a DataFrame."""
    return read_table(run / f"{name}.csv")


# --- 01: data -------------------------------------------------------------------------------

def prepare_data(run: Path, params: dict) -> dict:
    """Build or read the manifest, sample, split and audit; write manifest.csv, splits, audit.json, data.json."""
    from lageo_utils.sampling import area_normalized_sample, sampling_summary
    from lageo_utils.splits import audit_leakage, split

    regions = regions_of(params)
    if params["data_source"] == "demo":
        data_dir = demo_data_dir(params)
        manifest_path = data_dir / "manifest.csv"
    elif params["data_source"] == "manifest":
        data_dir = project_path(params["data_dir"])
        manifest_path = data_dir / params.get("manifest", "manifest.csv")
    else:
        raise ValueError(f"data_source must be 'demo' or 'manifest', not {params['data_source']!r}")
    manifest, report = read_manifest(manifest_path, regions, image_root=data_dir)
    if report.missing_files:
        manifest = manifest[~manifest["image_path"].isin(report.missing_files)].reset_index(drop=True)
    summary = sampling_summary(manifest, regions)
    if params.get("area_normalize"):
        manifest = area_normalized_sample(manifest, regions, seed=params["split_seed"])
    parts = split(manifest, params["split_strategy"], seed=params["split_seed"], buffer_m=params.get("buffer_m") or 0)
    write_manifest(manifest, run / "manifest.csv")
    for name, part in parts.items():
        if name in SPLIT_NAMES or len(part):
            write_manifest(part, run / f"{name}.csv")
    audit = audit_leakage(parts["train"], parts["test"])
    (run / "audit.json").write_text(json.dumps(audit, indent=2))
    data = {
        "image_root": str(data_dir),
        "source_manifest": str(manifest_path),
        "counts": {name: len(part) for name, part in parts.items()},
        "sha256": {f"{name}.csv": sha256_file(run / f"{name}.csv") for name in ("manifest", *SPLIT_NAMES)},
        "sampling": summary.reset_index().to_dict(orient="records"),
        "manifest_report": report.messages(),
        "missing_files": report.missing_files,
    }
    (run / "data.json").write_text(json.dumps(data, indent=2, default=str))
    return data


def demo_data_dir(params: dict) -> Path:
    """The demo dataset for these parameters, built once into ``outputs/data/`` (it is deterministic)."""
    from lageo_utils.demo import build_demo

    n, seed, size = params["demo_points_per_region"], params["demo_seed"], params["demo_image_size"]
    regions_hash = sha256_file(project_path(params["regions"]))[:8]  # other regions, other points
    target = outputs_dir() / "data" / f"demo-p{n}-s{seed}-{size}px-r{regions_hash}"
    if (target / "manifest.csv").exists():
        return target
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build_demo(tmp, points_per_region=n, seed=seed, image_size=size, regions=regions_of(params))
    tmp.rename(target)
    return target


def load_labelled_splits(run: Path) -> pd.DataFrame:
    """train, val and test stacked, with a ``split`` column."""
    return pd.concat([load_split(run, s).assign(split=s) for s in SPLIT_NAMES], ignore_index=True)


def split_table(labelled: pd.DataFrame, regions) -> pd.DataFrame:
    """Images per region (display names, region order) and split, with totals."""
    names = dict(zip(regions["id"], regions["name"]))
    table = pd.crosstab(labelled["region_id"].map(names), labelled["split"], margins=True, margins_name="total")
    order = [n for n in regions["name"] if n in table.index] + ["total"]
    return table.reindex(index=order, columns=[*SPLIT_NAMES, "total"], fill_value=0)


def show(fig, run: Path, name: str):
    """Save a figure as ``figures/<name>.png`` in the run and return it for display."""
    from lageo_utils.figures import save_figure

    save_figure(fig, run / "figures" / f"{name}.png")
    return fig


def data_figures(run: Path, params: dict) -> dict:
    """Step 01's figures: split counts, the capture-point map, headings, example images."""
    from lageo_utils import figures, maps

    regions = regions_of(params)
    labelled = load_labelled_splits(run)
    made = {
        "01_split_counts": figures.split_counts_figure(labelled, regions),
        "01_regions_map": maps.regions_map(regions, labelled),
        "01_headings": figures.heading_figure(labelled),
        "01_examples": figures.region_examples(labelled, image_root(run), regions, seed=params["split_seed"]),
    }
    return {name: show(fig, run, name) for name, fig in made.items()}


# --- 02: zero-shot ----------------------------------------------------------------------------

def embedding_cache_dir() -> Path:
    """Image embeddings are cached across runs (keyed by weights, preprocessing and file content)."""
    return outputs_dir() / "cache" / "embeddings"


def load_model(params: dict):
    """``load_clip`` for the run's model; seeded first, so random weights (demo) are reproducible."""
    import torch

    from lageo_utils.model import load_clip

    torch.manual_seed(params["seed"])
    return load_clip(params["model"], params["pretrained"], device=params.get("device", "auto"))


def zero_shot(run: Path, params: dict) -> pd.DataFrame:
    """Zero-shot predictions on the test split; writes ``predictions_zeroshot.parquet``."""
    from lageo_utils.zeroshot import GeoPredictor, predict_manifest

    regions = regions_of(params)
    model, preprocess, tokenizer = load_model(params)
    predictor = GeoPredictor(model, preprocess, tokenizer, regions, device=params.get("device", "auto"),
                             model_name=params["model"])
    predictions = predict_manifest(predictor, load_split(run, "test"), image_root(run), batch_size=params["batch_size"],
                                   top_k=params["top_k"], cache_dir=embedding_cache_dir())
    predictions.to_parquet(run / "predictions_zeroshot.parquet", index=False)
    return predictions


def quick_summary(predictions: pd.DataFrame) -> pd.Series:
    """Images, top-1 accuracy and distance errors of a predictions table, at a glance."""
    from lageo_utils.geo import acc_at_km

    summary = {"images": len(predictions), "unreadable_skipped": len(predictions.attrs.get("failures", [])),
               "accuracy": predictions["correct"].mean(),
               "median_error_km": predictions["error_km"].median()}
    summary.update({f"ACC@{k} km": v for k, v in acc_at_km(predictions["error_km"]).items()})
    return pd.Series(summary, name="value")


# --- 03: fine-tuning --------------------------------------------------------------------------

def finetune(run: Path, params: dict) -> dict:
    """Fine-tune on train, select on val, predict test with the best checkpoint.

    Writes ``checkpoints/``, ``history.csv``, ``train_summary.json`` and
    ``predictions_finetuned.parquet``; returns the training summary.
    """
    from lageo_utils.finetune import TrainConfig, load_finetuned, train
    from lageo_utils.zeroshot import predict_manifest

    regions = regions_of(params)
    config = TrainConfig(strategy=params["strategy"], model_name=params["model"], pretrained=params["pretrained"],
                         epochs=int(params["epochs"]), lr=params.get("lr"), batch_size=int(params["batch_size"]),
                         seed=int(params["seed"]))
    checkpoints = run / "checkpoints"
    clip = load_model(params)
    result = train(load_split(run, "train"), load_split(run, "val"), regions, image_root(run), checkpoints,
                   config, device=params.get("device", "auto"), cache_dir=embedding_cache_dir(),
                   resume=(checkpoints / "last.pt").exists(), clip=clip)
    for name in ("history.csv", "train_summary.json"):
        shutil.copy2(result.out_dir / name, run / name)
    predictor = load_finetuned(result.best_checkpoint, regions, device=params.get("device", "auto"), clip=clip)
    predictions = predict_manifest(predictor, load_split(run, "test"), image_root(run),
                                   batch_size=params["batch_size"], top_k=params["top_k"],
                                   cache_dir=embedding_cache_dir())
    predictions.to_parquet(run / "predictions_finetuned.parquet", index=False)
    return result.summary


# --- 04: evaluation ---------------------------------------------------------------------------

MODEL_NAMES = {"zeroshot": "Zero-shot CLIP", "finetuned": "Fine-tuned CLIP"}


def load_predictions(run: Path) -> dict[str, pd.DataFrame]:
    return {name: pd.read_parquet(run / f"predictions_{name}.parquet") for name in MODEL_NAMES}


def evaluate(run: Path, params: dict) -> tuple[dict, dict]:
    """Metrics with bootstrap CIs, classification reports and figures for both models.

    ``metrics.json`` is written last, so its presence means the step finished.
    Returns the metrics document and the figures by name.
    """
    from lageo_utils.metrics import classification_report_text, metrics_json

    regions = regions_of(params)
    predictions = load_predictions(run)
    counts = json.loads((run / "data.json").read_text())["counts"]
    doc = metrics_json(predictions["zeroshot"], predictions["finetuned"], regions, params,
                       {k: counts[k] for k in SPLIT_NAMES}, n_boot=int(params.get("n_boot") or 1000),
                       seed=int(params["seed"]))
    for name, preds in predictions.items():
        (run / f"classification_report_{name}.txt").write_text(classification_report_text(preds, regions))
    figures = evaluation_figures(run, params, doc, predictions)
    (run / "metrics.json").write_text(json.dumps(doc, indent=2))
    return doc, figures


def evaluation_figures(run: Path, params: dict, metrics: dict, predictions: dict[str, pd.DataFrame]) -> dict:
    """Step 04's figures for both models: comparison, per-region F1, confusion, maps, calibration, examples."""
    from lageo_utils import figures, maps
    from lageo_utils.metrics import confusion, reliability_table

    regions = regions_of(params)
    labelled = {MODEL_NAMES[k]: metrics[k] for k in MODEL_NAMES}
    made = {"04_comparison": figures.comparison_bar(labelled),
            "04_per_region_f1": figures.per_region_bars(labelled, regions)}
    for name, preds in predictions.items():
        label = MODEL_NAMES[name]
        made[f"04_confusion_{name}"] = figures.confusion_matrix_figure(confusion(preds, regions), f"{label}: confusion")
        made[f"04_error_map_{name}"] = maps.error_map(preds, regions, seed=int(params["seed"]))
        made[f"04_region_error_{name}"] = maps.region_error_map(preds, regions)
        made[f"04_reliability_{name}"] = figures.reliability_diagram(reliability_table(preds), metrics[name]["ece"],
                                                                     f"{label}: reliability")
        made[f"04_examples_{name}"] = figures.example_grid(preds, image_root(run), regions, seed=int(params["seed"]))
    return {name: show(fig, run, name) for name, fig in made.items()}


def explorer(run: Path, params: dict):
    """The interactive explorer widget over both models' predictions (needs a live kernel)."""
    from lageo_utils.explorer import PredictionExplorer

    return PredictionExplorer(load_predictions(run), regions_of(params), image_root(run), labels=MODEL_NAMES).widget
