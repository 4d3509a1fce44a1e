"""Strategies that train image-encoder weights on images (``partial``, ``full``, ``contrastive``)."""

from __future__ import annotations

import pandas as pd
from torch import nn

from lageo_utils.images import ImageDataset
from lageo_utils.training.config import TrainConfig
from lageo_utils.training.data import TrainData, class_indices


def image_data(df: pd.DataFrame, region_ids: list[str], transform, image_root) -> TrainData:
    paths = df["image_path"].astype(str).tolist()
    return TrainData(ImageDataset(paths, transform, root=image_root), class_indices(df, region_ids), paths, True)


def train_transform(preprocess, visual: nn.Module, augment: bool):
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


def unfreeze(visual: nn.Module, config: TrainConfig) -> None:
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
