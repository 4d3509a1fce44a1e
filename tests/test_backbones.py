"""Image-only backbones (timm, e.g. DINOv2): loading, weight checks, image-side strategies, text-side refusals."""

from __future__ import annotations

import pytest
import torch
from test_finetune import data, one_thread, predict_val, run_training, tiny_config  # noqa: F401

from lageo_utils.checkpoints import load_checkpoint
from lageo_utils.embed import EmbeddingCache
from lageo_utils.model import WeightsUnavailableError, check_weights, load_model
from lageo_utils.predict import GeoPredictor, load_finetuned
from lageo_utils.training import TrainConfig

TIMM_TINY = "timm:lageo-tiny-dinov2"
LR = {"linear_probe": 0.05, "partial": 1e-3, "lora": 5e-3}


def timm_config(strategy: str, **changes) -> TrainConfig:
    settings = tiny_config("linear_probe").to_dict()
    return TrainConfig(**{**settings, "strategy": strategy, "model_name": TIMM_TINY, "lr": LR.get(strategy), **changes})


def test_a_timm_backbone_loads_as_an_image_only_model():
    model, preprocess, tokenizer = load_model(TIMM_TINY, None, device="cpu")
    assert tokenizer is None and not hasattr(model, "encode_text")
    from PIL import Image

    pixels = preprocess(Image.new("RGB", (120, 90), (10, 200, 30))).unsqueeze(0)
    assert pixels.shape == (1, 3, 56, 56)
    assert model.encode_image(pixels).shape == (1, model.visual.output_dim) == (1, 64)


@pytest.mark.parametrize(
    ("model", "pretrained", "error", "message"),
    [
        ("timm:vit_smal_patch14_dinov2", "default", ValueError, "did you mean 'timm:vit_small_patch14_dinov2'"),
        ("timm:vit_small_patch14_dinov2", "nope", WeightsUnavailableError, r"unknown tag \(known tags: \['lvd142m'\]\)"),
        ("timm:vit_small_patch14_dinov2", "lvd142m", WeightsUnavailableError, "HF_HUB_OFFLINE is set"),
        (TIMM_TINY, "default", WeightsUnavailableError, "a test model has no published weights"),
    ],
)
def test_timm_weights_are_checked_like_clip_weights(model, pretrained, error, message):
    with pytest.raises(error, match=message):
        check_weights(model, pretrained)
    if error is WeightsUnavailableError:
        with pytest.raises(WeightsUnavailableError, match="internet"):
            load_model(model, pretrained, device="cpu")


@pytest.mark.parametrize("strategy", ["linear_probe", "partial", "lora"])
def test_image_side_strategies_learn_on_a_timm_backbone(data, tmp_path, strategy):
    result = run_training(data, tmp_path, timm_config(strategy))
    summary = result.summary
    assert summary["zeroshot_val_acc"] is None  # no text tower: no zero-shot model to score
    assert summary["best_val_acc"] >= 1 / len(data.regions) + 0.3, summary  # chance on 4 balanced regions: 0.25
    state = load_checkpoint(result.best_checkpoint)
    assert not state["model"]["class_embeddings"].any()  # no text: the head started from zero
    predictions = predict_val(load_finetuned(result.best_checkpoint, data.regions, "cpu"), data)
    assert predictions["correct"].mean() == pytest.approx(summary["best_val_acc"])


@pytest.mark.parametrize("strategy", ["zeroshot", "text_scale", "contrastive"])
def test_text_side_strategies_say_they_need_a_text_tower(data, tmp_path, strategy):
    with pytest.raises(ValueError, match=rf"strategy '{strategy}' needs a text tower; {TIMM_TINY} is image-only"):
        run_training(data, tmp_path, timm_config(strategy))


def test_zero_shot_needs_clip(regions):
    model, preprocess, _ = load_model(TIMM_TINY, None, device="cpu")
    with pytest.raises(ValueError, match="has no text tower: zero-shot needs CLIP"):
        GeoPredictor(model, preprocess, None, regions, device="cpu", model_name=TIMM_TINY)


def test_the_embedding_cache_keeps_backbone_families_apart(tmp_path):
    clip_model, clip_pre, _ = load_model("lageo-tiny", None, device="cpu")
    timm_model, timm_pre, _ = load_model(TIMM_TINY, None, device="cpu")
    device = torch.device("cpu")
    clip_cache = EmbeddingCache.for_model(tmp_path, clip_model, clip_pre, device, "lageo-tiny")
    timm_cache = EmbeddingCache.for_model(tmp_path, timm_model, timm_pre, device, TIMM_TINY)
    assert clip_cache.directory != timm_cache.directory
    assert '"family": "image-only"' in (timm_cache.directory / "meta.json").read_text()


def test_the_backbone_rules_mirror_the_model_and_training_modules():
    from lageo_utils import backbones, model
    from lageo_utils.training import config

    assert backbones.IMAGE_ONLY_PREFIX == model.TIMM_PREFIX
    assert backbones.TEXT_STRATEGIES == config.TEXT_STRATEGIES
    assert backbones.is_image_only(TIMM_TINY) and not backbones.is_image_only("lageo-tiny")


def test_an_image_only_run_skips_the_text_side_methods_and_says_why():
    from lageo_utils.backbones import frozen_methods, skipped_markdown, skipped_methods, trained_strategies
    from lageo_utils.params import defaults
    from lageo_utils.runs import absent_files

    clip = {**defaults(), "model": "lageo-tiny", "strategies": ["zeroshot", "linear_probe", "partial"]}
    assert skipped_methods(clip) == {} and skipped_markdown({}) == "" and absent_files(clip) == set()
    assert trained_strategies(clip) == ["zeroshot", "linear_probe", "partial"]
    assert frozen_methods(clip) == ["centroid", "expected", "retrieval", "region_retrieval", "geocell"]

    timm = {**clip, "model": TIMM_TINY}
    assert trained_strategies(timm) == ["linear_probe", "partial"]
    assert frozen_methods(timm) == ["retrieval", "geocell"]
    skipped = skipped_methods(timm)
    assert list(skipped) == ["zero-shot classification (step 02)", "prompt variants (name, seed, visual, ensemble)",
                             "centroid, expected, region_retrieval before fine-tuning", "strategies zeroshot",
                             "WiSE-FT"]
    assert skipped_markdown(skipped).startswith("> **Text-side methods skipped: zero-shot classification (step 02)")
    assert absent_files(timm) == {"predictions_zeroshot.parquet", "classification_report_zeroshot.txt"}
    linear_only = {**timm, "strategies": ["linear_probe"], "geo_methods": ["centroid", "expected"], "prompt_variants": []}
    assert list(skipped_methods(linear_only)) == ["zero-shot classification (step 02)",
                                                  "centroid, expected before fine-tuning"]  # no WiSE-FT to skip
    assert frozen_methods(linear_only) == [] and {"locator/zeroshot", "coordinates_zeroshot.parquet"} <= absent_files(
        linear_only)


def test_a_timm_checkpoint_file_loads_and_one_of_another_layout_is_refused(tmp_path):
    model, _, _ = load_model(TIMM_TINY, None, device="cpu")
    weights = model.visual.state_dict()  # the timm backbone itself
    torch.save(weights, tmp_path / "own.pt")
    loaded, _, _ = load_model(TIMM_TINY, str(tmp_path / "own.pt"), device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    torch.save({f"backbone.{k}": v for k, v in weights.items()}, tmp_path / "prefixed.pt")
    with pytest.raises(WeightsUnavailableError, match=r"weights are not in the file \(first: .*backbone\.cls_token"):
        load_model(TIMM_TINY, str(tmp_path / "prefixed.pt"), device="cpu")
