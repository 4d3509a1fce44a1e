"""The embedding pipeline and its cache: right vectors, failures reported, re-runs compute nothing."""

from __future__ import annotations

import fcntl
import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lageo_utils.bench import benchmark_embed, write_test_jpegs
from lageo_utils.embed import embed_manifest, embed_paths, loader_chunks
from lageo_utils.images import DECODER_SETTINGS, decoder_settings, input_size, open_rgb
from lageo_utils.model import TINY_MODEL, load_clip


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, preprocess, _ = load_clip(TINY_MODEL, pretrained=None, device="cpu")
    return model, preprocess


@pytest.fixture
def counted(tiny, monkeypatch):
    """The tiny model with a record of how many images each forward pass received."""
    model, preprocess = tiny
    calls: list[int] = []
    forward = model.encode_image

    def encode_image(images, **kwargs):
        calls.append(len(images))
        return forward(images, **kwargs)

    monkeypatch.setattr(model, "encode_image", encode_image)
    return model, preprocess, calls


def _write_images(folder, count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    names = []
    for i in range(count):
        name = f"img_{i:02d}.jpg"
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(folder / name, quality=90)
        names.append(name)
    return names


def _reference(model, preprocess, paths, min_size: int | None = None) -> np.ndarray:
    batch = torch.stack([preprocess(open_rgb(p, min_size)) for p in paths])
    with torch.no_grad():
        return F.normalize(model.encode_image(batch), dim=-1).numpy()


def test_embeddings_match_the_model_and_failures_are_listed(tiny, tmp_path):
    model, preprocess = tiny
    names = _write_images(tmp_path, 3)
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not a picture")
    manifest = pd.DataFrame({"image_path": [names[0], "empty.jpg", names[1], "missing.jpg", "text.jpg", names[2]]})

    result = embed_manifest(model, preprocess, manifest, tmp_path, batch_size=2, num_workers=0)

    assert result.rows.tolist() == [0, 2, 5]
    assert result.image_paths == names
    assert result.embeddings.dtype == np.float32 and result.embeddings.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(result.embeddings, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(result.embeddings, _reference(model, preprocess, [tmp_path / n for n in names]),
                               atol=1e-5)
    assert result.failures.to_dict(orient="records") == [
        {"image_path": "empty.jpg", "reason": "empty file (0 bytes)"},
        {"image_path": "missing.jpg", "reason": "file not found"},
        {"image_path": "text.jpg", "reason": "not an image (unrecognised format)"},
    ]


def test_worker_processes_give_the_same_embeddings(tiny, tmp_path):
    model, preprocess = tiny
    paths = [str(tmp_path / n) for n in _write_images(tmp_path, 7)]
    serial = embed_paths(model, preprocess, paths, batch_size=2, num_workers=0)
    parallel = embed_paths(model, preprocess, paths, batch_size=2, num_workers=2)
    assert parallel.rows.tolist() == list(range(7))
    np.testing.assert_allclose(parallel.embeddings, serial.embeddings, atol=1e-6)


def test_loader_chunks_start_small_then_share_each_batch():
    chunks = loader_chunks(200, batch_size=64, workers=2)
    assert [len(c) for c in chunks] == [8, 8] + [32] * 5 + [24]  # 16 images start the model, then halves of 64
    assert [i for c in chunks for i in c] == list(range(200))
    assert [len(c) for c in loader_chunks(10, batch_size=4, workers=0)] == [4, 4, 2]
    assert [len(c) for c in loader_chunks(40, batch_size=64, workers=1)] == [16, 24] and loader_chunks(0, 64, 1) == []


def test_workers_share_each_forward_batch_of_exactly_batch_size(counted, tmp_path):
    model, preprocess, calls = counted
    names = _write_images(tmp_path, 7)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not really")
    paths = [names[0], "bad.jpg", *names[1:4], "bad.jpg", *names[4:]]
    result = embed_paths(model, preprocess, paths, root=tmp_path, batch_size=4, num_workers=2)
    # 8 distinct files: chunks of 1, 1 (the first batch, 2 images), then 2, 2, 2 regrouped around the failure
    assert calls == [2, 4, 1]
    assert result.rows.tolist() == [0, 2, 3, 4, 6, 7, 8]
    assert result.failures["image_path"].tolist() == ["bad.jpg", "bad.jpg"]
    np.testing.assert_allclose(result.embeddings, _reference(model, preprocess, [tmp_path / n for n in names]),
                               atol=1e-5)


def test_cache_hit_computes_nothing(counted, tmp_path):
    model, preprocess, calls = counted
    paths = [str(tmp_path / n) for n in _write_images(tmp_path, 5)]
    first = embed_paths(model, preprocess, paths, cache_dir=tmp_path / "cache", batch_size=2, num_workers=0)
    assert sum(calls) == 5

    calls.clear()
    again = embed_paths(model, preprocess, paths, cache_dir=tmp_path / "cache", batch_size=2, num_workers=0)
    assert calls == []
    np.testing.assert_array_equal(again.embeddings, first.embeddings)
    assert again.image_paths == first.image_paths

    stored = list((tmp_path / "cache").iterdir())
    assert len(stored) == 1 and stored[0].name.startswith(f"{type(model).__name__}-")
    assert {p.suffix or p.name for p in stored[0].iterdir()} == {".npy", ".parquet", ".json", ".lock"}


def test_cache_miss_on_a_changed_file_only(counted, tmp_path):
    model, preprocess, calls = counted
    paths = [str(tmp_path / n) for n in _write_images(tmp_path, 4)]
    first = embed_paths(model, preprocess, paths, cache_dir=tmp_path / "cache", num_workers=0, model_name="tiny")
    Image.new("RGB", (32, 24), (250, 200, 10)).save(paths[2], quality=90)  # same name, new content

    calls.clear()
    second = embed_paths(model, preprocess, paths, cache_dir=tmp_path / "cache", num_workers=0, model_name="tiny")
    assert calls == [1]
    np.testing.assert_array_equal(second.embeddings[[0, 1, 3]], first.embeddings[[0, 1, 3]])
    assert not np.allclose(second.embeddings[2], first.embeddings[2])
    np.testing.assert_allclose(second.embeddings[2], _reference(model, preprocess, [paths[2]])[0], atol=1e-5)


def test_cache_miss_on_a_changed_model_or_preprocessing(tmp_path):
    torch.manual_seed(1)
    model, preprocess, _ = load_clip(TINY_MODEL, pretrained=None, device="cpu")
    paths = [str(tmp_path / n) for n in _write_images(tmp_path, 3)]
    cache = tmp_path / "cache"
    before = embed_paths(model, preprocess, paths, cache_dir=cache, num_workers=0)

    with torch.no_grad():
        model.visual.proj.mul_(-1.0)  # new weights, same name
    after = embed_paths(model, preprocess, paths, cache_dir=cache, num_workers=0)
    np.testing.assert_allclose(after.embeddings, -before.embeddings, atol=1e-5)  # recomputed, not reused

    preprocess.transforms[0].size = 48  # resize before the crop: different pixels
    embed_paths(model, preprocess, paths, cache_dir=cache, num_workers=0)
    assert len(list(cache.iterdir())) == 3


def test_large_jpegs_are_decoded_at_reduced_scale_and_the_cache_key_says_so(tiny, tmp_path):
    model, preprocess = tiny
    paths = write_test_jpegs(tmp_path / "street", 3)  # 640 x 640 like Street View; the tiny model's input is 64 px
    assert input_size(preprocess) == 64 and open_rgb(paths[0], 64).size == (80, 80)

    result = embed_paths(model, preprocess, paths, cache_dir=tmp_path / "cache", num_workers=0)

    reduced, full = (_reference(model, preprocess, paths, min_size) for min_size in (64, None))
    np.testing.assert_allclose(result.embeddings, reduced, atol=1e-5)
    assert np.abs(reduced - full).max() > 1e-4  # other pixels, so the cache must not mix the two
    assert (reduced * full).sum(axis=1).min() > 0.999  # but the same picture
    (folder,) = (tmp_path / "cache").iterdir()
    assert json.loads((folder / "meta.json").read_text())["decoder"] == decoder_settings(64) != DECODER_SETTINGS


def test_duplicate_contents_are_embedded_once(counted, tmp_path):
    model, preprocess, calls = counted
    names = _write_images(tmp_path, 2)
    (tmp_path / "copy.jpg").write_bytes((tmp_path / names[0]).read_bytes())
    result = embed_paths(model, preprocess, [names[0], names[1], "copy.jpg", names[0]], root=tmp_path,
                         num_workers=0)
    assert calls == [2]
    assert result.rows.tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(result.embeddings[2], result.embeddings[0])


def test_unusable_cache_shard_is_recomputed(counted, tmp_path, caplog):
    model, preprocess, calls = counted
    paths = [str(tmp_path / n) for n in _write_images(tmp_path, 2)]
    first = embed_paths(model, preprocess, paths, cache_dir=tmp_path / "cache", num_workers=0)
    (shard,) = (tmp_path / "cache").glob("*/shard-*.npy")
    shard.write_bytes(b"damaged")

    calls.clear()
    again = embed_paths(model, preprocess, paths, cache_dir=tmp_path / "cache", num_workers=0)
    assert calls == [2]
    assert "unusable" in caplog.text
    np.testing.assert_allclose(again.embeddings, first.embeddings, atol=1e-6)


def test_nothing_readable(tiny, tmp_path):
    model, preprocess = tiny
    (tmp_path / "a.jpg").write_bytes(b"")
    result = embed_paths(model, preprocess, ["a.jpg", "b.jpg"], root=tmp_path, cache_dir=tmp_path / "c")
    assert result.embeddings.shape == (0, 64)
    assert result.rows.tolist() == [] and len(result.failures) == 2


def test_manifest_needs_image_paths(tiny):
    with pytest.raises(ValueError, match="no 'image_path' column"):
        embed_manifest(*tiny, pd.DataFrame({"path": ["a.jpg"]}), None)


def test_benchmark_reports_its_figures():
    figures = benchmark_embed(TINY_MODEL, None, images=6, batch_size=4, num_workers=0, device="cpu")
    assert {"model", "device", "images", "raw_model_img_s", "pipeline_img_s", "pipeline_vs_raw", "cached_img_s",
            "cache_speedup", "peak_rss_mb"} <= figures.keys()
    assert figures["model"] == TINY_MODEL and figures["images"] == 6 and figures["device"] == "cpu"
    for key in ("raw_model_img_s", "pipeline_img_s", "cached_img_s", "peak_rss_mb"):
        assert figures[key] > 0
    # both sides are rounded (img/s to 2 decimals, the ratio to 3): compare within that rounding
    assert figures["pipeline_vs_raw"] == pytest.approx(figures["pipeline_img_s"] / figures["raw_model_img_s"], rel=0.01,
                                                       abs=1e-3)


def test_the_index_lock_is_a_posix_record_lock_other_processes_see(tiny, tmp_path):
    """fcntl record locks (what NFS supports), not flock on the directory: another process cannot take it."""
    import subprocess
    import sys

    from lageo_utils.embed import LOCK_FILE, EmbeddingCache

    model, preprocess = tiny
    cache = EmbeddingCache.for_model(tmp_path, model, preprocess, torch.device("cpu"), "tiny")
    probe = ("import fcntl, sys\nwith open(sys.argv[1], 'r+') as f:\n"
             "    try:\n        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n    except OSError:\n        sys.exit(3)\n")
    with cache._locked(fcntl.LOCK_EX):
        held = subprocess.run([sys.executable, "-c", probe, str(cache.directory / LOCK_FILE)])
    free = subprocess.run([sys.executable, "-c", probe, str(cache.directory / LOCK_FILE)])
    assert (held.returncode, free.returncode) == (3, 0)
