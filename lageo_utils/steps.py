"""What each notebook does, as plain functions: notebooks call these and display the results.

Every step reads the files the previous steps wrote into the run directory and writes its
own (``lageo_utils.runs.STEP_FILES``; ``RunDir`` names them), so any notebook can start from
the step before it.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

from lageo_utils.data import ManifestError, read_manifest, read_table, write_manifest
from lageo_utils.files import atomic_write, sha256_file
from lageo_utils.logs import configure_logging
from lageo_utils.notebook import setup_notebook
from lageo_utils.params import PEER_METHODS, check_params
from lageo_utils.regions import load_regions
from lageo_utils.runs import (
    MODELS,
    SPLITS,
    RunDir,
    fork_run,
    model_labels,
    new_run_dir,
    outputs_dir,
    project_path,
    read_params,
    resolve_params,
    start_step,
    step_done,
    update_params,
    write_params,
)

log = logging.getLogger(__name__)


def open_step(step: str, run_dir: str | os.PathLike | None, profile: str = "demo", **overrides) -> tuple[RunDir, dict]:
    """The run directory and parameters for a notebook step.

    Notebook parameters left at ``None`` inherit the run's ``params.yaml``; others override it
    (and are recorded there) after a check against the parameter schema, so a wrong name, type
    or value stops the notebook in its first cell. Step 01 with no ``run_dir`` starts a new run
    from ``profile``.
    """
    setup_notebook()  # figures display as PNG in every notebook, which all call open_step first
    configure_logging()
    given = check_params({k: v for k, v in overrides.items() if v is not None})
    if step == "01_explore_data":
        if run_dir is None:
            params = resolve_params(profile, overrides=given)  # checked before the run directory exists
            run = new_run_dir()
            write_params(run, params)
            return run, params
        run = RunDir(project_path(run_dir))
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


def image_root(run: RunDir) -> Path:
    return Path(json.loads(run.data_file.read_text())["image_root"])


def load_split(run: RunDir, name: str) -> pd.DataFrame:
    """A split of the run as a DataFrame."""
    return read_table(run.split(name))


def write_json(path: Path, doc: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(doc, indent=2, default=str)))


# --- 01: data -------------------------------------------------------------------------------

def data_manifest_path(params: dict) -> tuple[Path, Path]:
    """The image root and the manifest file the parameters name."""
    if params["data_source"] == "demo":
        data_dir = demo_data_dir(params)
        return data_dir, data_dir / "manifest.csv"
    if params.get("data_dir") is None:
        raise ManifestError("data_source is 'manifest' but data_dir is not set (-p data_dir FOLDER)")
    data_dir = project_path(params["data_dir"])
    manifest = data_dir / params["manifest"]
    if not manifest.is_file():
        raise ManifestError(f"{manifest}: manifest not found (data_dir {params['data_dir']!r}, manifest "
                            f"{params['manifest']!r}); collect or import images first (docs/data-collection.md) "
                            "or point -p data_dir at the folder that holds them")
    return data_dir, manifest


def read_data_manifest(params: dict):
    """The run's manifest, labelled and validated (``ManifestError`` names the file, row and field)."""
    data_dir, manifest_path = data_manifest_path(params)
    manifest, report = read_manifest(manifest_path, regions_of(params), image_root=data_dir,
                                     dedupe=bool(params["dedupe"]))
    return data_dir, manifest_path, manifest, report


def prepare_data(run: RunDir, params: dict) -> dict:
    """Build or read the manifest, sample, split and audit; write manifest.csv, splits, audit.json, data.json."""
    from lageo_utils.sampling import area_normalized_sample, sampling_summary
    from lageo_utils.splits import audit_leakage, split

    regions = regions_of(params)
    data_dir, manifest_path, manifest, report = read_data_manifest(params)
    if report.missing_files:
        manifest = manifest[~manifest["image_path"].isin(report.missing_files)].reset_index(drop=True)
    summary = sampling_summary(manifest, regions)
    if params["area_normalize"]:
        manifest = area_normalized_sample(manifest, regions, seed=params["split_seed"])
    parts = split(manifest, params["split_strategy"], seed=params["split_seed"], buffer_m=params["buffer_m"])
    write_manifest(manifest, run.manifest)
    for name, part in parts.items():
        if name in SPLITS or len(part):
            write_manifest(part, run.split(name))
    write_json(run.audit, audit_leakage(parts["train"], parts["test"]))
    data = {
        "image_root": str(data_dir),
        "source_manifest": str(manifest_path),
        "counts": {name: len(part) for name, part in parts.items()},
        "sha256": {path.name: sha256_file(path) for path in (run.manifest, *map(run.split, SPLITS))},
        "sampling": summary.reset_index().to_dict(orient="records"),
        "manifest_report": report.messages(),
        "missing_files": report.missing_files,
    }
    write_json(run.data_file, data)
    log.info("data: %s", ", ".join(f"{k} {v}" for k, v in data["counts"].items()))
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


def load_labelled_splits(run: RunDir) -> pd.DataFrame:
    """train, val and test stacked, with a ``split`` column."""
    return pd.concat([load_split(run, s).assign(split=s) for s in SPLITS], ignore_index=True)


def split_table(labelled: pd.DataFrame, regions) -> pd.DataFrame:
    """Images per region (display names, region order) and split, with totals."""
    names = dict(zip(regions["id"], regions["name"]))
    table = pd.crosstab(labelled["region_id"].map(names), labelled["split"], margins=True, margins_name="total")
    order = [n for n in regions["name"] if n in table.index] + ["total"]
    return table.reindex(index=order, columns=[*SPLITS, "total"], fill_value=0)


def show(fig, run: RunDir, name: str):
    """Save a figure as ``figures/<name>.png`` in the run and return it for display."""
    from lageo_utils.figures import save_figure

    save_figure(fig, run.figure(name))
    return fig


def data_figures(run: RunDir, params: dict) -> dict:
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
    """The run's model (CLIP or an image-only backbone); seeded first, so random weights (demo) are reproducible."""
    import torch

    from lageo_utils.model import load_model

    torch.manual_seed(params["seed"])
    return load_model(params["model"], params["pretrained"], device=params["device"])


def zero_shot(run: RunDir, params: dict) -> pd.DataFrame | None:
    """Zero-shot predictions on the test split and the zero-shot model's coordinate answers.

    Writes ``predictions_zeroshot.parquet``, ``locator/zeroshot/`` and ``coordinates_zeroshot.parquet``.
    An image-only backbone has no zero-shot model: see ``frozen_backbone`` (returns None then).
    """
    from lageo_utils.model import has_text_tower
    from lageo_utils.predict import GeoPredictor, predictions_from_embeddings

    regions = regions_of(params)
    model, preprocess, tokenizer = load_model(params)
    if not has_text_tower(model):
        frozen_backbone(run, params, model, preprocess)
        return None
    predictor = GeoPredictor(model, preprocess, tokenizer, regions, device=params["device"], model_name=params["model"])
    embedded = embed_splits(run, params, predictor)
    predictor.temperature = fit_validation_temperature(run, predictor, embedded["val"])
    test = load_split(run, "test")
    predictions = predictions_from_embeddings(predictor, test, embedded["test"], params["top_k"])
    predictions.to_parquet(run.predictions("zeroshot"), index=False)
    log.info("zero-shot: %d test images, accuracy %.3f", len(predictions), predictions["correct"].mean())
    prompt_variants(run, params, (model, preprocess, tokenizer), embedded["test"])
    locate(run, params, predictor, "zeroshot", embedded, peers=geoclip_answers(run, params, "zeroshot"))
    return predictions


def frozen_backbone(run: RunDir, params: dict, model, preprocess) -> pd.DataFrame | None:
    """Step 02 for an image-only backbone: no text prompts, so no region classification (``skipped_note``). The
    splits are embedded (through the cache, for step 03) and, when ``geo_methods`` asks for them, the methods
    answered from embeddings alone (retrieval, geocell) answer for the frozen backbone: ``locator/zeroshot/`` and
    ``coordinates_zeroshot.parquet``. Returns those answers (None when there are none)."""
    from lageo_utils.backbones import frozen_methods
    from lageo_utils.predict import ImageEncoder

    log.info("zero-shot skipped: %s is an image-only backbone (no text tower)", params["model"])
    encoder = ImageEncoder(model, preprocess, device=params["device"], model_name=params["model"])
    embedded = embed_splits(run, params, encoder)
    peers = geoclip_answers(run, params, "zeroshot")
    if frozen_methods(params):
        return locate(run, params, encoder, "zeroshot", embedded, peers=peers)
    if peers is not None:  # GeoCLIP's answers alone: no method of lageo's answers for the frozen backbone
        peers.to_parquet(run.coordinates("zeroshot"), index=False)
    return peers


def skipped_note(params: dict) -> str:
    """The Markdown note of what this run skips and why (``lageo_utils.backbones``); empty for CLIP."""
    from lageo_utils.backbones import skipped_markdown, skipped_methods

    return skipped_markdown(skipped_methods(params))


def zero_shot_temperature(run: RunDir) -> float:
    """The temperature step 02 fitted on the validation split (1.0 for runs made before calibration)."""
    return float(pd.read_parquet(run.predictions("zeroshot")).attrs.get("temperature", 1.0))


def fit_validation_temperature(run: RunDir, predictor, val_embedded) -> float:
    """Temperature scaling fitted on the validation split's logits (it changes no prediction, only confidences)."""
    from lageo_utils.calibration import fit_temperature

    val = load_split(run, "val").iloc[val_embedded.rows]
    known = val["region_id"].isin(predictor.region_ids).to_numpy()
    labels = val["region_id"][known].map(predictor.region_ids.index).to_numpy()
    logits = predictor.logits(val_embedded.embeddings[known]).cpu().numpy()
    return fit_temperature(logits, labels)


def prompt_variants(run: RunDir, params: dict, clip: tuple, test_embedded) -> None:
    """Zero-shot test predictions with each of ``prompt_variants`` (region name only, the seed's template, a
    visual description without the name, an ensemble): does CLIP recognise the place or read its name?"""
    from lageo_utils.predict import GeoPredictor, predictions_from_embeddings
    from lageo_utils.prompts import PROMPT_VARIANTS, load_prompt_controls

    regions = regions_of(params)
    descriptors = load_prompt_controls(project_path(params["prompt_controls"]), regions)
    test = load_split(run, "test")
    for variant in params["prompt_variants"]:
        predictor = GeoPredictor(*clip, regions, templates=PROMPT_VARIANTS[variant], descriptors=descriptors,
                                 device=params["device"], model_name=params["model"])
        table = predictions_from_embeddings(predictor, test, test_embedded, params["top_k"])
        table.to_parquet(run.prompt_predictions(variant), index=False)
        log.info("zero-shot, prompt variant %s: accuracy %.3f", variant, table["correct"].mean())


def embed_splits(run: RunDir, params: dict, predictor) -> dict:
    """``EmbeddingResult`` of train, val and test for the predictor's image encoder, through the embedding cache.

    The cache is keyed by the encoder's weights: a fine-tuned model whose encoder did not change
    (``linear_probe``) finds the zero-shot step's embeddings and computes nothing.
    """
    from lageo_utils.embed import embed_manifest

    return {name: embed_manifest(predictor.model, predictor.preprocess, load_split(run, name), image_root(run),
                                 cache_dir=embedding_cache_dir(), batch_size=params["embed_batch_size"],
                                 num_workers=params["num_workers"], device=predictor.device,
                                 model_name=predictor.model_name, engine=engine_of(params))
            for name in SPLITS}


def engine_of(params: dict) -> str:
    """The run's inference engine (``eager`` for runs made before the ``engine`` parameter)."""
    return params.get("engine", "eager")


def locate(run: RunDir, params: dict, predictor, model: str, embedded: dict,
           peers: pd.DataFrame | None = None) -> pd.DataFrame:
    """Coordinate answers of one model (see docs/geolocation.md).

    The gallery is the training split with this model's embeddings; every setting (k,
    temperatures, geocell resolution and tau) is chosen on the validation split; the test split
    is answered afterwards by every method of ``geo_methods``, per image and voted per capture
    point. ``peers``: a peer method's rows for the same table (``geoclip_answers``). Writes ``locator/<model>/``
    and ``coordinates_<model>.parquet``; returns the answers.
    """
    from lageo_utils.backbones import EMBEDDING_METHODS, frozen_methods
    from lageo_utils.geolocate import Gallery, answer_all, fit_locator, save_locator
    from lageo_utils.predict import GeoPredictor

    rows = {name: load_split(run, name).iloc[result.rows].reset_index(drop=True) for name, result in embedded.items()}
    # An image encoder without a region head (image-only backbone, step 02): no probabilities, embedding methods only.
    headed = isinstance(predictor, GeoPredictor)
    regions = regions_of(params)
    region_ids = predictor.region_ids if headed else [str(r) for r in regions["id"]]
    centroids = predictor.centroids if headed else regions[["centroid_lat", "centroid_lon"]].to_numpy(float)

    def probabilities(embeddings):
        return predictor.probabilities(embeddings) if headed else None

    gallery = Gallery.from_rows(rows["train"], embedded["train"].embeddings, region_ids, backend=params["geo_search"])
    methods = geo_methods(params) if headed else frozen_methods(params)
    shared = _same_encoder_locator(run, model, gallery, methods)
    val, val_embeddings = rows["val"], embedded["val"].embeddings
    locator = fit_locator(centroids, gallery, val_embeddings, probabilities(val_embeddings),
                          val["latitude"].to_numpy(float), val["longitude"].to_numpy(float),
                          methods=[m for m in methods if shared is None or m not in EMBEDDING_METHODS],
                          geocell_resolutions=params["geocell_resolutions"],
                          geocell_min_cell_images=(params["geocell_min_images"],), seed=params["seed"])
    if shared is not None:
        locator.retrieval_settings = shared.retrieval_settings
        locator.geocell_settings, locator.geocell_model = shared.geocell_settings, shared.geocell_model
        log.info("%s: the image encoder is the zero-shot one; retrieval and geocell settings reused", model)
    target = run.locator(model)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")  # complete or absent: the folder marks the step
    shutil.rmtree(tmp, ignore_errors=True)
    save_locator(locator, tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    test_embeddings = embedded["test"].embeddings
    answers = answer_all(locator, rows["test"], test_embeddings, probabilities(test_embeddings), region_ids, methods)
    if peers is not None:
        answers = pd.concat([answers, peers], ignore_index=True)
    answers.to_parquet(run.coordinates(model), index=False)
    per_image = answers[~answers["voted"]].groupby("method", sort=False)["error_km"].median()
    log.info("%s coordinates, median error (km): %s", model,
             ", ".join(f"{method} {value:.2f}" for method, value in per_image.items()))
    return answers


def _same_encoder_locator(run: RunDir, model: str, gallery, methods: list[str]):
    """The zero-shot locator when ``model`` is the fine-tuned one and its gallery embeddings are the zero-shot
    ones (``linear_probe``, ``zeroshot``: the encoder did not change), with every embedding-only method
    fitted; else None."""
    import numpy as np

    from lageo_utils.geolocate import load_locator

    if model == "zeroshot" or not run.locator("zeroshot").is_dir():
        return None
    other = load_locator(run.locator("zeroshot"))
    same = (other.gallery is not None and other.gallery.backend == gallery.backend
            and np.array_equal(other.gallery.embeddings, gallery.embeddings)
            and np.array_equal(other.gallery.paths, gallery.paths))
    fitted = (("retrieval" not in methods and "geocell" not in methods or other.retrieval_settings is not None)
              and ("geocell" not in methods or other.geocell_model is not None))
    return other if same and fitted else None


def geo_methods(params: dict) -> list[str]:
    """The coordinate methods the locator answers: ``geo_methods`` (peer methods aside: ``geoclip_answers``), with
    ``centroid`` (the reference) always first."""
    return ["centroid", *(m for m in params["geo_methods"] if m != "centroid" and m not in PEER_METHODS)]


def quick_summary(predictions: pd.DataFrame) -> pd.Series:
    """Images, top-1 accuracy and distance errors of a predictions table, at a glance."""
    from lageo_utils.geo import acc_at_km

    summary = {"images": len(predictions), "unreadable_skipped": len(predictions.attrs.get("failures", [])),
               "accuracy": predictions["correct"].mean(),
               "median_error_km": predictions["error_km"].median()}
    summary.update({f"ACC@{k} km": v for k, v in acc_at_km(predictions["error_km"]).items()})
    return pd.Series(summary, name="value")


# --- 03: fine-tuning --------------------------------------------------------------------------

def finetune(run: RunDir, params: dict) -> dict:
    """Fine-tune with each of ``strategies`` in turn (train, select on val), predict test with each best
    checkpoint, try WiSE-FT for strategies that change encoder weights, answer coordinates with the first.

    Each strategy trains into ``checkpoints/<strategy>/`` and resumes there; a strategy whose
    predictions exist is done. The first strategy is the run's ``finetuned`` model: its
    ``history.csv``, ``train_summary.json``, ``predictions_finetuned.parquet`` and coordinates.
    Writes ``strategies.json`` (every strategy's summary and WiSE-FT search) last.
    """
    from lageo_utils.checkpoints import load_checkpoint, save_checkpoint
    from lageo_utils.predict import load_finetuned, predictions_from_embeddings
    from lageo_utils.training import TrainConfig

    regions = regions_of(params)
    clip = load_model(params)
    test = load_split(run, "test")
    partial = run.strategies_file.with_suffix(".partial.json")  # the strategies an interrupted run finished
    done = json.loads(partial.read_text()) if partial.exists() else {}
    for position, strategy in enumerate(run_strategies(params)):
        if strategy in done and run.strategy_predictions(strategy).exists():
            continue
        config = TrainConfig(strategy=strategy, model_name=params["model"], pretrained=params["pretrained"],
                             train_regions=params["train_regions"], engine=engine_of(params),
                             **{name: params[name] for name in TRAIN_PARAMS})
        out = run.strategy_checkpoints(strategy)
        result = train_strategy(run, params, config, regions, clip)
        predictor = load_finetuned(result.best_checkpoint, regions, device=params["device"], clip=clip)
        embedded = embed_splits(run, params, predictor)
        if params["train_regions"]:
            # Training calibrated on the validation images it saw; the model answers for every region, so the
            # temperature the run (and `lageo predict`) uses is fitted on the whole validation split.
            predictor.temperature = fit_validation_temperature(run, predictor, embedded["val"])
            state = load_checkpoint(result.best_checkpoint)
            save_checkpoint({**state, "temperature": predictor.temperature}, result.best_checkpoint)
        predictions = predictions_from_embeddings(predictor, test, embedded["test"], params["top_k"])
        predictions.to_parquet(run.strategy_predictions(strategy), index=False)
        log.info("fine-tuned (%s): best epoch %d, validation accuracy %.3f, test accuracy %.3f", strategy,
                 result.summary["best_epoch"], result.summary["best_val_acc"], predictions["correct"].mean())
        done[strategy] = {**result.summary, "wise_ft": wise_ft_search(run, params, predictor, clip, strategy)}
        if position == 0:
            shutil.copy2(out / run.history.name, run.history)
            shutil.copy2(out / run.train_summary.name, run.train_summary)
            predictions.to_parquet(run.predictions("finetuned"), index=False)
            locate(run, params, predictor, "finetuned", embedded, peers=geoclip_answers(run, params, "finetuned"))
        write_json(partial, done)
    write_json(run.strategies_file, done)
    partial.unlink(missing_ok=True)
    return done[run_strategies(params)[0]]


def run_strategies(params: dict) -> list[str]:
    """The strategies a run trains: ``strategies``, or the one ``strategy``; for an image-only backbone without the
    text-side ones (``skipped_note`` says so)."""
    from lageo_utils.backbones import trained_strategies

    return trained_strategies(params)


def finetuned_checkpoint(run: RunDir, params: dict) -> Path:
    """``best.pt`` of the run's fine-tuned model (its first strategy)."""
    return run.strategy_checkpoints(run_strategies(params)[0]) / "best.pt"


def wise_ft_search(run: RunDir, params: dict, predictor, clip: tuple, strategy: str) -> dict | None:
    """WiSE-FT for a strategy that changed encoder weights: every ``wise_alphas`` weight scored on the validation
    split (all regions, and the trained and untrained ones apart), the best kept and its test predictions written.
    None for strategies that leave the encoder as it was (nothing to interpolate)."""
    from lageo_utils.backbones import is_image_only
    from lageo_utils.embed import embed_manifest
    from lageo_utils.predict import predictions_from_embeddings, wise_ft
    from lageo_utils.training.config import ENCODER_STRATEGIES

    if strategy not in ENCODER_STRATEGIES or len(params["wise_alphas"]) < 2 or is_image_only(params["model"]):
        return None  # image-only: no zero-shot head to interpolate towards (skipped_note says so)
    val, trained = load_split(run, "val"), params["train_regions"]
    grid = []
    for alpha in sorted(params["wise_alphas"]):
        mixed = wise_ft(predictor, clip[0], alpha)
        embedded = embed_manifest(mixed.model, mixed.preprocess, val, image_root(run), cache_dir=embedding_cache_dir(),
                                  batch_size=params["embed_batch_size"], device=mixed.device,
                                  model_name=params["model"])
        table = predictions_from_embeddings(mixed, val, embedded, params["top_k"])
        inside = table["true_region"].isin(trained) if trained else pd.Series(True, index=table.index)
        grid.append({"alpha": alpha, "val_accuracy": float(table["correct"].mean()),
                     "val_accuracy_trained": float(table.loc[inside, "correct"].mean()) if inside.any() else None,
                     "val_accuracy_untrained": float(table.loc[~inside, "correct"].mean()) if (~inside).any()
                     else None})
    best = max(grid, key=lambda row: (row["val_accuracy"], row["alpha"]))  # ties: the more fine-tuned
    mixed = wise_ft(predictor, clip[0], best["alpha"])
    test = load_split(run, "test")
    embedded = embed_manifest(mixed.model, mixed.preprocess, test, image_root(run), cache_dir=embedding_cache_dir(),
                              batch_size=params["embed_batch_size"], device=mixed.device, model_name=params["model"])
    predictions_from_embeddings(mixed, test, embedded, params["top_k"]).to_parquet(
        run.strategy_predictions(strategy, wise=True), index=False)
    log.info("WiSE-FT (%s): alpha %.2f chosen on validation (accuracy %.3f)", strategy, best["alpha"],
             best["val_accuracy"])
    return {"grid": grid, "alpha": best["alpha"]}


# Run parameters that TrainConfig takes under the same name.
TRAIN_PARAMS = ("epochs", "lr", "batch_size", "grad_accum_steps", "weight_decay", "warmup_fraction", "max_grad_norm",
                "unfreeze_blocks", "augment", "patience", "num_workers", "embed_batch_size", "seed")


# --- 03: training in this process or on nproc processes (torchrun) --------------------------

def train_strategy(run: RunDir, params: dict, config, regions, clip: tuple | None = None):
    """Train ``config`` into ``checkpoints/<strategy>/`` (resuming there) and return its ``TrainResult``: in this
    process, or with ``nproc`` above 1 on that many processes started by ``torchrun``, which write the same files
    (read back here)."""
    from lageo_utils.training import TrainResult, train

    out = run.strategy_checkpoints(config.strategy)
    resume = (out / "last.pt").exists()
    nproc = params.get("nproc", 1)  # runs started before the parameter existed train in this process
    if nproc == 1:
        return train(load_split(run, "train"), load_split(run, "val"), regions, image_root(run), out, config,
                     device=params["device"], cache_dir=embedding_cache_dir(), resume=resume, clip=clip)
    command = torchrun_train_command(run, params, config, resume)
    log.info("training %s on %d processes: %s", config.strategy, nproc, shlex.join(command))
    returncode = subprocess.run(command, check=False).returncode
    if returncode != 0:
        raise RuntimeError(f"training {config.strategy} on {nproc} processes failed (torchrun exit code "
                           f"{returncode}; its output is above): {shlex.join(command)}")
    return TrainResult.read(out)


def torchrun_train_command(run: RunDir, params: dict, config, resume: bool) -> list[str]:
    """``torchrun --standalone --nproc_per_node N -m lageo_utils.cli train ...`` for ``config`` on the run's
    splits, through this Python (``-m torch.distributed.run``: the same environment, no PATH lookup)."""
    if config.lora_targets is not None or config.templates is not None:
        raise ValueError("lageo train has no option for lora_targets or templates: train in this process (nproc 1)")
    options = {
        "--strategy": config.strategy, "--model": config.model_name, "--pretrained": config.pretrained or "none",
        "--epochs": config.epochs, "--lr": config.lr, "--batch-size": config.batch_size,
        "--grad-accum": config.grad_accum_steps, "--weight-decay": config.weight_decay,
        "--warmup-fraction": config.warmup_fraction,
        "--max-grad-norm": "none" if config.max_grad_norm is None else config.max_grad_norm,
        "--unfreeze-blocks": config.unfreeze_blocks, "--lora-rank": config.lora_rank,
        "--lora-alpha": config.lora_alpha, "--lora-dropout": config.lora_dropout,
        "--train-regions": ",".join(config.train_regions) if config.train_regions else None,
        "--patience": config.patience, "--seed": config.seed, "--num-workers": config.num_workers,
        "--embed-batch-size": config.embed_batch_size, "--engine": config.engine, "--splits": run, "--image-root": image_root(run),
        "--regions": project_path(params["regions"]), "--out": run.strategy_checkpoints(config.strategy),
        "--cache-dir": embedding_cache_dir(), "--device": params["device"],
    }
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(params.get("nproc", 1)),
            "-m", "lageo_utils.cli", "train",
            *(part for name, value in options.items() if value is not None for part in (name, str(value))),
            *(["--augment"] if config.augment else []), *(["--resume"] if resume else [])]


# --- 04: evaluation ---------------------------------------------------------------------------

def load_predictions(run: RunDir) -> dict[str, pd.DataFrame]:
    """Each model's test predictions (an image-only backbone's run has no zero-shot ones)."""
    return {name: pd.read_parquet(run.predictions(name)) for name in MODELS if run.predictions(name).exists()}


def load_coordinates(run: RunDir) -> dict[str, pd.DataFrame]:
    """Each model's coordinate answers (every method, per image and voted), for the models that have them."""
    return {name: pd.read_parquet(run.coordinates(name)) for name in MODELS if run.coordinates(name).exists()}


def evaluate(run: RunDir, params: dict) -> tuple[dict, dict]:
    """Metrics with bootstrap CIs, classification reports and figures for both models.

    ``metrics.json`` is written last, so its presence means the step finished.
    Returns the metrics document and the figures by name.
    """
    from lageo_utils.backbones import skipped_methods
    from lageo_utils.metrics import classification_report_text, metrics_json

    regions = regions_of(params)
    predictions = load_predictions(run)
    counts = json.loads(run.data_file.read_text())["counts"]
    doc = metrics_json(predictions.get("zeroshot"), predictions["finetuned"], regions, params,
                       {k: counts[k] for k in SPLITS}, n_boot=params["n_boot"], seed=params["seed"])
    doc.update(coordinate_metrics(run, params))
    doc.update(strategy_metrics(run, params, predictions))
    doc["skipped"] = skipped_methods(params)  # what an image-only backbone could not run, and why (empty for CLIP)
    for name, preds in predictions.items():
        run.classification_report(name).write_text(classification_report_text(preds, regions))
    figures = evaluation_figures(run, params, doc, predictions)
    figures.update(strategy_figures(run, params, doc, predictions))
    write_json(run.metrics, doc)
    return doc, figures


def strategy_metrics(run: RunDir, params: dict, predictions: dict[str, pd.DataFrame]) -> dict:
    """The strategy keys of ``metrics.json``: ``strategies`` (each strategy's M with intervals, a paired bootstrap
    against zero-shot, trainable parameters, training seconds, its WiSE-FT search), ``regions_breakdown`` (every
    model on the trained and the untrained regions, when ``train_regions`` is set), ``calibration`` (temperature
    and ECE before and after) and ``prompts`` (zero-shot per prompt variant)."""
    from lageo_utils.metrics import (
        bootstrap_ci,
        calibration_summary,
        compare_models,
        compute_metrics,
        trained_untrained,
    )

    regions = regions_of(params)
    boot = {"n_boot": params["n_boot"], "seed": params["seed"]}
    zeroshot = predictions.get("zeroshot")  # None for an image-only backbone: nothing to pair with

    def scored(table: pd.DataFrame) -> dict:
        m = compute_metrics(table, regions)
        m["ci"] = bootstrap_ci(table, regions=regions, **boot)
        m["paired_vs_zeroshot"] = None if zeroshot is None else compare_models(table, zeroshot, regions=regions, **boot)
        return m

    tables = {} if zeroshot is None else {"zeroshot": zeroshot}
    strategies = {}
    for strategy, summary in json.loads(run.strategies_file.read_text()).items():
        tables[strategy] = pd.read_parquet(run.strategy_predictions(strategy))
        strategies[strategy] = {**scored(tables[strategy]), "trainable_params": summary["trainable_params"],
                                "train_seconds": summary["seconds"], "wise_ft": summary["wise_ft"]}
        if summary["wise_ft"]:
            tables[f"{strategy}_wise"] = pd.read_parquet(run.strategy_predictions(strategy, wise=True))
            strategies[strategy]["wise_ft"] = {**summary["wise_ft"], **scored(tables[f"{strategy}_wise"])}
    trained = params["train_regions"]
    return {
        "strategies": strategies,
        "regions_breakdown": {name: trained_untrained(table, trained, **boot) for name, table in tables.items()}
        if trained else {},
        "calibration": {name: calibration_summary(table) for name, table in {**predictions, **tables}.items()
                        if "confidence_uncalibrated" in table},
        "prompts": {variant: scored(pd.read_parquet(run.prompt_predictions(variant)))
                    for variant in params["prompt_variants"] if run.prompt_predictions(variant).exists()},
    }


def strategy_figures(run: RunDir, params: dict, metrics: dict, predictions: dict[str, pd.DataFrame]) -> dict:
    """Strategies side by side, trained vs untrained regions, reliability before and after temperature scaling."""
    from lageo_utils import figures
    from lageo_utils.metrics import reliability_table

    made = {}
    strategies = {"zero-shot": metrics["zeroshot"]} if "zeroshot" in metrics else {}
    strategies.update(metrics["strategies"])
    strategies.update({f"{s} + WiSE-FT (alpha {m['wise_ft']['alpha']:.2f})": m["wise_ft"]
                       for s, m in metrics["strategies"].items() if m.get("wise_ft")})
    made["04_strategies"] = figures.comparison_bar(strategies)
    if metrics["regions_breakdown"]:
        made["04_trained_untrained"] = figures.trained_untrained_figure(metrics["regions_breakdown"])
    for name, preds in predictions.items():
        if "confidence_uncalibrated" in preds:
            before = preds.assign(confidence=preds["confidence_uncalibrated"])
            calibration = metrics["calibration"][name]
            made[f"04_reliability_uncalibrated_{name}"] = figures.reliability_diagram(
                reliability_table(before), calibration["ece_uncalibrated"],
                f"{model_labels(params['model'])[name]}: reliability before temperature scaling")
    return {name: show(fig, run, name) for name, fig in made.items()}


def coordinate_metrics(run: RunDir, params: dict) -> dict:
    """The coordinate keys of ``metrics.json``: ``methods``, ``ceilings``, ``baselines``, ``risk_coverage``,
    ``paired_vs_centroid`` (see ``coordinate_metrics_json``), and ``coordinate_settings`` (what validation
    chose), ``best_method`` (per model, the method other than centroid with the best validation score),
    ``gallery_overlap`` (test images with a gallery image at their point: retrieval's leak) and ``peers`` (each
    GeoCLIP method's gallery, backbone, validation scores and training: ``geoclip_summaries``)."""
    import numpy as np

    from lageo_utils.coordinate_metrics import chance_baseline, coordinate_metrics_json, reference_tables
    from lageo_utils.geolocate import load_locator

    regions = regions_of(params)
    region_ids = [str(r) for r in regions["id"]]
    centroids = regions[["centroid_lat", "centroid_lon"]].to_numpy(float)
    tables = load_coordinates(run)
    answers = {model: _by_method(table, voted=False) for model, table in tables.items()}
    voted = {model: _by_method(table, voted=True) for model, table in tables.items()}
    # a model answered by GeoCLIP alone (an image-only backbone before training) has no locator of lageo's
    locators = {model: load_locator(run.locator(model)) for model in tables if run.locator(model).exists()}
    gallery = locators["finetuned"].gallery
    test = load_split(run, "test")
    test = test[test["image_path"].isin(answers["finetuned"]["centroid"]["image_path"])].reset_index(drop=True)
    cells_from = next((m for m in ("finetuned", "zeroshot") if m in locators and locators[m].geocell_model is not None),
                      None)
    ceilings, baselines = reference_tables(
        test, centroids, region_ids, gallery.lat, gallery.lon, np.asarray(region_ids)[gallery.region],
        cells=locators[cells_from].geocell_model.cells if cells_from else None, seed=params["seed"])
    for name in ("geocell", "geocell_centre"):
        if name in ceilings:
            ceilings[name].attrs["info"] = {"cells_of": cells_from,
                                            "resolution": locators[cells_from].geocell_model.cells.resolution}
    chance = chance_baseline(test["latitude"], test["longitude"], centroids)
    doc = coordinate_metrics_json(answers, voted=voted, ceilings=ceilings, baselines={"chance": chance, **baselines},
                                  n_boot=params["n_boot"], seed=params["seed"])
    doc["coordinate_settings"] = {model: locator.settings() for model, locator in locators.items()}
    doc["best_method"] = {model: _best_on_validation(doc["coordinate_settings"][model], answers[model])
                          if model in locators else None for model in tables}
    same_point = ceilings["retrieval"]["error_km"] < 0.001
    doc["gallery_overlap"] = {"split_strategy": params["split_strategy"], "n_test_images": len(test),
                              "test_images_with_gallery_image_within_1m": int(same_point.sum())}
    doc["peers"] = geoclip_summaries(run, params)
    return doc


def _by_method(table: pd.DataFrame, voted: bool) -> dict[str, pd.DataFrame]:
    part = table[table["voted"] == voted]
    return {method: rows.reset_index(drop=True) for method, rows in part.groupby("method", sort=False)}


def _best_on_validation(settings: dict, answered) -> str | None:
    """The answered method (not centroid) whose validation objective scored best; None when only centroid ran."""
    scores = {method: entry["score"] for method, entry in settings.items() if method in answered}
    return max(scores, key=scores.get) if scores else None


def evaluation_figures(run: RunDir, params: dict, metrics: dict, predictions: dict[str, pd.DataFrame]) -> dict:
    """Step 04's figures for both models: comparison, per-region F1, confusion, maps, calibration, examples,
    and the coordinate answers (error map of centroid vs the best method, risk-coverage, retrieval neighbours)."""
    from lageo_utils import figures, maps
    from lageo_utils.metrics import confusion, reliability_table

    regions = regions_of(params)
    labels = model_labels(params["model"])
    labelled = {labels[k]: metrics[k] for k in MODELS if k in metrics}
    made = {"04_comparison": figures.comparison_bar(labelled),
            "04_per_region_f1": figures.per_region_bars(labelled, regions)}
    for name, preds in predictions.items():
        label = labels[name]
        made[f"04_confusion_{name}"] = figures.confusion_matrix_figure(confusion(preds, regions), f"{label}: confusion")
        made[f"04_error_map_{name}"] = maps.error_map(preds, regions, seed=params["seed"])
        made[f"04_region_error_{name}"] = maps.region_error_map(preds, regions)
        made[f"04_reliability_{name}"] = figures.reliability_diagram(reliability_table(preds), metrics[name]["ece"],
                                                                     f"{label}: reliability")
        made[f"04_examples_{name}"] = figures.example_grid(preds, image_root(run), regions, seed=params["seed"])
    made.update(coordinate_figures(run, params, metrics))
    return {name: show(fig, run, name) for name, fig in made.items()}


def coordinate_figures(run: RunDir, params: dict, metrics: dict) -> dict:
    """The fine-tuned model's coordinate figures: centroid vs best-method error map, risk-coverage curves
    (both models) and, for a few test images, their nearest gallery images."""
    from lageo_utils import figures, maps

    answers = _by_method(load_coordinates(run)["finetuned"], voted=False)
    best = metrics["best_method"]["finetuned"]
    shown = {"centroid": answers["centroid"], **({best: answers[best]} if best else {})}
    labels = model_labels(params["model"])
    made = {"04_coordinate_errors": maps.coordinate_error_map(shown, regions_of(params), seed=params["seed"],
                                                              title=f"{labels['finetuned']}: coordinate errors"),
            "04_risk_coverage": figures.risk_coverage_figure(metrics["risk_coverage"], labels)}
    if "retrieval" in answers:
        made["04_neighbours"] = figures.neighbour_figure(answers["retrieval"], load_split(run, "train"), image_root(run),
                                                         seed=params["seed"])
    return made


def explorer(run: RunDir, params: dict):
    """The interactive explorer widget over both models' predictions (needs a live kernel)."""
    from lageo_utils.explorer import PredictionExplorer

    return PredictionExplorer(load_predictions(run), regions_of(params), image_root(run),
                              labels=model_labels(params["model"]),
                              coordinates=load_coordinates(run)).widget


# --- 06: probing ------------------------------------------------------------------------------

def probing_predictors(run: RunDir, params: dict) -> dict:
    """The models probed, by name: zero-shot CLIP (when the model has a text tower) and each strategy's checkpoint."""
    from lageo_utils.model import has_text_tower
    from lageo_utils.predict import GeoPredictor, load_finetuned

    regions = regions_of(params)
    clip = load_model(params)
    model, preprocess, tokenizer = clip
    predictors = {}
    if has_text_tower(model):
        predictors["zeroshot"] = GeoPredictor(model, preprocess, tokenizer, regions, device=params["device"],
                                              model_name=params["model"], temperature=zero_shot_temperature(run))
    for strategy in run_strategies(params):  # each fine-tuned strategy (the first is the run's "finetuned")
        predictors[strategy] = load_finetuned(run.strategy_checkpoints(strategy) / "best.pt", regions,
                                              device=params["device"], clip=clip)
    return predictors


def probe(run: RunDir, params: dict) -> tuple[dict, dict]:
    """Cue-removal probing on the validation split (``lageo_utils.probing``): each model's predictions on the
    original images and under each of ``interventions``, their drops, per-region drops and the regression.

    Figures: ``06_interventions`` (what each intervention does to the first validation image) and
    ``06_region_drops_<model>``. ``probing.json`` is written last, so its presence means the step finished.
    Returns the ``probing.json`` document and the figures by name.
    """
    from lageo_utils import probing
    from lageo_utils.images import open_rgb
    from lageo_utils.predict import predict_manifest

    if not params["interventions"]:
        raise ValueError("interventions is empty: nothing to probe (set it, e.g. -p interventions grayscale,sky_mask)")
    interventions, skipped = probing.resolve_interventions(params["interventions"])
    val, root, cache = load_split(run, "val"), image_root(run), embedding_cache_dir()
    settings = {"batch_size": params["embed_batch_size"], "top_k": params["top_k"], "cache_dir": cache}
    results, text_found = {}, None
    for name, predictor in (probing_predictors(run, params) if interventions else {}).items():  # none: all skipped
        original = predict_manifest(predictor, val, root, **settings)
        intervened = {i.name: probing.predict_intervened(predictor, val, root, i, **settings) for i in interventions}
        text_found = next((t.attrs["text_found"] for t in intervened.values() if "text_found" in t.attrs), text_found)
        results[name] = _probe_model(original, intervened, params)
        log.info("probing %s: %s", name, ", ".join(f"{row.intervention} {row.accuracy_drop:+.3f}"
                                                   for row in results[name]["drops"].itertuples()))
    doc = probing.probing_json(results, interventions, skipped=skipped, text_found=text_found, split="val",
                               n_boot=params["n_boot"], seed=params["seed"])
    regions = regions_of(params)
    made = {"06_interventions": probing.intervention_thumbnails(open_rgb(root / val["image_path"].iloc[0]),
                                                                interventions)} if interventions else {}
    for name, result in results.items():
        made[f"06_region_drops_{name}"] = probing.region_drop_heatmap(
            result["per_region"], regions,
            title=f"{model_labels(params['model']).get(name, name)}: accuracy drop per region")
    figures = {name: show(fig, run, name) for name, fig in made.items()}
    write_json(run.probing, doc)
    return doc, figures


def _probe_model(original: pd.DataFrame, intervened: dict, params: dict) -> dict:
    """``probe_model``; when every answer is the same under every condition there is no regression to fit, and
    its place says why (the drops still stand)."""
    from lageo_utils import probing

    try:
        return probing.probe_model(original, intervened, n_boot=params["n_boot"], seed=params["seed"])
    except ValueError as exc:
        log.warning("probing: no regression (%s)", exc)
        return {"drops": probing.intervention_drops(original, intervened, n_boot=params["n_boot"], seed=params["seed"]),
                "per_region": probing.region_drops(original, intervened), "regression": {"not_fitted": str(exc)}}


# --- GeoCLIP, a peer method (steps 02 and 03; lageo_utils.peers.geoclip, docs/peers.md) -------------------------

# The lageo model whose coordinates table holds each GeoCLIP method, and whose centroid answer it is paired with:
# the shipped weights beside zero-shot CLIP (step 02), the fine-tuned heads beside fine-tuned CLIP (step 03).
GEOCLIP_METHOD_OF = {"zeroshot": "geoclip", "finetuned": "geoclip_finetuned"}


def geoclip_backbone(params: dict) -> str | None:
    """``geoclip_backbone`` as ``load_geoclip`` takes it: a folder relative to the project when one is there (or the
    value starts with . or ~), else a Hugging Face model id; None: ``$LAGEO_GEOCLIP_BACKBONE`` or the default."""
    value = params.get("geoclip_backbone")
    if value is None:
        return None
    local = project_path(value)
    return str(local) if local.exists() or value.startswith((".", "~")) else value


def geoclip_answers(run: RunDir, params: dict, model: str) -> pd.DataFrame | None:
    """GeoCLIP's rows for ``model``'s coordinates table, or None when ``geo_methods`` does not ask for them.

    ``zeroshot`` (step 02): ``geoclip``, GeoCLIP's shipped image head and location encoder;
    ``finetuned`` (step 03): ``geoclip_finetuned``, those trained on the training split (the
    images of ``train_regions`` when set, as lageo's strategies) into ``checkpoints/geoclip_finetuned/``
    with the backbone frozen, resuming from its ``last.pt``, answering with the validation-best
    ``best.pt``. Both answer over the LA GPS gallery (a grid over the region boxes every
    ``geoclip_spacing_m`` plus the training split's coordinates) as GeoCLIP's ``predict`` does: the
    most probable gallery point (its probability the confidence) and the ``geoclip_top_k`` best
    coordinates and probabilities (``top_k_lat``, ``top_k_lon``, ``top_k_prob``), per image and
    pooled per capture point (``voted``). The validation split is answered too, into
    ``peers/<method>/`` with the gallery and ``summary.json`` (written last).
    """
    from lageo_utils.peers import geoclip as gc

    method = GEOCLIP_METHOD_OF[model]
    if method not in params["geo_methods"]:
        return None
    geo = gc.load_geoclip(geoclip_backbone(params), device=params["device"])
    rows = {name: load_split(run, name) for name in SPLITS}
    gallery = gc.la_gps_gallery(regions_of(params), params["geoclip_spacing_m"], rows["train"]["latitude"],
                                rows["train"]["longitude"])
    settings = {"root": image_root(run), "cache_dir": embedding_cache_dir(), "batch_size": params["embed_batch_size"],
                "num_workers": params["num_workers"]}
    training = None
    if method == gc.FINETUNED_METHOD:
        config = gc.GeoclipTrainConfig(epochs=params["geoclip_epochs"], batch_size=params["geoclip_batch_size"],
                                       learning_rate=params["geoclip_lr"], queue_size=params["geoclip_queue_size"],
                                       seed=params["seed"])
        trained = params["train_regions"]
        seen = {name: rows[name][rows[name]["region_id"].isin(trained)] if trained else rows[name]
                for name in ("train", "val")}
        out = run.checkpoints / method
        result = gc.finetune_geoclip(geo, seen["train"], seen["val"], out, config, root=settings["root"],
                                     gallery=gallery, cache_dir=settings["cache_dir"], device=params["device"],
                                     resume=(out / gc.LAST).exists(), embed_batch_size=settings["batch_size"],
                                     num_workers=settings["num_workers"])
        geo, training = gc.load_finetuned(geo, result.best_checkpoint), result.summary
    locations = gc.gallery_embeddings(geo, gallery)
    tables, failures = {}, []
    for split in ("val", "test"):
        found = gc.backbone_features(geo, rows[split]["image_path"].astype(str).tolist(), **settings)
        if len(found.rows) == 0:
            raise ValueError(f"{method}: no image of the {split} split could be read")
        answered = rows[split].iloc[found.rows].reset_index(drop=True)
        tables[split] = _geoclip_table(geo, answered, found.features, gallery, locations, params["geoclip_top_k"],
                                       method)
        failures += found.failures.assign(split=split).to_dict("records")
    target = run.peer(method)
    target.mkdir(parents=True, exist_ok=True)
    gallery.to_parquet(target / "gallery.parquet", index=False)
    tables["val"].to_parquet(target / "val_answers.parquet", index=False)
    write_json(target / "summary.json", _geoclip_summary(geo, method, model, gallery, tables, failures, training))
    per_image = tables["test"][~tables["test"]["voted"]]["error_km"].median()
    log.info("%s: %d gallery points, %d test images, median error %.2f km", method, len(gallery),
             int((~tables["test"]["voted"]).sum()), per_image)
    return tables["test"]


def _geoclip_table(geo, rows: pd.DataFrame, features, gallery: pd.DataFrame, locations, top_k: int,
                   method: str) -> pd.DataFrame:
    """Coordinates-table rows of one split: per image, then pooled per capture point (when rows have location_id)."""
    from lageo_utils.geolocate import answers_table
    from lageo_utils.peers import geoclip as gc

    parts = []
    for voted in (False, True) if "location_id" in rows.columns else (False,):
        answers, top_lat, top_lon, top_prob = gc.answer_features(
            geo, features, gallery, top_k=top_k, method=method, locations=locations,
            location_ids=rows["location_id"].to_numpy() if voted else None)
        # The neighbours of GeoCLIP's answers are GPS gallery rows, not training images: the top-k columns say more.
        table = answers_table(rows, answers).drop(columns=["neighbours", "neighbour_similarities"])
        parts.append(table.assign(voted=voted, top_k_lat=top_lat.tolist(), top_k_lon=top_lon.tolist(),
                                  top_k_prob=top_prob.tolist()))
    return pd.concat(parts, ignore_index=True)


def _geoclip_summary(geo, method: str, model: str, gallery: pd.DataFrame, tables: dict, failures: list,
                     training: dict | None) -> dict:
    from lageo_utils.coordinate_metrics import COORDINATE_THRESHOLDS_KM
    from lageo_utils.geo import acc_at_km

    def scores(table: pd.DataFrame) -> dict:
        errors = table.loc[~table["voted"], "error_km"]
        return {"n_images": len(errors), "median_error_km": float(errors.median()),
                "acc_at_km": acc_at_km(errors, COORDINATE_THRESHOLDS_KM)}

    return {
        "method": method,
        "coordinates_of": model,  # the coordinates table (and the centroid answer it is paired with)
        "backbone": geo.backbone_name,
        "backbone_identity": geo.backbone_identity,
        "gallery": {"points": len(gallery), **{k: int(v) for k, v in gallery["source"].value_counts().items()},
                    **gallery.attrs},
        "top_k": len(tables["test"]["top_k_prob"].iloc[0]),
        "val": scores(tables["val"]),
        "test_images": int((~tables["test"]["voted"]).sum()),
        "unreadable_images": failures,
        "training": training,
    }


def geoclip_summaries(run: RunDir, params: dict) -> dict:
    """The ``peers`` key of ``metrics.json``: each GeoCLIP method's ``summary.json`` (gallery, backbone,
    validation scores, training), for the methods ``geo_methods`` asked for."""
    found = {}
    for method in GEOCLIP_METHOD_OF.values():
        path = run.peer(method) / "summary.json"
        if method in params["geo_methods"] and path.exists():
            found[method] = json.loads(path.read_text())
    return found
