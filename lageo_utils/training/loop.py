"""The training loop every strategy shares: optimizer, schedule, AMP, validation, checkpoints, resuming.

The head is initialised from the region text embeddings times the model's ``logit_scale`` (bias
0), so before training it computes exactly the zero-shot logits. Classes are the regions of the
region file, in its order; training regions may be a subset: the loss only covers regions with
training images and the head has no weight decay, so the other rows keep their text weights.
Strategy families live in their own modules (``embedding``: on cached embeddings; ``encoder``:
image-encoder weights on images); this module drives them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lageo_utils.calibration import fit_temperature, nll
from lageo_utils.checkpoints import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    seed_everything,
)
from lageo_utils.files import atomic_write
from lageo_utils.images import collate_skip_failures, default_num_workers
from lageo_utils.model import autocast, autocast_dtype, has_text_tower, load_model, resolve_device, weights_identity
from lageo_utils.params import ParamError
from lageo_utils.predict import RegionClassifier, load_classifier_state
from lageo_utils.prompts import encode_region_texts
from lageo_utils.training.config import (
    EMBEDDING_STRATEGIES,
    RESUMABLE_CHANGES,
    STRATEGIES,
    TEXT_STRATEGIES,
    TrainConfig,
)
from lageo_utils.training.data import TensorBatches, TrainData, checked_manifest, frame_hash
from lageo_utils.training.distributed import (
    ONE,
    GlobalBatchSampler,
    Processes,
    Trainee,
    from_environment,
    sync_unless,
)
from lageo_utils.training.embedding import embedding_data_factory
from lageo_utils.training.encoder import image_data, train_transform, trainable_encoder

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_acc", "lr", "seconds"]
BEST, LAST, HISTORY, SUMMARY = "best.pt", "last.pt", "history.csv", "train_summary.json"

StepHook = Callable[[int, int], None]  # (epoch, batch index) after each training batch


@dataclass
class TrainResult:
    """What ``train`` wrote: the summary, the history and the checkpoint paths."""

    summary: dict
    history: pd.DataFrame
    out_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path

    @classmethod
    def read(cls, out_dir: str | os.PathLike) -> TrainResult:
        """What a finished run wrote into ``out_dir`` (e.g. ``torchrun`` processes started elsewhere)."""
        out = Path(out_dir)
        summary = out / SUMMARY
        if not summary.is_file():
            raise FileNotFoundError(f"{summary}: no training summary (the run did not finish)")
        return cls(json.loads(summary.read_text()), pd.read_csv(out / HISTORY), out, out / BEST, out / LAST)


@dataclass
class _Run:
    """The mutable state of one training run."""

    config: TrainConfig
    classifier: RegionClassifier
    region_ids: list[str]
    train: TrainData | None
    val: TrainData
    device: torch.device
    out_dir: Path
    base_identity: str
    data_hashes: dict
    optimizer: torch.optim.Optimizer | None = None
    trainee: torch.nn.Module | None = None  # the training forward; in DistributedDataParallel on several processes
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    scaler: torch.amp.GradScaler | None = None
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_val_acc: float = -1.0
    zeroshot_val_acc: float | None = None
    bad_epochs: int = 0
    stopped_early: bool = False
    failures: dict = field(default_factory=dict)  # image path -> reason, unreadable images
    resumed_from: int | None = None
    # Checkpoints also hold the frozen encoder weights: a randomly initialised base cannot be reloaded.
    self_contained: bool = False
    processes: Processes = field(default_factory=Processes)  # torch.distributed: this process's rank and the world
    text_head: bool = True  # the head starts from the region prompts (CLIP); False: from zero (image-only backbone)

    @property
    def epoch(self) -> int:
        return int(self.history[-1]["epoch"]) if self.history else 0


def train(
    train_manifest: pd.DataFrame | str | os.PathLike,
    val_manifest: pd.DataFrame | str | os.PathLike,
    regions,
    image_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: TrainConfig | None = None,
    *,
    device: str | torch.device = "auto",
    cache_dir: str | os.PathLike | None = None,
    resume: bool = False,
    clip: tuple | None = None,
    on_step: StepHook | None = None,
) -> TrainResult:
    """Train (or, for ``zeroshot``, only evaluate) a region classifier; write checkpoints, history and summary.

    ``train_manifest``/``val_manifest`` are canonical manifests (DataFrames or CSV/Parquet paths,
    ``image_path`` relative to ``image_root``). Writes ``best.pt`` (best validation accuracy),
    ``last.pt`` (after every epoch), ``history.csv`` and ``train_summary.json`` into ``out_dir``.
    ``resume=True`` continues from ``out_dir/last.pt``. ``clip`` is an already loaded
    ``(model, preprocess, tokenizer)`` matching ``config.model_name``/``pretrained``; it is never
    modified. ``cache_dir`` holds the embedding cache (default ``out_dir/embedding_cache``).
    ``on_step(epoch, batch)`` is called after every training batch (progress, tests).

    Started by ``torchrun --nproc_per_node N``, every process trains on its slice of each global
    batch through DistributedDataParallel (see ``training.distributed``) and process 0 writes the files.
    """
    config = config or TrainConfig()
    target = resolve_device(device)
    processes = from_environment(target)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = load_checkpoint(out / LAST) if resume else None
    if checkpoint is not None:
        _check_resumable(checkpoint, config, out / LAST)
    with deterministic():
        seed_everything(config.seed)
        run = _prepare_run(
            train_manifest, val_manifest, regions, image_root, out, config, processes.device(target),
            Path(cache_dir) if cache_dir is not None else out / "embedding_cache", clip, checkpoint, processes,
        )
        if checkpoint is None and run.text_head:  # a zero head (image-only backbone) has no zero-shot accuracy
            run.zeroshot_val_acc = _evaluate(run, epoch=0)[1]
            _info(run, "zero-shot validation accuracy: %.4f", run.zeroshot_val_acc)
            if config.strategy == "zeroshot":
                run.best_val_acc = run.zeroshot_val_acc
                _save(run, improved=True)
        elif checkpoint is not None:
            _restore(run, checkpoint)
        fit(run, on_step)
    return _finish(run)


def _prepare_run(train_manifest, val_manifest, regions, image_root, out, config, device, cache_dir, clip, checkpoint,
                 processes):
    region_ids = [str(r) for r in regions["id"]]
    # Training and model selection see only the training regions' images (train_regions); evaluation keeps all.
    train_df = _training_regions(checked_manifest(train_manifest, regions, "train"), config, region_ids, "train")
    val_df = _training_regions(checked_manifest(val_manifest, regions, "val"), config, region_ids, "val")
    data_hashes = {"train": frame_hash(train_df), "val": frame_hash(val_df)}
    if checkpoint is not None:
        if checkpoint["region_ids"] != region_ids:
            raise CheckpointError(f"{out / LAST}: trained on regions {checkpoint['region_ids']}, not {region_ids}")
        if checkpoint["data_hashes"] != data_hashes:
            raise CheckpointError(f"{out / LAST}: the train/val manifests changed since the checkpoint was written")

    model, preprocess, tokenizer = clip if clip is not None else load_model(config.model_name, config.pretrained, device)
    model = model.to(device)
    if not has_text_tower(model) and config.strategy in TEXT_STRATEGIES:
        raise ValueError(f"strategy {config.strategy!r} needs a text tower; {config.model_name} is image-only "
                         f"(use one of {', '.join(s for s in STRATEGIES if s not in TEXT_STRATEGIES)})")
    base_identity = weights_identity(model)
    if checkpoint is not None and checkpoint["base_identity"] != base_identity:
        raise CheckpointError(f"{out / LAST}: the model's weights differ from those the run started with")
    if checkpoint is not None:
        class_embeddings = checkpoint["model"]["class_embeddings"].to(device)
    elif has_text_tower(model):
        class_embeddings = encode_region_texts(model, tokenizer, regions, templates=config.templates, device=device)
    else:  # no text to start from: the linear head starts at zero
        class_embeddings = torch.zeros(len(region_ids), model.visual.output_dim, device=device)
    logit_scale = float(model.logit_scale.exp().item()) if has_text_tower(model) else 1.0

    if config.strategy in EMBEDDING_STRATEGIES:
        visual = model.visual
        embed = embedding_data_factory(model, preprocess, image_root, cache_dir, config, device, processes)
        val = embed(val_df, region_ids)
        train = embed(train_df, region_ids) if config.strategy != "zeroshot" else None
    else:
        visual = trainable_encoder(model.visual, config)
        val = image_data(val_df, region_ids, preprocess, image_root)
        train = image_data(train_df, region_ids, train_transform(preprocess, visual, config.augment), image_root)
    classifier = RegionClassifier(visual, class_embeddings, logit_scale, head=config.head)
    return new_run(config, classifier, region_ids, train, val, device, out, base_identity, data_hashes, processes,
                   text_head=has_text_tower(model))


def _training_regions(df: pd.DataFrame, config: TrainConfig, region_ids: list[str], name: str) -> pd.DataFrame:
    """The rows of the regions ``config.train_regions`` names (all rows when it is None)."""
    if config.train_regions is None:
        return df
    unknown = sorted(set(config.train_regions) - set(region_ids))
    if unknown:
        raise ParamError(f"train_regions {unknown} are not in the region file (ids: {region_ids})")
    kept = df[df["region_id"].astype(str).isin(config.train_regions)].reset_index(drop=True)
    if kept.empty:
        raise ValueError(f"the {name} split has no image of train_regions {config.train_regions}")
    return kept


def new_run(config, classifier, region_ids, train, val, device, out, base_identity, data_hashes,
            processes: Processes = ONE, text_head: bool = True) -> _Run:
    """A run at epoch 0 with its optimizer, schedule and loss scaler (``text_head``: see ``_Run``)."""
    if config.batch_size % processes.world:
        raise ValueError(f"batch_size {config.batch_size} must be a multiple of the number of processes "
                         f"({processes.world}): it is the global batch, shared among them")
    run = _Run(config, classifier.to(device), region_ids, train, val, device, out, base_identity, data_hashes,
               self_contained=config.pretrained is None, processes=processes, text_head=text_head)
    if train is not None:
        if len(train.labels) == 0:
            raise ValueError("the training split has no readable images")
        run.optimizer, run.scheduler = _optimizer(classifier, config, _steps_per_epoch(run) * config.epochs)
        trained = [p for group in run.optimizer.param_groups for p in group["params"]]
        run.trainee = processes.parallel(Trainee(run.classifier, trained, train.images), device)
        run.scaler = torch.amp.GradScaler("cuda", enabled=_needs_grad_scaler(device))
    return run


def _optimizer(classifier: RegionClassifier, config: TrainConfig, total_steps: int):
    """AdamW (decay on encoder matrices only) and a per-step linear warm-up + cosine schedule."""
    decay, no_decay = [], []
    if config.strategy not in EMBEDDING_STRATEGIES:
        for name, param in classifier.visual.named_parameters():
            if param.requires_grad:
                (decay if param.ndim >= 2 and "embedding" not in name else no_decay).append(param)
    head = classifier.head_parameters()
    groups = [{"params": params, "weight_decay": wd}
              for params, wd in ((decay, config.weight_decay), (no_decay, 0.0), (head, 0.0)) if params]
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate)
    warmup = int(config.warmup_fraction * total_steps)

    # torch ships warm-up and cosine schedulers but not the two joined per step with a resumable state
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _needs_grad_scaler(device: torch.device) -> bool:
    """float16 autocast (CUDA without bfloat16) needs loss scaling; bfloat16 and float32 do not."""
    return device.type == "cuda" and autocast_dtype(device) == torch.float16


def _loader(run: _Run, data: TrainData, shuffle: bool, epoch: int) -> DataLoader | TensorBatches:
    # The shuffle order is fixed by (seed, epoch), so a resumed epoch repeats it; every process draws the same one and
    # takes its slice of each global batch. Validation: the data in order, each process its slice of each batch.
    # Workers are seeded from the generator (torch seeds random, numpy and torch in each worker from the loader's
    # base seed).
    seed = run.config.seed * 1_000_003 + epoch
    batch_size = run.config.batch_size if shuffle else max(run.config.batch_size, run.config.embed_batch_size)
    batches = GlobalBatchSampler(len(data.labels), batch_size, run.processes, seed if shuffle else None)
    if not data.images:  # cached embeddings, in memory: sliced by index, no loader
        return TensorBatches(data.dataset, batches)
    return DataLoader(
        data.dataset,
        batch_sampler=batches,
        generator=torch.Generator().manual_seed(seed),
        num_workers=default_num_workers(run.config.num_workers),
        collate_fn=collate_skip_failures,
        pin_memory=run.device.type == "cuda",
    )


def _batches(run: _Run, data: TrainData, loader: DataLoader | TensorBatches):
    """Yield ``(inputs, labels)`` on the device; record unreadable images and skip empty batches."""
    for batch in loader:
        if data.images:
            inputs, indices, failures = batch
            for index, reason in failures:
                run.failures.setdefault(data.paths[index], reason)
        else:
            inputs, indices = batch
        if inputs is None:
            yield None, None
            continue
        labels = data.labels[indices].to(run.device, non_blocking=True)
        yield inputs.to(run.device, non_blocking=True), labels


def _logits(run: _Run, model: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
    with autocast(run.device):
        logits = model(inputs)
    return logits.float()


def _steps_per_epoch(run: _Run) -> int:
    batches = math.ceil(len(run.train.labels) / run.config.batch_size)
    return math.ceil(batches / run.config.grad_accum_steps)


def train_epoch(run: _Run, epoch: int, on_step: StepHook | None) -> float:
    """One epoch of training; returns the mean training loss (over every process's images)."""
    config, data, processes = run.config, run.train, run.processes
    run.classifier.train(data.images)
    # The loss covers only regions with training images: the others keep their text-initialised weights.
    train_classes = torch.unique(data.labels).to(run.device)
    remap = torch.full((len(run.region_ids),), -1, dtype=torch.long, device=run.device)
    remap[train_classes] = torch.arange(len(train_classes), device=run.device)
    every_class = len(train_classes) == len(run.region_ids)  # then no column selection, no remapping (same numbers)
    loader = _loader(run, data, shuffle=True, epoch=epoch)
    total = torch.zeros((), device=run.device)  # summed on the device: no sync per batch on one process
    count, pending = 0, 0
    run.optimizer.zero_grad(set_to_none=True)
    progress = tqdm(_batches(run, data, loader), total=len(loader), desc=f"epoch {epoch}", leave=False,
                    disable=not processes.main)
    for i, (inputs, labels) in enumerate(progress):
        here = len(labels) if inputs is not None else 0
        # The global batch's readable images: the loss is their mean, whichever process holds them.
        readable = here if processes.world == 1 else int(processes.sum_(torch.tensor(float(here))).item())
        pending += bool(readable)
        step = bool(pending) and ((i + 1) % config.grad_accum_steps == 0 or i + 1 == len(loader))
        with sync_unless(not step, run.trainee):
            if here:
                logits = _logits(run, run.trainee, inputs)
                if not every_class:
                    logits, labels = logits[:, train_classes], remap[labels]
                loss = F.cross_entropy(logits, labels, reduction="sum")
                # DDP averages the processes' gradients: times world, their summed losses make the global mean.
                run.scaler.scale(loss * processes.world / (readable * config.grad_accum_steps)).backward()
                total += loss.detach()
                count += here
                if i % 10 == 0:
                    progress.set_postfix(loss=f"{total.item() / count:.4f}")
            elif step and processes.world > 1:
                run.scaler.scale(run.trainee(None)).backward()  # joins the step's all-reduce (see Trainee)
        if step:
            _optimizer_step(run)
            pending = 0
        if on_step is not None:
            on_step(epoch, i)
    count = int(processes.sum_(torch.tensor(float(count))).item()) if processes.world > 1 else count
    if count == 0:
        raise ValueError("no training image could be read in this epoch")
    return processes.sum_(total.cpu()).item() / count


def _optimizer_step(run: _Run) -> None:
    """Clip, step and schedule on the gradients (averaged over the processes by DDP in the last backward)."""
    if run.config.max_grad_norm is not None:
        run.scaler.unscale_(run.optimizer)
        params = [p for group in run.optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, run.config.max_grad_norm)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def _validation_logits(run: _Run, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of every readable validation image (all regions), on the CPU."""
    data = run.val
    run.classifier.eval()
    model = run.classifier if data.images else run.classifier.classify
    logits, labels = [], []
    loader = _loader(run, data, shuffle=False, epoch=epoch)
    for inputs, batch_labels in tqdm(_batches(run, data, loader), total=len(loader), desc="validation", leave=False,
                                     disable=not run.processes.main):
        if inputs is not None:
            logits.append(_logits(run, model, inputs).cpu())
            labels.append(batch_labels.cpu())
    # Each process validated its slice of each batch; all of them get every slice (in rank order, not the data's:
    # the loss, accuracy and temperature do not depend on it) and so take the same decisions.
    gathered = run.processes.gather((logits, labels))
    logits = [batch for process_logits, _ in gathered for batch in process_logits]
    labels = [batch for _, process_labels in gathered for batch in process_labels]
    if not logits:
        raise ValueError("the validation split has no readable images")
    return torch.cat(logits), torch.cat(labels)


def _evaluate(run: _Run, epoch: int) -> tuple[float, float]:
    """Validation loss and accuracy over all regions."""
    logits, labels = _validation_logits(run, epoch)
    return float(F.cross_entropy(logits, labels)), float((logits.argmax(dim=1) == labels).float().mean())


def _calibrate(run: _Run) -> dict:
    """Fit the best checkpoint's temperature on the validation split and store it in ``best.pt``."""
    run.processes.barrier()  # process 0 has written best.pt
    best = load_checkpoint(run.out_dir / BEST)
    load_classifier_state(run.classifier, best["model"], complete=run.self_contained)
    logits, labels = _validation_logits(run, epoch=best["epoch"])
    temperature = fit_temperature(logits, labels)
    if run.processes.main:
        save_checkpoint({**best, "temperature": temperature}, run.out_dir / BEST)
    return {"temperature": temperature, "val_nll": nll(logits, labels), "val_nll_calibrated": nll(logits, labels,
                                                                                                   temperature)}


def fit(run: _Run, on_step: StepHook | None) -> None:
    if run.train is None:
        return
    with _head_only_settings(run):
        _epochs(run, on_step)


@contextlib.contextmanager
def _head_only_settings(run: _Run):
    """For head-only training on the CPU: one intra-op thread, no NaN filling of new tensors; restored afterwards.

    Its matrix products (batch x embedding dim x regions) are too small to gain from more threads,
    and on busy shared cores the extra threads wait on each other: 8 epochs on 6,000 embeddings
    took 3 s with one thread and 60 s with two on this project's 2-core machine. Deterministic mode
    fills every new tensor with NaN (``fill_uninitialized_memory``) so that reading uninitialised
    memory is reproducible; every op of a head step writes its whole output, so the filling only
    costs time (a write per new tensor, of which a step makes dozens) and changes no number.
    """
    threads, fill = torch.get_num_threads(), torch.utils.deterministic.fill_uninitialized_memory
    if run.device.type == "cpu" and not run.train.images:
        torch.set_num_threads(1)
        torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def _epochs(run: _Run, on_step: StepHook | None) -> None:
    config = run.config
    for epoch in range(run.epoch + 1, config.epochs + 1):
        if run.stopped_early:
            break
        started = time.perf_counter()
        train_loss = train_epoch(run, epoch, on_step)
        val_loss, val_acc = _evaluate(run, epoch)
        run.history.append({
            "epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_acc": val_acc,
            "lr": run.optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - started,
        })
        improved = val_acc > run.best_val_acc
        if improved:
            run.best_epoch, run.best_val_acc, run.bad_epochs = epoch, val_acc, 0
        else:
            run.bad_epochs += 1
        run.stopped_early = config.patience is not None and run.bad_epochs >= config.patience
        _save(run, improved)
        _info(run, "epoch %d: train_loss %.4f, val_loss %.4f, val_acc %.4f%s", epoch, train_loss, val_loss, val_acc,
              " (best)" if improved else "")
        if run.stopped_early:
            _info(run, "early stopping: no better validation accuracy in %d epochs", config.patience)


def _info(run: _Run, message: str, *args) -> None:
    """Log from process 0 only."""
    if run.processes.main:
        log.info(message, *args)


def _model_state(run: _Run) -> dict:
    """What a checkpoint stores of the classifier: the trained encoder weights, the head and the class embeddings.

    Frozen encoder weights are left out when they can be reloaded from ``pretrained`` (checked
    through ``base_identity``); with a randomly initialised base the whole encoder is stored.
    """
    optimized = {id(p) for group in run.optimizer.param_groups for p in group["params"]} if run.optimizer else set()
    trained = {name for name, p in run.classifier.named_parameters() if id(p) in optimized}
    return {
        name: tensor.detach().cpu()
        for name, tensor in run.classifier.state_dict().items()
        if run.self_contained or not name.startswith("visual.") or name in trained
    }


def _save(run: _Run, improved: bool) -> None:
    """Checkpoints and history, written by process 0 (every process takes part: the failures are gathered)."""
    for failures in run.processes.gather(run.failures):
        run.failures.update(failures)
    if not run.processes.main:
        return
    state = {
        "config": run.config.to_dict(),
        "region_ids": run.region_ids,
        "epoch": run.epoch,
        "model": _model_state(run),
        "logit_scale": run.classifier.logit_scale,
        "head": run.classifier.head_kind,
        "base_identity": run.base_identity,
        "self_contained": run.self_contained,
        "data_hashes": run.data_hashes,
        "optimizer": run.optimizer.state_dict() if run.optimizer is not None else None,
        "scheduler": run.scheduler.state_dict() if run.scheduler is not None else None,
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "rng": capture_rng_state(),
        "history": run.history,
        "best_epoch": run.best_epoch,
        "best_val_acc": run.best_val_acc,
        "zeroshot_val_acc": run.zeroshot_val_acc,
        "bad_epochs": run.bad_epochs,
        "stopped_early": run.stopped_early,
        "failures": run.failures,
    }
    save_checkpoint(state, run.out_dir / LAST, also=run.out_dir / BEST if improved else None)
    _write_history(run)


def _check_resumable(checkpoint: dict, config: TrainConfig, path: Path) -> None:
    saved = checkpoint["config"]
    changed = {k: (saved.get(k), v) for k, v in config.to_dict().items()
               if k not in RESUMABLE_CHANGES and saved.get(k) != v}
    if changed:
        detail = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise CheckpointError(f"{path}: cannot resume with a different configuration ({detail})")


def _restore(run: _Run, checkpoint: dict) -> None:
    load_classifier_state(run.classifier, checkpoint["model"], complete=run.self_contained)
    if run.optimizer is not None:
        run.optimizer.load_state_dict(checkpoint["optimizer"])
        run.scheduler.load_state_dict(checkpoint["scheduler"])
        run.scaler.load_state_dict(checkpoint["scaler"])
    run.history = list(checkpoint["history"])
    run.best_epoch, run.best_val_acc = checkpoint["best_epoch"], checkpoint["best_val_acc"]
    run.zeroshot_val_acc, run.bad_epochs = checkpoint["zeroshot_val_acc"], checkpoint["bad_epochs"]
    run.stopped_early, run.failures = checkpoint["stopped_early"], dict(checkpoint["failures"])
    run.resumed_from = checkpoint["epoch"]
    restore_rng_state(checkpoint["rng"])
    _info(run, "resumed from epoch %d (best epoch %d, val_acc %.4f)", run.epoch, run.best_epoch, run.best_val_acc)


def _write_history(run: _Run) -> None:
    frame = pd.DataFrame(run.history, columns=HISTORY_COLUMNS)
    atomic_write(run.out_dir / HISTORY, lambda tmp: frame.to_csv(tmp, index=False))


def _finish(run: _Run) -> TrainResult:
    config = run.config
    skipped = dict(run.failures)
    for data in (run.train, run.val):
        skipped.update(data.failures if data is not None else {})
    if skipped and run.processes.main:
        log.warning("%d unreadable images were skipped: %s", len(skipped), list(skipped.items())[:5])
    calibration = _calibrate(run)
    summary = {
        "strategy": config.strategy,
        "epochs_run": run.epoch,
        "best_epoch": run.best_epoch,
        "best_val_acc": run.best_val_acc,
        "zeroshot_val_acc": run.zeroshot_val_acc,
        "stopped_early": run.stopped_early,
        "resumed_from_epoch": run.resumed_from,
        "seed": config.seed,
        "model": config.model_name,
        "pretrained": config.pretrained,
        "lr": config.learning_rate,
        "batch_size": config.batch_size,
        "trainable_params": sum(p.numel() for group in run.optimizer.param_groups for p in group["params"])
        if run.optimizer is not None else 0,
        "n_train": _readable(run.train, skipped),
        "n_val": _readable(run.val, skipped),
        "data_hashes": run.data_hashes,
        "seconds": float(sum(h["seconds"] for h in run.history)),
        "skipped_images": [{"image_path": p, "reason": r} for p, r in sorted(skipped.items())],
        **calibration,
        "config": config.to_dict(),
    }
    if run.processes.main:
        _write_history(run)
        # written last and whole: the summary is what marks a finished training (TrainResult.read)
        atomic_write(run.out_dir / SUMMARY, lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
    run.processes.barrier()  # the others read what process 0 wrote
    return TrainResult.read(run.out_dir)


def _readable(data: TrainData | None, skipped: dict) -> int:
    """Images of a split that could be read (embedding strategies list only those in the first place)."""
    return 0 if data is None else sum(path not in skipped for path in data.paths)


@contextlib.contextmanager
def deterministic():
    """Deterministic kernels while training (warn-only where an op has none); restored afterwards."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


