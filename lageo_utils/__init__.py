"""lageo: sub-city image geolocation in Los Angeles County with CLIP.

The public API, importable from the package (each name loads its module on first use, so
``import lageo_utils`` and ``lageo --help`` stay fast)::

    from lageo_utils import load_regions, load_clip, load_predictor, train, compute_metrics
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> the module that defines it
_PUBLIC = {
    "load_regions": "regions",
    "assign_regions": "regions",
    "read_manifest": "data",
    "write_manifest": "data",
    "split": "splits",
    "audit_leakage": "splits",
    "load_clip": "model",
    "check_weights": "model",
    "region_prompts": "prompts",
    "encode_region_texts": "prompts",
    "GeoPredictor": "predict",
    "load_predictor": "predict",
    "load_finetuned": "predict",
    "predict_manifest": "predict",
    "embed_manifest": "embed",
    "TrainConfig": "training",
    "train": "training",
    "compute_metrics": "metrics",
    "metrics_json": "metrics",
    "PARAMS": "params",
    "check_params": "params",
    "RunDir": "runs",
    "resolve_params": "runs",
    "run_pipeline": "pipeline",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'lageo_utils' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lageo_utils.{_PUBLIC[name]}"), name)


def __dir__() -> list[str]:
    return sorted(__all__)
