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


def embedding_data_factory(model, preprocess, image_root, cache_dir, config, device):
    def embed(df: pd.DataFrame, region_ids: list[str]) -> TrainData:
        result = embed_manifest(
            model, preprocess, df, image_root, cache_dir=cache_dir, batch_size=config.embed_batch_size,
            num_workers=config.num_workers, device=device, model_name=config.model_name,
        )
        kept = df.iloc[result.rows]
        embeddings = torch.from_numpy(np.ascontiguousarray(result.embeddings, dtype=np.float32))
        failures = {str(r.image_path): str(r.reason) for r in result.failures.itertuples()}
        return TrainData(TensorDataset(embeddings, torch.arange(len(kept))), class_indices(kept, region_ids),
                     kept["image_path"].astype(str).tolist(), False, failures)

    return embed
