"""Shared fixtures: the real reference data copied into tests/data, and generated data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Never reach the network from tests: open_clip/huggingface must fail fast, not download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

DATA = Path(__file__).parent / "data"
REFERENCE = DATA / "clip-geolocation"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return REFERENCE


@pytest.fixture(scope="session")
def regions():
    from lageo_utils.regions import load_regions

    return load_regions()
