"""Strategies that train image-encoder weights on images (``partial``, ``lora``, ``full``, ``contrastive``)."""

from __future__ import annotations

import copy

import pandas as pd
from torch import nn

from lageo_utils.adapters import add_lora
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


def trainable_encoder(visual: nn.Module, config: TrainConfig) -> nn.Module:
    """A copy of the image encoder with the strategy's weights trainable: the last ``unfreeze_blocks`` blocks
    (``partial``, open_clip's ``lock``), LoRA adapters (``lora``), or everything (``full``, ``contrastive``)."""
    visual = copy.deepcopy(visual)
    if config.strategy == "lora":
        return add_lora(visual, config.lora_rank, config.lora_alpha, config.lora_targets, config.lora_dropout)
    if config.strategy != "partial":
        return visual.requires_grad_(True)
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)  # open_clip ViT
    if blocks is None:
        blocks = getattr(visual, "blocks", None)  # timm ViT
    if blocks is None:
        raise ValueError(f"strategy 'partial' needs a ViT image encoder; {type(visual).__name__} has no blocks")
    if config.unfreeze_blocks > len(blocks):
        raise ValueError(f"unfreeze_blocks={config.unfreeze_blocks} but the encoder has {len(blocks)} blocks")
    if hasattr(visual, "lock"):
        # open_clip's groups: ..., each block, [last block + ln_post], proj: N blocks + the projection.
        visual.lock(unlocked_groups=config.unfreeze_blocks + 1)
        return visual
    visual.requires_grad_(False)  # timm: the last blocks and the final norms
    for module in [*blocks[-config.unfreeze_blocks:], getattr(visual, "norm", None), getattr(visual, "fc_norm", None)]:
        if module is not None:
            module.requires_grad_(True)
    return visual
