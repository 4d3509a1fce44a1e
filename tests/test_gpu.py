"""The CUDA path: mixed-precision embedding, a training step under autocast, pinned-memory loading.

Tests marked ``gpu`` need CUDA and skip without it (``scripts/gpu_check.sh`` runs them on a GPU
machine); the float32/bfloat16 comparison also runs on the CPU, through CPU autocast.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from test_finetune import write_split

from lageo_utils.bench import write_test_jpegs
from lageo_utils.embed import embed_paths
from lageo_utils.model import load_clip, precision
from lageo_utils.predict import RegionClassifier
from lageo_utils.training import TrainConfig, train
from lageo_utils.training.encoder import image_data
from lageo_utils.training.loop import _loader, new_run

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch.cuda.is_available() is False")
GPU = [pytest.mark.gpu, CUDA]
DEVICE = "cuda"


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> list[str]:
    return write_test_jpegs(tmp_path_factory.mktemp("gpu") / "images", 12, size=96)


def embed_at(name: str, device: str, paths: list[str], cache_dir=None) -> np.ndarray:
    torch.manual_seed(0)
    model, preprocess, _ = load_clip("lageo-tiny", None, device=device)
    with precision(name):
        result = embed_paths(model, preprocess, paths, batch_size=8, num_workers=0, device=device,
                             cache_dir=cache_dir, model_name="lageo-tiny")
    assert len(result.failures) == 0
    return result.embeddings


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU)])
def test_bfloat16_autocast_embeddings_agree_with_float32(jpegs, device, tmp_path):
    full = embed_at("fp32", device, jpegs, cache_dir=tmp_path)
    half = embed_at("bf16", device, jpegs, cache_dir=tmp_path)  # its own cache entries: the key has the precision
    cosine = np.sum(full * half, axis=1)  # both L2-normalised
    assert cosine.min() >= 0.99, cosine
    assert not np.array_equal(full, half), "bfloat16 autocast gave float32's numbers: it did not run"
    assert len(list(tmp_path.iterdir())) == 2  # one cache folder per precision


@pytest.mark.gpu
@CUDA
def test_the_cuda_pipeline_embeds_like_the_cpu(jpegs):
    """Pinned-memory loader, non-blocking copies and the CUDA forward (float32) give the CPU's embeddings."""
    on_cpu, on_gpu = embed_at("fp32", "cpu", jpegs), embed_at("fp32", DEVICE, jpegs)
    assert np.sum(on_cpu * on_gpu, axis=1).min() >= 0.9999


@pytest.mark.gpu
@CUDA
def test_the_training_loader_pins_memory_on_cuda(jpegs, tmp_path):
    torch.manual_seed(0)
    model, preprocess, _ = load_clip("lageo-tiny", None, device=DEVICE)
    frame = pd.DataFrame({"image_path": jpegs, "region_id": ["a", "b"] * (len(jpegs) // 2)})
    data = image_data(frame, ["a", "b"], preprocess, None)
    classifier = RegionClassifier(model.visual, torch.randn(2, model.visual.output_dim, device=DEVICE), 1.0)
    config = TrainConfig(strategy="full", model_name="lageo-tiny", pretrained=None, batch_size=4, num_workers=1)
    run = new_run(config, classifier, ["a", "b"], data, data, torch.device(DEVICE), tmp_path, "test", {})
    images, _, _ = next(iter(_loader(run, data, shuffle=True, epoch=1)))
    assert images.is_pinned()


@pytest.mark.gpu
@CUDA
def test_a_mixed_precision_training_run_on_cuda(tmp_path, regions):
    """Autocast (bfloat16, or float16 with the gradient scaler) through two epochs: finite, falling losses and a
    validation accuracy within a few images of float32 training's."""
    four = regions.iloc[:4].reset_index(drop=True)
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    train_split, val_split = write_split(images, "train", four, 8, rng), write_split(images, "val", four, 3, rng)
    config = TrainConfig(strategy="partial", model_name="lageo-tiny", pretrained=None, epochs=2, lr=1e-3,
                         batch_size=8, num_workers=2)
    results = {}
    for name in ("auto", "fp32"):
        with precision(name):
            results[name] = train(train_split, val_split, four, images, tmp_path / name, config, device=DEVICE)
    losses = results["auto"].history["train_loss"].to_numpy()
    assert np.isfinite(results["auto"].history[["train_loss", "val_loss"]].to_numpy()).all()
    assert losses[1] < losses[0], losses
    accuracy = {name: result.summary["best_val_acc"] for name, result in results.items()}
    assert abs(accuracy["auto"] - accuracy["fp32"]) <= 3 / len(val_split), accuracy
