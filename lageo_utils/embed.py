"""Image embeddings at speed: a DataLoader pipeline and an on-disk cache keyed by content.

Worker processes decode and preprocess images while the main process runs the model; JPEGs
at least twice the model input are decoded at reduced scale (see ``images.open_rgb``). Each
image's embedding is stored under the hash of its bytes, in a cache directory per model
(name, weights, preprocessing, decoder, precision, inference engine), so a re-run computes nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lageo_utils.engines import check_engine, image_encoder
from lageo_utils.files import atomic_write
from lageo_utils.images import ImageDataset, collate_skip_failures, decoder_settings, default_num_workers, input_size
from lageo_utils.model import autocast, has_text_tower, precision_label, resolve_device, weights_identity

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # bump when the cache layout or key changes (2: the backbone family)
INDEX_FILE = "index.parquet"
META_FILE = "meta.json"
LOCK_FILE = ".lock"


@dataclass
class EmbeddingResult:
    """Embeddings of the images that could be read, and a report of those that could not."""

    embeddings: np.ndarray  # (n_ok, dim) float32, L2-normalised, in input order
    image_paths: list[str]  # the input paths of those rows
    rows: np.ndarray  # their positions in the input (manifest row positions)
    failures: pd.DataFrame  # image_path, reason


def embed_manifest(
    model,
    preprocess,
    manifest: pd.DataFrame,
    image_root: str | os.PathLike | None,
    *,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    device: str | torch.device | None = None,
    model_name: str | None = None,
    engine: str = "eager",
) -> EmbeddingResult:
    """Embed every ``manifest.image_path`` (relative to ``image_root``); ``rows`` are manifest positions."""
    if "image_path" not in manifest.columns:
        raise ValueError(f"manifest has no 'image_path' column (columns: {list(manifest.columns)})")
    return embed_paths(
        model, preprocess, manifest["image_path"].astype(str).tolist(), root=image_root, cache_dir=cache_dir,
        batch_size=batch_size, num_workers=num_workers, device=device, model_name=model_name, engine=engine,
    )


def embed_paths(
    model,
    preprocess,
    paths: list[str],
    *,
    root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    device: str | torch.device | None = None,
    model_name: str | None = None,
    engine: str = "eager",
) -> EmbeddingResult:
    """Embed image files, reusing and filling the cache in ``cache_dir`` when given.

    ``device`` defaults to the model's device (the model is moved if another is given).
    Unreadable files are skipped and listed in ``failures``; duplicates by content are embedded once.
    ``engine`` runs the image encoder (``lageo_utils.engines``: eager, onnx); it is part of the cache key.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = resolve_device(device) if device is not None else next(model.parameters()).device
    check_engine(engine, device)
    model.to(device)
    files = [Path(root) / p if root is not None else Path(p) for p in paths]
    digests, failures = hash_files(files)
    cache = EmbeddingCache.for_model(cache_dir, model, preprocess, device, model_name, engine) if cache_dir else None
    known = cache.lookup(set(digests.values())) if cache else {}

    todo = {}  # digest -> first position with that content
    for pos, digest in digests.items():
        if digest not in known:
            todo.setdefault(digest, pos)
    if todo:
        encoder = image_encoder(model, engine, cache_dir=cache_dir, model_name=model_name)
        new, bad = _compute(model, encoder, preprocess, [files[p] for p in todo.values()], batch_size, num_workers,
                            device)
        todo_digests = list(todo)
        computed = {todo_digests[i]: vec for i, vec in zip(new[0], new[1])}
        bad_by_digest = {todo_digests[i]: reason for i, reason in bad.items()}
        if cache and computed:
            cache.add(list(computed), np.stack(list(computed.values())))
        known = {**known, **computed}
    else:
        bad_by_digest = {}
        log.info("all %d images found in the embedding cache", len(digests))

    ok_rows, vectors = [], []
    for pos in range(len(files)):
        digest = digests.get(pos)
        if digest in known:
            ok_rows.append(pos)
            vectors.append(known[digest])
        elif pos not in failures:
            failures[pos] = bad_by_digest[digest]
    return _result(paths, ok_rows, vectors, failures, _embedding_dim(model))


def hash_files(files: list[Path]) -> tuple[dict[int, str], dict[int, str]]:
    """SHA-256 of each readable file by position, and the reason for each one that could not be read."""
    digests, failures = {}, {}
    for pos, path in enumerate(files):
        try:
            with open(path, "rb") as handle:
                digests[pos] = hashlib.file_digest(handle, "sha256").hexdigest()
        except FileNotFoundError:
            failures[pos] = "file not found"
        except OSError as exc:
            failures[pos] = f"cannot read file ({exc.strerror or exc})"
    return digests, failures


def _compute(model, encoder, preprocess, files: list[Path], batch_size: int, num_workers: int | None,
             device: torch.device):
    """Run files through the loader and ``encoder`` (the model's image encoder, as an engine runs it): ``((positions, vectors), {position: reason})``."""
    workers = min(default_num_workers(num_workers), math.ceil(len(files) / batch_size))
    chunks = loader_chunks(len(files), batch_size, workers)
    loader = DataLoader(
        ImageDataset([str(f) for f in files], preprocess, min_size=input_size(preprocess)),
        batch_sampler=chunks,
        num_workers=workers,
        collate_fn=collate_skip_failures,
        pin_memory=device.type == "cuda",
    )
    first_batch = sum(len(c) for c in chunks[:workers]) if workers else batch_size
    positions, vectors, failures = [], [], {}
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast(device), tqdm(total=len(files), unit="img", desc="embedding") as bar:
            for images, indices in _forward_batches(loader, first_batch, batch_size, device, failures, bar):
                features = encoder(images)
                vectors.append(F.normalize(features.float(), dim=-1).cpu().numpy())
                positions.append(indices.numpy())
    finally:
        model.train(was_training)
    if failures:
        log.warning("%d of %d images could not be read and were skipped", len(failures), len(files))
    if not vectors:
        return (np.empty(0, dtype=np.int64), np.empty((0, _embedding_dim(model)), np.float32)), failures
    return (np.concatenate(positions), np.concatenate(vectors)), failures


def loader_chunks(count: int, batch_size: int, workers: int) -> list[list[int]]:
    """Image positions in the chunks the loader workers prepare, in order.

    Each worker prepares a share of a forward batch, so a batch is ready ``workers`` times sooner. The
    first chunk of each worker is a quarter of that share: the model, idle until its first batch is
    ready, starts on ``workers`` small chunks (e.g. 16 images instead of 64) a few decodes after the
    workers start, while they prepare the full-size chunks that follow.
    """
    if workers == 0:
        return [list(range(start, min(start + batch_size, count))) for start in range(0, count, batch_size)]
    share = math.ceil(batch_size / workers)
    sizes = [max(1, share // 4)] * workers
    chunks, start = [], 0
    while start < count:
        size = sizes[len(chunks)] if len(chunks) < len(sizes) else share
        chunks.append(list(range(start, min(start + size, count))))
        start += size
    return chunks


def _forward_batches(loader: DataLoader, first_batch: int, batch_size: int, device: torch.device, failures: dict,
                     bar):
    """Regroup the loader's chunks into batches of readable images on ``device`` (the first of ``first_batch``
    images, then ``batch_size``); record failures."""
    images, indices, wanted = [], [], first_batch
    for chunk, chunk_indices, chunk_failures in loader:
        failures.update(chunk_failures)
        bar.update(len(chunk_indices) + len(chunk_failures))
        if chunk is not None:
            images.append(chunk.to(device, non_blocking=True))
            indices.append(chunk_indices)
        while sum(len(i) for i in indices) >= wanted:
            stacked, stacked_indices = torch.cat(images), torch.cat(indices)
            yield stacked[:wanted], stacked_indices[:wanted]
            images, indices = [stacked[wanted:]], [stacked_indices[wanted:]]
            wanted = batch_size
    if sum(len(i) for i in indices):
        yield torch.cat(images), torch.cat(indices)


def _embedding_dim(model) -> int:
    return int(getattr(model.visual, "output_dim", 0))


def _result(paths: list[str], ok_rows: list[int], vectors: list[np.ndarray], failures: dict[int, str], dim: int):
    embeddings = np.stack(vectors).astype(np.float32, copy=False) if vectors else np.empty((0, dim), np.float32)
    report = pd.DataFrame(
        [(str(paths[pos]), reason) for pos, reason in sorted(failures.items())], columns=["image_path", "reason"]
    )
    return EmbeddingResult(
        embeddings=embeddings,
        image_paths=[str(paths[pos]) for pos in ok_rows],
        rows=np.asarray(ok_rows, dtype=np.int64),
        failures=report,
    )


class EmbeddingCache:
    """One model's embeddings by image content hash: ``shard-*.npy`` arrays and an ``index.parquet``.

    Files are written to a temporary name and renamed, so a reader never sees half a file, and
    processes filling the same cache at once (``torchrun`` ranks, each embedding its share) take
    turns extending the index (a lock on the cache directory), so none loses another's entries
    or reads it half-replaced.
    """

    def __init__(self, directory: Path, meta: dict):
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        meta_path = directory / META_FILE
        if not meta_path.exists():
            atomic_write(meta_path, lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))

    @classmethod
    def for_model(cls, cache_dir, model, preprocess, device: torch.device, model_name: str | None,
                  engine: str = "eager"):
        """The cache for this model name, visual weights, preprocessing, decoder, precision and inference engine."""
        meta = {
            "format": CACHE_FORMAT,
            "family": "open_clip" if has_text_tower(model) else "image-only",
            "model": model_name or type(model).__name__,
            "weights": weights_identity(model),
            "preprocess": re.sub(r" at 0x[0-9a-f]+", "", repr(preprocess)),  # drop per-process addresses
            "decoder": decoder_settings(input_size(preprocess)),
            "precision": precision_label(device),
            "engine": engine,  # an engine's embeddings differ from eager's in the last digits: never mixed
        }
        key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", meta["model"])
        return cls(Path(cache_dir) / f"{slug}-{key}", meta)

    def lookup(self, digests: set[str]) -> dict[str, np.ndarray]:
        """Stored embeddings for the given content hashes (missing ones are simply absent)."""
        with self._locked(fcntl.LOCK_SH):
            index = self._index()
        wanted = index[index["digest"].isin(digests)]
        found = {}
        for shard, part in wanted.groupby("shard", sort=False):
            try:
                array = np.load(self.directory / shard, mmap_mode="r")
                found.update(zip(part["digest"], np.asarray(array[part["row"].to_numpy()])))
            except (OSError, ValueError, IndexError) as exc:
                log.warning("embedding cache shard %s unusable (%s); recomputing its images", shard, exc)
        return found

    def add(self, digests: list[str], vectors: np.ndarray) -> None:
        """Store new embeddings as one shard and add them to the index."""
        shard = f"shard-{hashlib.sha256(''.join(digests).encode()).hexdigest()[:16]}.npy"
        atomic_write(self.directory / shard, lambda tmp: np.save(tmp, vectors.astype(np.float32, copy=False)))
        added = pd.DataFrame({"digest": digests, "shard": shard, "row": np.arange(len(digests))})
        with self._locked(fcntl.LOCK_EX):
            index = pd.concat([self._index(), added], ignore_index=True).drop_duplicates("digest", keep="last")
            atomic_write(self.directory / INDEX_FILE, lambda tmp: index.to_parquet(tmp, index=False))

    @contextlib.contextmanager
    def _locked(self, mode: int):
        """A lock on the cache's index (``fcntl.LOCK_SH`` to read it, ``LOCK_EX`` to extend it).

        A POSIX record lock on a lock file opened for writing: unlike ``flock`` on the directory, it also
        holds on NFS, where ranks on several nodes share one cache."""
        handle = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(handle, mode)  # released when the descriptor closes
            yield
        finally:
            os.close(handle)

    def _index(self) -> pd.DataFrame:
        path = self.directory / INDEX_FILE
        if not path.exists():
            return pd.DataFrame({"digest": pd.Series(dtype=str), "shard": pd.Series(dtype=str),
                                 "row": pd.Series(dtype=np.int64)})
        return pd.read_parquet(path)
