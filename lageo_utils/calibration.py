"""Temperature scaling (Guo et al., 2017): one scalar per model, fitted on the validation split.

Dividing the logits by a temperature changes no prediction's rank, only its confidence.
Hand-written: a one-parameter maximum-likelihood fit that scikit-learn and torch do not ship.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0


def _copy(values, dtype: torch.dtype) -> torch.Tensor:
    """A writable copy as a tensor (the caller's array may be read-only; a tensor is copied without numpy)."""
    if isinstance(values, torch.Tensor):
        return values.detach().to("cpu", dtype).clone()
    return torch.from_numpy(np.array(values)).to(dtype)


def fit_temperature(logits, labels, max_iter: int = 200) -> float:
    """The temperature that minimises the negative log-likelihood of ``labels`` under ``softmax(logits / T)``."""
    logits, labels = _copy(logits, torch.float64), _copy(labels, torch.long)
    if logits.ndim != 2 or len(logits) != len(labels) or len(labels) == 0:
        raise ValueError(f"need (n, classes) logits and n labels, got {tuple(logits.shape)} and {len(labels)}")
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)  # T = exp(log_t) stays positive
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    # A model with no skill drives the fit towards uniform probabilities (T -> infinity); beyond these bounds the
    # probabilities no longer change in any digit a report shows.
    return float(log_t.detach().exp().clamp(MIN_TEMPERATURE, MAX_TEMPERATURE))


def nll(logits, labels, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits / temperature)``."""
    return float(F.cross_entropy(_copy(logits, torch.float64) / temperature, _copy(labels, torch.long)))
