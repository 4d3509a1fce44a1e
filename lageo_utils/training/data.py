"""Training data: the splits as datasets of images or of cached embeddings, with class labels."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler, TensorDataset

from lageo_utils.data import read_manifest


class TensorBatches:
    """``(embeddings, indices)`` batches of an in-memory ``TensorDataset``, by index slicing.

    What a DataLoader with a batch sampler yields for these tensors, without its per-item fetch and
    collate (most of the time of head-only training on cached embeddings). An empty slice (a
    process's share of a short last batch) gives ``(None, no indices)``.
    """

    def __init__(self, dataset: TensorDataset, batch_sampler: Sampler[list[int]]):
        self.tensors = dataset.tensors
        self.batch_sampler = batch_sampler

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor | None, torch.Tensor]]:
        for batch in self.batch_sampler:
            if not batch:
                yield None, torch.empty(0, dtype=torch.long)
                continue
            rows = torch.as_tensor(batch, dtype=torch.long)
            yield tuple(t[rows] for t in self.tensors)


@dataclass
class TrainData:
    """One split as a dataset of images or cached embeddings, with each item's class index."""

    dataset: Dataset
    labels: torch.Tensor
    paths: list[str]
    images: bool
    failures: dict = field(default_factory=dict)  # image path -> reason, found while embedding


def checked_manifest(manifest, regions, name: str) -> pd.DataFrame:
    """Read a manifest path (labels validated by read_manifest) or check a DataFrame's region ids."""
    if not isinstance(manifest, pd.DataFrame):
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


def frame_hash(df: pd.DataFrame, columns: tuple[str, ...] = ("image_path", "region_id")) -> str:
    """Content hash of a manifest's ``columns`` (by default its image paths and labels: what a resumed run must
    train on)."""
    hashed = pd.util.hash_pandas_object(df[list(columns)].astype(str), index=False)
    return hashlib.sha256(hashed.to_numpy().tobytes()).hexdigest()[:16]


def class_indices(df: pd.DataFrame, region_ids: list[str]) -> torch.Tensor:
    position = {r: i for i, r in enumerate(region_ids)}
    return torch.tensor([position[r] for r in df["region_id"].astype(str)], dtype=torch.long)
