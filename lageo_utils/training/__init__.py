"""Fine-tuning: the config, one module per family of strategies, and the shared loop.

Strategies (``TrainConfig.strategy``):

- ``zeroshot``: nothing is trained; the baseline through the same evaluation path.
- ``linear_probe``: a linear head over frozen, L2-normalised image embeddings, computed once
  through the embedding cache (``training.embedding``).
- ``partial``: the last ``unfreeze_blocks`` visual transformer blocks, the final norm and the
  projection, plus the head (``training.encoder``).
- ``full``: the whole image encoder plus the head (``training.encoder``).
- ``contrastive``: the whole image encoder against the fixed region prompt embeddings with
  CLIP's scaled-cosine cross-entropy (the seed study's approach; no head; ``training.encoder``).

Training imports inference (``lageo_utils.predict``), never the reverse.
"""

from lageo_utils.training.config import DEFAULT_LR, STRATEGIES, TrainConfig
from lageo_utils.training.loop import HISTORY_COLUMNS, TrainResult, train

__all__ = ["DEFAULT_LR", "HISTORY_COLUMNS", "STRATEGIES", "TrainConfig", "TrainResult", "train"]
