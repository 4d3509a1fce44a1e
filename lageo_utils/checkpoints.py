"""Training checkpoints: atomic saves, safe loads and the random-number state that makes resuming exact.

Checkpoints are plain dictionaries of tensors and Python scalars/containers so that
``torch.load(weights_only=True)`` reads them: nothing in a checkpoint can run code when loaded.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from lageo_utils.files import atomic_write

CHECKPOINT_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit what it is used for."""


def save_checkpoint(state: dict, path: str | os.PathLike, *, also: str | os.PathLike | None = None) -> Path:
    """Write ``state`` to ``path`` atomically; optionally to ``also`` (e.g. ``best.pt``) first.

    ``also`` is renamed into place before ``path`` (e.g. ``last.pt``): a run killed in between
    resumes from the previous ``last.pt`` and redoes the epoch.
    """
    state = {**state, "format": CHECKPOINT_FORMAT}
    if also is not None:
        atomic_write(also, lambda tmp: torch.save(state, tmp))
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint with ``weights_only=True``; ``CheckpointError`` names the file on failure."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        raise CheckpointError(f"{path}: not a readable lageo checkpoint ({exc})") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a lageo training checkpoint (format {CHECKPOINT_FORMAT} expected)")
    return state


def capture_rng_state() -> dict:
    """The Python, NumPy and torch (CPU and CUDA) generator states as tensors and plain types."""
    version, mt_state, gauss_next = random.getstate()
    # The legacy global NumPy generator is the one other libraries draw from; it is what must be restored.
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()  # noqa: NPY002
    return {
        "python": {"version": version, "state": list(mt_state), "gauss_next": gauss_next},
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict) -> None:
    """Restore what ``capture_rng_state`` captured."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (the global generator other libraries use)
    torch.manual_seed(seed)
