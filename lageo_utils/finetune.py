"""Fine-tuning CLIP for region classification: five strategies, one resumable training loop.

Strategies (``TrainConfig.strategy``):

- ``zeroshot``: nothing is trained; the baseline through the same evaluation path.
- ``linear_probe``: a linear head over frozen, L2-normalised image embeddings, computed once
  through the embedding cache.
- ``partial``: the last ``unfreeze_blocks`` visual transformer blocks, the final norm and the
  projection, plus the head.
- ``full``: the whole image encoder plus the head.
- ``contrastive``: the whole image encoder against the fixed region prompt embeddings with
  CLIP's scaled-cosine cross-entropy (the seed study's approach; no head).

The head is initialised from the region text embeddings times the model's ``logit_scale`` (bias
0), so before training it computes exactly the zero-shot logits. Classes are the regions of the
region file, in its order; training regions may be a subset: the loss only covers regions with
training images and the head has no weight decay, so the other rows keep their text weights.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from lageo_utils.checkpoints import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    seed_everything,
)
from lageo_utils.images import ImageDataset, collate_skip_failures
from lageo_utils.model import autocast, load_clip, normalize_pretrained, resolve_device, weights_identity
from lageo_utils.zeroshot import GeoPredictor, encode_region_texts

log = logging.getLogger(__name__)

STRATEGIES = ("zeroshot", "linear_probe", "partial", "full", "contrastive")
EMBEDDING_STRATEGIES = ("zeroshot", "linear_probe")  # trained (or evaluated) on cached embeddings
DEFAULT_LR = {"zeroshot": 0.0, "linear_probe": 1e-3, "partial": 1e-5, "full": 1e-5, "contrastive": 1e-5}
HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_acc", "lr", "seconds"]
BEST, LAST, HISTORY, SUMMARY = "best.pt", "last.pt", "history.csv", "train_summary.json"
# Settings a resumed run may change; any other difference from the checkpoint's config is an error.
RESUMABLE_CHANGES = ("epochs", "patience", "num_workers")

StepHook = Callable[[int, int], None]  # (epoch, batch index) after each training batch


@dataclass
class TrainConfig:
    """Everything that defines a training run; stored in every checkpoint."""

    strategy: str = "linear_probe"
    model_name: str = "ViT-B-32"
    pretrained: str | None = "openai"
    epochs: int = 8
    lr: float | None = None  # None: DEFAULT_LR[strategy]
    weight_decay: float = 0.1  # encoder weights (matrices) only; biases, norms and the head get none
    batch_size: int = 32
    grad_accum_steps: int = 1
    warmup_fraction: float = 0.05  # of all optimizer steps, linear warm-up before the cosine decay
    max_grad_norm: float | None = 1.0
    unfreeze_blocks: int = 2  # partial: trained transformer blocks, counted from the last
    augment: bool = False  # random resized crop and colour jitter on training images
    patience: int | None = None  # early stopping after this many epochs without a better val accuracy
    seed: int = 42
    num_workers: int | None = None  # image loader workers; None: up to 4, one core left free
    templates: list[str] | None = None  # region prompt templates; None: the seed's template
    embed_batch_size: int = 64  # for computing cached embeddings (linear_probe, zeroshot)

    def __post_init__(self) -> None:
        self.pretrained = normalize_pretrained(self.pretrained)
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        # Plain Python numbers: the config is stored in checkpoints that load with weights_only=True.
        self.epochs = _checked_int("epochs", self.epochs, 1)
        self.batch_size = _checked_int("batch_size", self.batch_size, 1)
        self.grad_accum_steps = _checked_int("grad_accum_steps", self.grad_accum_steps, 1)
        self.unfreeze_blocks = _checked_int("unfreeze_blocks", self.unfreeze_blocks, 1)
        self.embed_batch_size = _checked_int("embed_batch_size", self.embed_batch_size, 1)
        self.seed = _checked_int("seed", self.seed, 0)
        if self.lr is not None:
            self.lr = _checked_float("learning rate", self.lr, above=0.0)
        self.weight_decay = _checked_float("weight_decay", self.weight_decay, at_least=0.0)
        self.warmup_fraction = _checked_float("warmup_fraction", self.warmup_fraction, at_least=0.0)
        if self.warmup_fraction >= 1:
            raise ValueError(f"warmup_fraction must be below 1, got {self.warmup_fraction!r}")
        if self.max_grad_norm is not None:
            self.max_grad_norm = _checked_float("max_grad_norm", self.max_grad_norm, above=0.0)
        if self.patience is not None:
            self.patience = _checked_int("patience", self.patience, 1)
        if self.num_workers is not None:
            self.num_workers = _checked_int("num_workers", self.num_workers, 0)
        if self.templates is not None:
            self.templates = [str(t) for t in self.templates]

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.strategy]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _checked_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _checked_float(name: str, value, *, above: float | None = None, at_least: float | None = None) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number) or (above is not None and number <= above) or (
        at_least is not None and number < at_least
    ):
        bound = f"> {above}" if above is not None else f">= {at_least}"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return number


class RegionClassifier(nn.Module):
    """Image encoder + region logits over L2-normalised embeddings.

    With a head (``linear_probe``, ``partial``, ``full``, ``zeroshot``): a linear layer initialised
    to ``logit_scale * class_embeddings`` with zero bias. Without (``contrastive``): CLIP's
    ``logit_scale * cosine`` against the fixed ``class_embeddings``. Both start at the zero-shot logits.
    """

    def __init__(self, visual: nn.Module, class_embeddings: torch.Tensor, logit_scale: float, head: bool = True):
        super().__init__()
        self.visual = visual
        self.logit_scale = float(logit_scale)
        self.register_buffer("class_embeddings", class_embeddings.detach().float().clone())
        self.head: nn.Linear | None = None
        if head:
            n_classes, dim = class_embeddings.shape
            self.head = nn.Linear(dim, n_classes).to(class_embeddings.device)
            with torch.no_grad():
                self.head.weight.copy_(self.class_embeddings * self.logit_scale)
                self.head.bias.zero_()

    def classify(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Region logits for image embeddings (normalised here)."""
        x = F.normalize(embeddings.float(), dim=-1)
        if self.head is not None:
            return self.head(x)
        return self.logit_scale * x @ self.class_embeddings.T

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify(self.visual(images))


@dataclass
class TrainResult:
    """What ``train`` wrote: the summary, the history and the checkpoint paths."""

    summary: dict
    history: pd.DataFrame
    out_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path


@dataclass
class _Data:
    """One split as a dataset of images or cached embeddings, with each item's class index."""

    dataset: Dataset
    labels: torch.Tensor
    paths: list[str]
    images: bool
    failures: dict = field(default_factory=dict)  # image path -> reason, found while embedding


@dataclass
class _Run:
    """The mutable state of one training run."""

    config: TrainConfig
    classifier: RegionClassifier
    region_ids: list[str]
    train: _Data | None
    val: _Data
    device: torch.device
    out_dir: Path
    base_identity: str
    data_hashes: dict
    optimizer: torch.optim.Optimizer | None = None
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
    """
    config = config or TrainConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = load_checkpoint(out / LAST) if resume else None
    if checkpoint is not None:
        _check_resumable(checkpoint, config, out / LAST)
    with _deterministic():
        seed_everything(config.seed)
        run = _prepare_run(
            train_manifest, val_manifest, regions, image_root, out, config, resolve_device(device),
            Path(cache_dir) if cache_dir is not None else out / "embedding_cache", clip, checkpoint,
        )
        if checkpoint is None:
            run.zeroshot_val_acc = _evaluate(run, epoch=0)[1]
            log.info("zero-shot validation accuracy: %.4f", run.zeroshot_val_acc)
            if config.strategy == "zeroshot":
                run.best_val_acc = run.zeroshot_val_acc
                _save(run, improved=True)
        else:
            _restore(run, checkpoint)
        _fit(run, on_step)
    return _finish(run)


def _prepare_run(train_manifest, val_manifest, regions, image_root, out, config, device, cache_dir, clip, checkpoint):
    region_ids = [str(r) for r in regions["id"]]
    train_df = _manifest(train_manifest, regions, "train")
    val_df = _manifest(val_manifest, regions, "val")
    data_hashes = {"train": _frame_hash(train_df), "val": _frame_hash(val_df)}
    if checkpoint is not None:
        if checkpoint["region_ids"] != region_ids:
            raise CheckpointError(f"{out / LAST}: trained on regions {checkpoint['region_ids']}, not {region_ids}")
        if checkpoint["data_hashes"] != data_hashes:
            raise CheckpointError(f"{out / LAST}: the train/val manifests changed since the checkpoint was written")

    model, preprocess, tokenizer = clip if clip is not None else load_clip(config.model_name, config.pretrained, device)
    model = model.to(device)
    base_identity = weights_identity(model)
    if checkpoint is not None and checkpoint["base_identity"] != base_identity:
        raise CheckpointError(f"{out / LAST}: the model's weights differ from those the run started with")
    if checkpoint is not None:
        class_embeddings = checkpoint["model"]["class_embeddings"].to(device)
    else:
        class_embeddings = encode_region_texts(model, tokenizer, regions, templates=config.templates, device=device)
    logit_scale = float(model.logit_scale.exp().item())

    if config.strategy in EMBEDDING_STRATEGIES:
        visual = model.visual
        embed = _embedding_data_factory(model, preprocess, image_root, cache_dir, config, device)
        val = embed(val_df, region_ids)
        train = embed(train_df, region_ids) if config.strategy == "linear_probe" else None
    else:
        visual = copy.deepcopy(model.visual)
        _unfreeze(visual, config)
        val = _image_data(val_df, region_ids, preprocess, image_root)
        train = _image_data(train_df, region_ids, _train_transform(preprocess, visual, config.augment), image_root)
    classifier = RegionClassifier(visual, class_embeddings, logit_scale, head=config.strategy != "contrastive")
    return _new_run(config, classifier, region_ids, train, val, device, out, base_identity, data_hashes)


def _new_run(config, classifier, region_ids, train, val, device, out, base_identity, data_hashes) -> _Run:
    """A run at epoch 0 with its optimizer, schedule and loss scaler."""
    run = _Run(config, classifier.to(device), region_ids, train, val, device, out, base_identity, data_hashes,
               self_contained=config.pretrained is None)
    if train is not None:
        if len(train.labels) == 0:
            raise ValueError("the training split has no readable images")
        run.optimizer, run.scheduler = _optimizer(classifier, config, _steps_per_epoch(run) * config.epochs)
        run.scaler = torch.amp.GradScaler("cuda", enabled=_needs_grad_scaler(device))
    return run


def _manifest(manifest, regions, name: str) -> pd.DataFrame:
    """Read a manifest path (labels validated by read_manifest) or check a DataFrame's region ids."""
    if not isinstance(manifest, pd.DataFrame):
        from lageo_utils.data import read_manifest

        manifest, _ = read_manifest(manifest, regions)
        return manifest
    missing = [c for c in ("image_path", "region_id") if c not in manifest.columns]
    if missing:
        raise ValueError(f"{name} manifest: missing columns {missing}")
    known = set(regions["id"])
    unknown = ~manifest["region_id"].isin(known)
    if unknown.any():
        rows = (np.flatnonzero(unknown.to_numpy()) + 1).tolist()
        bad = sorted(manifest.loc[unknown, "region_id"].astype(str).unique())
        raise ValueError(f"{name} manifest: region ids {bad} are not in the region file (data rows {rows[:10]})")
    return manifest.reset_index(drop=True)


def _frame_hash(df: pd.DataFrame) -> str:
    """Content hash of a manifest's image paths and labels (what a resumed run must train on)."""
    hashed = pd.util.hash_pandas_object(df[["image_path", "region_id"]].astype(str), index=False)
    return hashlib.sha256(hashed.to_numpy().tobytes()).hexdigest()[:16]


def _class_indices(df: pd.DataFrame, region_ids: list[str]) -> torch.Tensor:
    position = {r: i for i, r in enumerate(region_ids)}
    return torch.tensor([position[r] for r in df["region_id"].astype(str)], dtype=torch.long)


def _image_data(df: pd.DataFrame, region_ids: list[str], transform, image_root) -> _Data:
    paths = df["image_path"].astype(str).tolist()
    return _Data(ImageDataset(paths, transform, root=image_root), _class_indices(df, region_ids), paths, True)


def _embedding_data_factory(model, preprocess, image_root, cache_dir, config, device):
    from lageo_utils.embed import embed_manifest

    def embed(df: pd.DataFrame, region_ids: list[str]) -> _Data:
        result = embed_manifest(
            model, preprocess, df, image_root, cache_dir=cache_dir, batch_size=config.embed_batch_size,
            num_workers=config.num_workers, device=device, model_name=config.model_name,
        )
        kept = df.iloc[result.rows]
        embeddings = torch.from_numpy(np.ascontiguousarray(result.embeddings, dtype=np.float32))
        failures = {str(r.image_path): str(r.reason) for r in result.failures.itertuples()}
        return _Data(TensorDataset(embeddings, torch.arange(len(kept))), _class_indices(kept, region_ids),
                     kept["image_path"].astype(str).tolist(), False, failures)

    return embed


def _train_transform(preprocess, visual: nn.Module, augment: bool):
    """The eval preprocessing, or (augment) a random resized crop and colour jitter with its normalisation."""
    if not augment:
        return preprocess
    from torchvision import transforms as T

    size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
    normalize = next(t for t in preprocess.transforms if isinstance(t, T.Normalize))
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.6, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05),
        T.ToTensor(),
        normalize,
    ])


def _unfreeze(visual: nn.Module, config: TrainConfig) -> None:
    """Set ``requires_grad`` on the image encoder for the strategy (open_clip's ``lock`` for ``partial``)."""
    if config.strategy != "partial":
        visual.requires_grad_(True)
        return
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if blocks is None or not hasattr(visual, "lock"):
        raise ValueError(f"strategy 'partial' needs a ViT image encoder; {type(visual).__name__} has no blocks")
    if config.unfreeze_blocks > len(blocks):
        raise ValueError(f"unfreeze_blocks={config.unfreeze_blocks} but the encoder has {len(blocks)} blocks")
    # open_clip's groups: ..., each block, [last block + ln_post], proj: N blocks + the projection.
    visual.lock(unlocked_groups=config.unfreeze_blocks + 1)


def _optimizer(classifier: RegionClassifier, config: TrainConfig, total_steps: int):
    """AdamW (decay on encoder matrices only) and a per-step linear warm-up + cosine schedule."""
    decay, no_decay = [], []
    if config.strategy != "linear_probe":
        for name, param in classifier.visual.named_parameters():
            if param.requires_grad:
                (decay if param.ndim >= 2 and "embedding" not in name else no_decay).append(param)
    head = list(classifier.head.parameters()) if classifier.head is not None else []
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
    """float16 autocast (CUDA without bfloat16) needs loss scaling; bfloat16 and CPU do not."""
    return device.type == "cuda" and not torch.cuda.is_bf16_supported()


def _workers(config: TrainConfig, data: _Data) -> int:
    if not data.images:
        return 0
    if config.num_workers is not None:
        return config.num_workers
    return min(4, max(0, (os.cpu_count() or 1) - 1))


def _loader(run: _Run, data: _Data, shuffle: bool, epoch: int) -> DataLoader:
    # A generator per epoch: the shuffle order is fixed by (seed, epoch), so a resumed epoch repeats it. Workers
    # are seeded from it too (torch seeds random, numpy and torch in each worker from the loader's base seed).
    generator = torch.Generator().manual_seed(run.config.seed * 1_000_003 + epoch)
    batch_size = run.config.batch_size if shuffle else max(run.config.batch_size, run.config.embed_batch_size)
    workers = _workers(run.config, data)
    return DataLoader(
        data.dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=workers,
        collate_fn=collate_skip_failures if data.images else None,
        pin_memory=run.device.type == "cuda",
    )


def _batches(run: _Run, data: _Data, loader: DataLoader):
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


def _logits(run: _Run, inputs: torch.Tensor, images: bool) -> torch.Tensor:
    with autocast(run.device):
        logits = run.classifier(inputs) if images else run.classifier.classify(inputs)
    return logits.float()


def _steps_per_epoch(run: _Run) -> int:
    batches = math.ceil(len(run.train.labels) / run.config.batch_size)
    return math.ceil(batches / run.config.grad_accum_steps)


def _train_epoch(run: _Run, epoch: int, on_step: StepHook | None) -> float:
    """One epoch of training; returns the mean training loss."""
    config, data = run.config, run.train
    run.classifier.train(data.images)
    # The loss covers only regions with training images: the others keep their text-initialised weights.
    train_classes = torch.unique(data.labels).to(run.device)
    remap = torch.full((len(run.region_ids),), -1, dtype=torch.long, device=run.device)
    remap[train_classes] = torch.arange(len(train_classes), device=run.device)
    loader = _loader(run, data, shuffle=True, epoch=epoch)
    total, count, pending = torch.zeros((), device=run.device), 0, 0  # summed on the device: no sync per batch
    run.optimizer.zero_grad(set_to_none=True)
    progress = tqdm(_batches(run, data, loader), total=len(loader), desc=f"epoch {epoch}", leave=False)
    for i, (inputs, labels) in enumerate(progress):
        if inputs is not None:
            logits = _logits(run, inputs, data.images)[:, train_classes]
            loss = F.cross_entropy(logits, remap[labels])
            run.scaler.scale(loss / config.grad_accum_steps).backward()
            pending += 1
            total += loss.detach() * len(labels)
            count += len(labels)
            if i % 10 == 0:
                progress.set_postfix(loss=f"{total.item() / count:.4f}")
        if pending and ((i + 1) % config.grad_accum_steps == 0 or i + 1 == len(loader)):
            _optimizer_step(run)
            pending = 0
        if on_step is not None:
            on_step(epoch, i)
    if count == 0:
        raise ValueError("no training image could be read in this epoch")
    return total.item() / count


def _optimizer_step(run: _Run) -> None:
    if run.config.max_grad_norm is not None:
        run.scaler.unscale_(run.optimizer)
        params = [p for group in run.optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, run.config.max_grad_norm)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def _evaluate(run: _Run, epoch: int) -> tuple[float, float]:
    """Validation loss and accuracy over all regions."""
    data = run.val
    run.classifier.eval()
    loss_sum, correct, count = 0.0, 0, 0
    loader = _loader(run, data, shuffle=False, epoch=epoch)
    for inputs, labels in tqdm(_batches(run, data, loader), total=len(loader), desc="validation", leave=False):
        if inputs is None:
            continue
        logits = _logits(run, inputs, data.images)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += int((logits.argmax(dim=1) == labels).sum())
        count += len(labels)
    if count == 0:
        raise ValueError("the validation split has no readable images")
    return loss_sum / count, correct / count


def _fit(run: _Run, on_step: StepHook | None) -> None:
    if run.train is None:
        return
    with _head_only_threads(run):
        _epochs(run, on_step)


@contextlib.contextmanager
def _head_only_threads(run: _Run):
    """One intra-op thread for head-only training on the CPU, restored afterwards.

    Its matrix products (batch x embedding dim x regions) are too small to gain from more threads,
    and on busy shared cores the extra threads wait on each other: 8 epochs on 6,000 embeddings
    took 3 s with one thread and 60 s with two on this project's 2-core machine.
    """
    threads = torch.get_num_threads()
    if run.device.type == "cpu" and not run.train.images:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _epochs(run: _Run, on_step: StepHook | None) -> None:
    config = run.config
    for epoch in range(run.epoch + 1, config.epochs + 1):
        if run.stopped_early:
            break
        started = time.perf_counter()
        train_loss = _train_epoch(run, epoch, on_step)
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
        log.info("epoch %d: train_loss %.4f, val_loss %.4f, val_acc %.4f%s", epoch, train_loss, val_loss, val_acc,
                 " (best)" if improved else "")
        if run.stopped_early:
            log.info("early stopping: no better validation accuracy in %d epochs", config.patience)


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
    state = {
        "config": run.config.to_dict(),
        "region_ids": run.region_ids,
        "epoch": run.epoch,
        "model": _model_state(run),
        "logit_scale": run.classifier.logit_scale,
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
    _load_model_state(run.classifier, checkpoint["model"], complete=run.self_contained)
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
    log.info("resumed from epoch %d (best epoch %d, val_acc %.4f)", run.epoch, run.best_epoch, run.best_val_acc)


def _load_model_state(classifier: RegionClassifier, state: dict, complete: bool) -> None:
    """Load checkpoint weights; unless ``complete``, frozen encoder weights may be absent (they are the base's)."""
    missing, unexpected = classifier.load_state_dict(state, strict=False)
    missing = [k for k in missing if complete or not k.startswith("visual.")]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint weights do not fit the model (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")


def _write_history(run: _Run) -> None:
    frame = pd.DataFrame(run.history, columns=HISTORY_COLUMNS)
    tmp = run.out_dir / (HISTORY + ".tmp")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, run.out_dir / HISTORY)


def _finish(run: _Run) -> TrainResult:
    config = run.config
    skipped = dict(run.failures)
    for data in (run.train, run.val):
        skipped.update(data.failures if data is not None else {})
    if skipped:
        log.warning("%d unreadable images were skipped: %s", len(skipped), list(skipped.items())[:5])
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
        "n_train": _readable(run.train, skipped),
        "n_val": _readable(run.val, skipped),
        "data_hashes": run.data_hashes,
        "seconds": float(sum(h["seconds"] for h in run.history)),
        "skipped_images": [{"image_path": p, "reason": r} for p, r in sorted(skipped.items())],
        "config": config.to_dict(),
    }
    (run.out_dir / SUMMARY).write_text(json.dumps(summary, indent=2))
    _write_history(run)
    return TrainResult(summary, pd.read_csv(run.out_dir / HISTORY), run.out_dir, run.out_dir / BEST,
                       run.out_dir / LAST)


def _readable(data: _Data | None, skipped: dict) -> int:
    """Images of a split that could be read (embedding strategies list only those in the first place)."""
    return 0 if data is None else sum(path not in skipped for path in data.paths)


@contextlib.contextmanager
def _deterministic():
    """Deterministic kernels while training (warn-only where an op has none); restored afterwards."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def load_finetuned(checkpoint_path: str | os.PathLike, regions, device: str | torch.device = "auto", *,
                   clip: tuple | None = None):
    """A ``GeoPredictor`` for a training checkpoint (``best.pt``/``last.pt``) over ``regions``.

    The model is rebuilt from the checkpoint's config: ``model_name`` and ``pretrained`` (whose
    encoder weights must be those training started from), then the checkpoint's weights.
    ``regions`` may be any subset or order of the regions the checkpoint was trained with.
    ``clip`` is an already loaded base ``(model, preprocess, tokenizer)``; it is not modified.
    """
    path = Path(checkpoint_path)
    state = load_checkpoint(path)
    config = TrainConfig(**state["config"])
    region_ids = [str(r) for r in regions["id"]]
    unknown = [r for r in region_ids if r not in state["region_ids"]]
    if unknown:
        raise ValueError(f"{path}: regions {unknown} are not in the checkpoint (trained with {state['region_ids']})")
    target = resolve_device(device)
    model, preprocess, tokenizer = clip if clip is not None else load_clip(config.model_name, config.pretrained, target)
    model = copy.deepcopy(model).to(target) if clip is not None else model
    if not state["self_contained"] and weights_identity(model) != state["base_identity"]:
        raise CheckpointError(f"{path}: {config.model_name} weights {config.pretrained!r} are not those this "
                              "checkpoint was trained from")
    model_state = state["model"]
    classifier = RegionClassifier(model.visual, model_state["class_embeddings"], state["logit_scale"],
                                  head="head.weight" in model_state)
    _load_model_state(classifier, model_state, complete=state["self_contained"])
    predictor = FineTunedPredictor(
        model, preprocess, tokenizer, regions, classifier, [state["region_ids"].index(r) for r in region_ids],
        templates=config.templates, device=target, model_name=config.model_name,
    )
    predictor.checkpoint = {"path": str(path), "strategy": config.strategy, "epoch": state["epoch"],
                            "best_val_acc": state["best_val_acc"]}
    return predictor


class FineTunedPredictor(GeoPredictor):
    """A ``GeoPredictor`` whose logits come from a fine-tuned ``RegionClassifier``.

    ``columns`` are the classifier's class positions of ``regions`` (a subset or reordering of
    the trained regions). The model's image encoder is the classifier's, so ``predict``,
    ``predict_embeddings`` and ``predict_manifest`` (with its embedding cache) work unchanged.
    """

    def __init__(self, model, preprocess, tokenizer, regions, classifier: RegionClassifier, columns: list[int],
                 templates: list[str] | None = None, device="auto", model_name: str | None = None):
        if model.visual is not classifier.visual:
            raise ValueError("the model's image encoder must be the classifier's")
        index = torch.as_tensor(columns, dtype=torch.long)
        super().__init__(model, preprocess, tokenizer, regions, templates=templates, device=device,
                         model_name=model_name, text_features=classifier.class_embeddings.detach()[index])
        self.classifier = classifier.to(self.device).eval()
        self.columns = index.to(self.device)

    def logits(self, image_features) -> torch.Tensor:
        """Region logits (n x n_regions) for image embeddings of the fine-tuned encoder."""
        features = torch.as_tensor(image_features, dtype=torch.float32, device=self.device)
        with torch.no_grad():
            return self.classifier.classify(torch.atleast_2d(features))[:, self.columns]


def benchmark_train(
    model_name: str = "ViT-B-32",
    pretrained: str | None = None,
    strategy: str = "partial",
    images: int = 64,
    batch_size: int = 16,
    device: str = "auto",
) -> dict:
    """Training images/s and peak memory of one strategy, through the real training loop.

    ``partial``/``full``/``contrastive``: ``images`` synthetic 640 x 640 JPEGs through the loader,
    augmentation off; one warm-up epoch, then one timed epoch (training only). ``linear_probe``:
    8 epochs over ``images`` cached embeddings (synthetic unit vectors with a class structure;
    the head's cost does not depend on their values), timed end to end: every epoch's
    validation on a sixth as many embeddings and both checkpoints included.
    """
    import resource
    import tempfile

    from lageo_utils.regions import load_regions

    if strategy not in STRATEGIES or strategy == "zeroshot":
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES[1:])} (zeroshot trains nothing), "
                         f"not {strategy!r}")
    _checked_int("images", images, 1)
    target = resolve_device(device)
    config = TrainConfig(strategy=strategy, model_name=model_name, pretrained=pretrained, batch_size=batch_size,
                         epochs=8 if strategy == "linear_probe" else 2)
    seed_everything(config.seed)
    model, preprocess, tokenizer = load_clip(model_name, pretrained, device=target)
    regions = load_regions()
    region_ids = [str(r) for r in regions["id"]]
    class_embeddings = encode_region_texts(model, tokenizer, regions, device=target)
    logit_scale = float(model.logit_scale.exp().item())
    if target.type == "cuda":
        torch.cuda.reset_peak_memory_stats(target)
    with tempfile.TemporaryDirectory(prefix="lageo-bench-train-") as tmp:
        if strategy == "linear_probe":
            train_data = _synthetic_embeddings(class_embeddings.cpu(), images, seed=0)
            val_data = _synthetic_embeddings(class_embeddings.cpu(), max(1, images // 6), seed=1)
            visual = model.visual
        else:
            from lageo_utils.embed import write_test_jpegs

            paths = write_test_jpegs(Path(tmp) / "images", images)
            frame = pd.DataFrame({"image_path": paths, "region_id": [region_ids[i % len(region_ids)]
                                                                      for i in range(images)]})
            train_data = _image_data(frame, region_ids, preprocess, None)
            val_data = train_data
            visual = copy.deepcopy(model.visual)
            _unfreeze(visual, config)
        classifier = RegionClassifier(visual, class_embeddings, logit_scale, head=strategy != "contrastive")
        run = _new_run(config, classifier, region_ids, train_data, val_data, target, Path(tmp), "bench", {})
        run.self_contained = False  # checkpoints as with pretrained weights: the trained part only
        with _deterministic():
            if strategy == "linear_probe":
                start = time.perf_counter()
                _fit(run, None)
                seconds = time.perf_counter() - start
                trained = images * config.epochs
            else:
                _train_epoch(run, 1, None)  # warm-up: allocations, thread pools, loader start
                _synchronize(target)
                start = time.perf_counter()
                _train_epoch(run, 2, None)
                _synchronize(target)
                seconds = time.perf_counter() - start
                trained = images
    trainable = sum(p.numel() for group in run.optimizer.param_groups for p in group["params"])
    return {
        "model": model_name,
        "device": str(target),
        "strategy": strategy,
        "images": images,
        "epochs_timed": config.epochs if strategy == "linear_probe" else 1,
        "batch_size": batch_size,
        "seconds": round(seconds, 3),
        "train_img_s": round(trained / seconds, 1),
        "trainable_params": trainable,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated(target) / 2**20, 1) if target.type == "cuda" else None,
        "num_workers": _workers(config, train_data),
        "torch_threads": torch.get_num_threads(),
    }


def _synthetic_embeddings(class_embeddings: torch.Tensor, count: int, seed: int) -> _Data:
    """Unit vectors scattered around the class embeddings: stand-ins for cached image embeddings."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(len(class_embeddings), (count,), generator=generator)
    noise = torch.randn(count, class_embeddings.shape[1], generator=generator) / class_embeddings.shape[1] ** 0.5
    vectors = F.normalize(class_embeddings[labels] + noise, dim=-1)
    return _Data(TensorDataset(vectors, torch.arange(count)), labels, [f"embedding_{i}" for i in range(count)], False)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

