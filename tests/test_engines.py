"""CPU inference engines (lageo_utils.engines): equal outputs to eager, their own cache entries, one export.

Each exported engine is tested only where its optional packages are installed (the ``engines`` extra);
the rest runs everywhere. The tiny model is exported once per module (a few seconds).
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from lageo_utils import engines
from lageo_utils.embed import EmbeddingCache, embed_manifest, embed_paths
from lageo_utils.engines import ENGINES, EngineUnavailableError, check_engine, image_encoder
from lageo_utils.model import TINY_MODEL, load_model
from lageo_utils.prompts import encode_region_texts

EXPORTED = [e for e in ENGINES if e != "eager"]


def needs(engine: str):
    """Skip unless the engine's optional packages are installed, naming them and the extra."""
    missing = [p for p in engines.ENGINE_PACKAGES[engine] if importlib.util.find_spec(p) is None]
    return pytest.mark.skipif(bool(missing), reason=f"engine {engine!r} needs {', '.join(missing)}: "
                                                    "pip install -e '.[engines]'")


EXPORTED_PARAMS = [pytest.param(e, marks=needs(e)) for e in EXPORTED]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, preprocess, tokenizer = load_model(TINY_MODEL, None, device="cpu")
    return model, preprocess, tokenizer


@pytest.fixture(scope="module")
def demo_like(tmp_path_factory):
    """60 synthetic demo scenes (one capture point per region, four headings) and their manifest."""
    from lageo_utils.demo import build_demo

    root = tmp_path_factory.mktemp("demo")
    return root, build_demo(root, points_per_region=1, image_size=64)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    return tmp_path_factory.mktemp("outputs")


@pytest.fixture(scope="module")
def cache_dir(outputs):
    """The embedding cache of runs in ``outputs`` (``steps.embedding_cache_dir``), where ``lageo predict`` keeps
    its exports too: a test that loads the same weights finds the tiny model already exported."""
    return outputs / "cache" / "embeddings"


@pytest.fixture(scope="module")
def eager_result(tiny, demo_like, cache_dir):
    model, preprocess, _ = tiny
    root, manifest = demo_like
    return embed_manifest(model, preprocess, manifest, root, cache_dir=cache_dir, batch_size=16, num_workers=0,
                          model_name=TINY_MODEL)


def test_engine_names_are_the_same_everywhere():
    from lageo_utils import bench, params
    from lageo_utils.cli import bench as cli_bench
    from lageo_utils.cli import predict as cli_predict

    assert params.ENGINES == ENGINES == cli_predict.ENGINES
    assert params.PARAMS["engine"].default == "eager" and params.PARAMS["engine"].choices == ENGINES
    assert cli_bench.ENGINES == bench.BENCH_ENGINES and set(ENGINES) < set(bench.BENCH_ENGINES)


def test_unknown_engine_and_an_accelerator_are_refused():
    with pytest.raises(ValueError, match=r"unknown engine 'onxx' \(did you mean 'onnx'\?\)"):
        check_engine("onxx")
    with pytest.raises(ValueError, match="engine 'onnx' runs on the CPU, not on cuda"):
        check_engine("onnx", "cuda")
    check_engine("eager", "cuda")  # eager runs anywhere


def test_a_missing_package_is_one_message_with_the_pip_command_before_any_work(monkeypatch, tiny, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(EngineUnavailableError, match=r"engine 'onnx' needs onnxruntime, which is not installed: "
                                                     r"pip install .*onnxruntime"):
        check_engine("onnx")
    model, preprocess, _ = tiny
    # embed_paths refuses before reading any file: a missing file would otherwise be a failure row.
    with pytest.raises(EngineUnavailableError, match="pip install"):
        embed_paths(model, preprocess, [str(tmp_path / "missing.jpg")], engine="onnx")

    from lageo_utils.cli import main

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the engine was checked")

    monkeypatch.setattr("lageo_utils.predict.load_predictor", no_model)
    assert main(["predict", "x.jpg", "--model", TINY_MODEL, "--pretrained", "none", "--engine", "onnx"]) == 2


def test_lageo_run_checks_the_engine_before_any_run(monkeypatch, tmp_path):
    from lageo_utils.pipeline import preflight
    from lageo_utils.runs import RunError, resolve_params

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    params = resolve_params("demo", overrides={"engine": "onnx"})
    with pytest.raises(RunError, match="engine 'onnx' needs onnxruntime.*pip install"):
        preflight(params)


@pytest.mark.parametrize("engine", EXPORTED_PARAMS)
def test_engine_outputs_equal_eager_on_demo_like_images(engine, tiny, demo_like, cache_dir, eager_result, regions):
    """Per-image cosine to eager >= 0.9999 and the same top-1 zero-shot region for every image."""
    model, preprocess, tokenizer = tiny
    root, manifest = demo_like
    result = embed_manifest(model, preprocess, manifest, root, cache_dir=cache_dir, batch_size=16, num_workers=0,
                            model_name=TINY_MODEL, engine=engine)
    assert np.array_equal(result.rows, eager_result.rows) and len(result.rows) == len(manifest)
    cosine = (result.embeddings.astype(np.float64) * eager_result.embeddings).sum(axis=1)
    assert cosine.min() >= 0.9999, cosine.min()
    text = encode_region_texts(model, tokenizer, regions, device="cpu").numpy()
    np.testing.assert_array_equal((result.embeddings @ text.T).argmax(1), (eager_result.embeddings @ text.T).argmax(1))


@pytest.mark.parametrize("engine", EXPORTED_PARAMS)
def test_cache_key_includes_the_engine(engine, tiny, cache_dir, tmp_path):
    """An embedding cached by eager is never served to another engine."""
    from PIL import Image

    from lageo_utils.files import sha256_file

    model, preprocess, _ = tiny
    cpu = torch.device("cpu")
    eager_cache = EmbeddingCache.for_model(cache_dir, model, preprocess, cpu, TINY_MODEL)
    engine_cache = EmbeddingCache.for_model(cache_dir, model, preprocess, cpu, TINY_MODEL, engine)
    assert eager_cache.directory != engine_cache.directory
    assert json.loads((engine_cache.directory / "meta.json").read_text())["engine"] == engine
    # A new image, and a marker vector for it in the eager cache only: eager serves it, the engine computes its own.
    path = tmp_path / f"{engine}.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    fresh = embed_paths(model, preprocess, [str(path)], model_name=TINY_MODEL, num_workers=0).embeddings  # no cache
    marker = np.full_like(fresh, 7.0)
    eager_cache.add([sha256_file(path)], marker)
    served = embed_paths(model, preprocess, [str(path)], cache_dir=cache_dir, model_name=TINY_MODEL, num_workers=0)
    assert np.array_equal(served.embeddings, marker)
    computed = embed_paths(model, preprocess, [str(path)], cache_dir=cache_dir, model_name=TINY_MODEL,
                           num_workers=0, engine=engine)
    np.testing.assert_allclose(computed.embeddings, fresh, atol=1e-3)
    assert len(engine_cache.lookup({sha256_file(path)})) == 1  # and caches it under its own key


@pytest.mark.parametrize("engine", EXPORTED_PARAMS)
def test_exported_file_is_reused_and_batches_of_any_size_run(engine, tiny, cache_dir, monkeypatch):
    model, _, _ = tiny
    first = image_encoder(model, engine, cache_dir=cache_dir, model_name=TINY_MODEL)
    images = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = model.encode_image(images)
        whole = first(images)
        single = first(images[:1])
    assert F.cosine_similarity(whole, expected).min() >= 0.9999
    torch.testing.assert_close(single, whole[:1], atol=1e-5, rtol=1e-4)
    folders = sorted((cache_dir / engines.ENGINES_DIR).iterdir())
    assert [f.name for f in folders if f.name.startswith(".")] == []  # no temporary folder left behind
    assert all((f / engines.ONNX_FILE).is_file() and (f / engines.META_FILE).is_file() for f in folders)

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(engines, "export_onnx", no_export)
    again = image_encoder(model, engine, cache_dir=cache_dir, model_name=TINY_MODEL)
    with torch.inference_mode():
        torch.testing.assert_close(again(images), whole)


@needs("onnx")
def test_other_weights_get_their_own_export(tiny, cache_dir):
    import copy

    model, _, _ = tiny
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.visual.proj.mul_(2.0)
    shape = (3, 64, 64)
    a = image_encoder(model, "onnx", cache_dir=cache_dir, model_name=TINY_MODEL).export_meta(shape)
    b = image_encoder(changed, "onnx", cache_dir=cache_dir, model_name=TINY_MODEL).export_meta(shape)
    assert a["weights"] != b["weights"] and {**a, "weights": None} == {**b, "weights": None}


@needs("onnx")
def test_image_only_backbone_exports(tmp_path):
    torch.manual_seed(0)
    model, _, _ = load_model("timm:lageo-tiny-dinov2", None, device="cpu")
    images = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        cosine = F.cosine_similarity(image_encoder(model, "onnx", cache_dir=tmp_path)(images), model.encode_image(images))
    assert cosine.min() >= 0.9999


@needs("onnx")
def test_lageo_predict_with_an_engine_answers_as_eager(capsys, monkeypatch, outputs, cache_dir, demo_like):
    from lageo_utils.cli import main

    monkeypatch.setenv("LAGEO_OUTPUTS", str(outputs))
    root, manifest = demo_like
    images = [str(root / p) for p in manifest["image_path"].head(3)]
    answers = {}
    for engine in ("eager", "onnx"):
        torch.manual_seed(0)  # the same random weights for both
        assert main(["predict", *images, "--model", TINY_MODEL, "--pretrained", "none", "--engine", engine,
                     "--device", "cpu"]) == 0
        answers[engine] = pd.DataFrame(json.loads(capsys.readouterr().out))
    assert answers["onnx"]["top_regions"].tolist() == answers["eager"]["top_regions"].tolist()
    np.testing.assert_allclose(np.stack(answers["onnx"]["top_pred_prob"]), np.stack(answers["eager"]["top_pred_prob"]),
                               atol=1e-4)
    assert list((cache_dir / engines.ENGINES_DIR).iterdir())  # kept in the embedding cache
