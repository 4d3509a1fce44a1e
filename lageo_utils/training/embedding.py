"""Strategies on cached embeddings (``zeroshot``, ``text_scale``, ``linear_probe``): the image encoder stays
frozen, so each image is embedded once, through the embedding cache, and only the head trains (nothing for
``zeroshot``; a scale and per-region bias on the text scores for ``text_scale``; a linear layer for
``linear_probe``)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch.utils.data import TensorDataset

from lageo_utils.embed import embed_manifest
from lageo_utils.training.data import TrainData, class_indices
from lageo_utils.training.distributed import ONE, Processes


def embedding_data_factory(model, preprocess, image_root, cache_dir, config, device, processes: Processes = ONE):
    """``embed(df, region_ids) -> TrainData``: each process embeds its share of the rows (through the cache), and
    every process gets all embeddings back, in the manifest's order."""

    def embed(df: pd.DataFrame, region_ids: list[str]) -> TrainData:
        share = df.iloc[processes.rank:: processes.world]
        result = embed_manifest(
            model, preprocess, share, image_root, cache_dir=cache_dir, batch_size=config.embed_batch_size,
            num_workers=config.num_workers, device=device, model_name=config.model_name, engine=config.engine,
        )
        positions = np.arange(processes.rank, len(df), processes.world)[result.rows]
        parts = processes.gather((positions, result.embeddings, result.failures.to_dict(orient="records")))
        order = np.concatenate([p for p, _, _ in parts])
        vectors = np.concatenate([e for _, e, _ in parts])[np.argsort(order, kind="stable")]
        kept = df.iloc[np.sort(order)]
        embeddings = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
        failures = {str(r["image_path"]): str(r["reason"]) for _, _, records in parts for r in records}
        return TrainData(TensorDataset(embeddings, torch.arange(len(kept))), class_indices(kept, region_ids),
                         kept["image_path"].astype(str).tolist(), False, failures)

    return embed
