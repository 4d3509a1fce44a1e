"""Loading CLIP: the tiny model, local checkpoints, and clear errors when weights cannot be had."""

from __future__ import annotations

import time

import pytest
import torch
from PIL import Image

from lageo_utils.model import (
    TINY_MODEL,
    WEIGHTS_ENV,
    WeightsUnavailableError,
    autocast,
    load_clip,
    normalize_pretrained,
    resolve_device,
    weights_identity,
)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(3)
    model, _, _ = load_clip(TINY_MODEL, pretrained=None, device="cpu")
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path, weights_identity(model)


def _assert_helpful(message: str, tried: str) -> None:
    assert repr(tried) in message
    assert "internet" in message  # fix 1: connect once so open_clip caches the weights
    assert WEIGHTS_ENV in message and "checkpoint" in message  # fix 2: a local file


def test_tiny_model_loads_with_random_weights():
    model, preprocess, tokenizer = load_clip(TINY_MODEL, pretrained="none", device="cpu")
    visual_params = sum(p.numel() for p in model.visual.parameters())
    assert 100_000 < visual_params < 1_000_000  # a ViT of a few hundred thousand parameters
    assert not model.training
    image = preprocess(Image.new("RGB", (100, 80)))
    assert image.shape == (3, 64, 64)
    with torch.no_grad():
        assert model.encode_image(image[None]).shape == (1, 64)
        assert model.encode_text(tokenizer(["a street"])).shape == (1, 64)


def test_same_seed_same_weights_and_identity_tracks_content():
    torch.manual_seed(0)
    first, _, _ = load_clip(TINY_MODEL, pretrained=None, device="cpu")
    torch.manual_seed(0)
    second, _, _ = load_clip(TINY_MODEL, pretrained=None, device="cpu")
    assert weights_identity(first) == weights_identity(second)
    with torch.no_grad():
        second.visual.proj.add_(1e-3)
    assert weights_identity(first) != weights_identity(second)
    assert weights_identity(first, module="transformer") == weights_identity(second, module="transformer")


def test_local_checkpoint_and_env_variable_load_those_weights(tiny_checkpoint, monkeypatch):
    path, identity = tiny_checkpoint
    model, _, _ = load_clip(TINY_MODEL, pretrained=str(path), device="cpu")
    assert weights_identity(model) == identity
    monkeypatch.setenv(WEIGHTS_ENV, str(path))
    model, _, _ = load_clip(TINY_MODEL, pretrained="openai", device="cpu")  # the file replaces the tag
    assert weights_identity(model) == identity
    torch.manual_seed(1)
    random_model, _, _ = load_clip(TINY_MODEL, pretrained=None, device="cpu")  # none stays random
    assert weights_identity(random_model) != identity


def _activation(model) -> str:
    return type(model.visual.transformer.resblocks[0].mlp.gelu).__name__


def test_quick_gelu_for_openai_style_files_unless_told_otherwise(tiny_checkpoint):
    path, _ = tiny_checkpoint
    assert _activation(load_clip(TINY_MODEL, pretrained=None, device="cpu")[0]) == "GELU"
    assert _activation(load_clip(TINY_MODEL, pretrained=str(path), device="cpu")[0]) == "QuickGELU"
    assert _activation(load_clip(TINY_MODEL, pretrained=str(path), device="cpu", quick_gelu=False)[0]) == "GELU"


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'ViT-Nope'"):
        load_clip("ViT-Nope", pretrained=None)


def test_unknown_tag_lists_the_known_ones():
    with pytest.raises(WeightsUnavailableError, match="unknown tag") as info:
        load_clip("ViT-B-32", pretrained="no_such_tag")
    _assert_helpful(str(info.value), "no_such_tag")
    assert "laion2b_s34b_b79k" in str(info.value)


def test_missing_checkpoint_file(tmp_path):
    missing = str(tmp_path / "ViT-B-32.pt")
    with pytest.raises(WeightsUnavailableError, match="does not exist") as info:
        load_clip("ViT-B-32", pretrained=missing)
    _assert_helpful(str(info.value), missing)


def test_env_variable_naming_a_missing_file(tmp_path, monkeypatch):
    missing = str(tmp_path / "gone.safetensors")
    monkeypatch.setenv(WEIGHTS_ENV, missing)
    with pytest.raises(WeightsUnavailableError, match=f"{WEIGHTS_ENV} names a missing file") as info:
        load_clip("ViT-B-32", pretrained="openai")
    _assert_helpful(str(info.value), missing)


@pytest.mark.parametrize("name", ["garbage.pt", "garbage.safetensors"])
def test_unreadable_checkpoint_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x00not weights" * 10)
    with pytest.raises(WeightsUnavailableError, match="could not be loaded as lageo-tiny weights") as info:
        load_clip(TINY_MODEL, pretrained=str(path))
    _assert_helpful(str(info.value), str(path))


def test_checkpoint_with_missing_weights(tmp_path, tiny_checkpoint):
    state = torch.load(tiny_checkpoint[0], weights_only=True)
    del state["visual.proj"]
    path = tmp_path / "incomplete.pt"
    torch.save(state, path)
    with pytest.raises(WeightsUnavailableError, match=r"(?s)could not be loaded as lageo-tiny weights.*Missing key.*visual\.proj"):
        load_clip(TINY_MODEL, pretrained=str(path))


def test_offline_tag_fails_fast_without_random_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError, match="no cached copy") as info:
        load_clip("ViT-B-32", pretrained="openai", cache_dir=tmp_path)
    assert time.perf_counter() - start < 10
    _assert_helpful(str(info.value), "openai")


def test_pretrained_spellings():
    assert [normalize_pretrained(v) for v in (None, "none", "None", " random ", "")] == [None] * 5
    assert normalize_pretrained("openai") == "openai"


def test_devices_and_autocast():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else None
    if expected:
        assert resolve_device("auto").type == "cuda"
    elif not torch.backends.mps.is_available():
        assert resolve_device("auto") == torch.device("cpu")
    with autocast(torch.device("cpu")):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
