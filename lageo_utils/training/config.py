"""What defines a training run: ``TrainConfig``, validated through the run parameter schema."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lageo_utils.model import normalize_pretrained
from lageo_utils.params import STRATEGIES, ParamError, check_value

EMBEDDING_STRATEGIES = ("zeroshot", "text_scale", "linear_probe")  # trained (or evaluated) on cached embeddings
ENCODER_STRATEGIES = ("partial", "lora", "full", "contrastive")  # train image-encoder weights on images
DEFAULT_LR = {"zeroshot": 0.0, "text_scale": 1e-2, "linear_probe": 1e-3, "partial": 1e-5, "lora": 1e-4, "full": 1e-5,
              "contrastive": 1e-5}
TEXT_STRATEGIES = ("zeroshot", "text_scale", "contrastive")  # need the region prompts' text embeddings
HEAD_OF = {"zeroshot": "linear", "text_scale": "scaled", "contrastive": "cosine"}  # every other strategy: linear
# Settings a resumed run may change; any other difference from the checkpoint's config is an error.
RESUMABLE_CHANGES = ("epochs", "patience", "num_workers", "engine")
# Config fields whose run parameter has another name, and list fields checked here.
PARAM_NAMES = {"model_name": "model"}
LIST_FIELDS = ("lora_targets", "train_regions", "templates")

__all__ = ["DEFAULT_LR", "EMBEDDING_STRATEGIES", "ENCODER_STRATEGIES", "HEAD_OF", "RESUMABLE_CHANGES", "STRATEGIES",
           "TEXT_STRATEGIES", "TrainConfig"]


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
    num_workers: int | None = None  # image loader workers; None: one per core, at most 4
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] | None = None  # None: every block's attention and MLP (see adapters)
    train_regions: list[str] | None = None  # train (and select the best epoch) on these regions' images; None: all
    templates: list[str] | None = None  # region prompt templates; None: the seed's template
    embed_batch_size: int = 64  # for computing cached embeddings (zeroshot, text_scale, linear_probe)
    engine: str = "eager"  # what runs the image encoder for those embeddings (lageo_utils.engines)

    def __post_init__(self) -> None:
        # Plain Python values (the config is stored in checkpoints that load with weights_only=True),
        # checked against the one parameter schema.
        for item in dataclasses.fields(self):
            if item.name not in LIST_FIELDS:
                setattr(self, item.name, check_value(PARAM_NAMES.get(item.name, item.name), getattr(self, item.name)))
        self.pretrained = normalize_pretrained(self.pretrained)
        for name in LIST_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, str) or not isinstance(value, list | tuple) or not value or not all(
                    isinstance(v, str) and v for v in value):
                raise ParamError(f"{name} must be a non-empty list of texts, got {value!r}")
            setattr(self, name, list(value))

    @property
    def head(self) -> str:
        """The ``RegionClassifier`` head this strategy trains."""
        return HEAD_OF.get(self.strategy, "linear")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.strategy]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
