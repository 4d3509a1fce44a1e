"""The strategies added beside the seed's: LoRA, text_scale, training regions, WiSE-FT, calibration."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from test_finetune import LR, data, one_thread, predict_val, reference, run_training, tiny_config  # noqa: F401

from lageo_utils.adapters import is_lora_parameter
from lageo_utils.calibration import fit_temperature, nll
from lageo_utils.checkpoints import load_checkpoint, seed_everything
from lageo_utils.model import load_clip
from lageo_utils.params import ParamError
from lageo_utils.predict import GeoPredictor, RegionClassifier, interpolate_classifiers, load_finetuned, wise_ft
from lageo_utils.training import TrainConfig
from lageo_utils.training.encoder import trainable_encoder

LR.update({"lora": 5e-3, "text_scale": 0.05})


@pytest.fixture(scope="module")
def base_weights(tmp_path_factory):
    """A local checkpoint of the tiny model: 'pretrained' weights, so checkpoints hold only what was trained."""
    torch.manual_seed(11)
    model, _, _ = load_clip("lageo-tiny", pretrained=None, device="cpu")
    path = tmp_path_factory.mktemp("base") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return str(path)


def test_lora_trains_only_adapters_and_head(base_weights):
    config = tiny_config("lora", pretrained=base_weights, lora_rank=4)
    model, _, _ = load_clip("lageo-tiny", base_weights, device="cpu")
    visual = trainable_encoder(model.visual, config)
    trainable = {name for name, p in visual.named_parameters() if p.requires_grad}
    assert trainable and all(is_lora_parameter(name) for name in trainable)
    blocks = len(visual.transformer.resblocks)
    # per block: attention (in_proj: A r x d, B 3d x r; out_proj: A r x d, B d x r) and the MLP's c_fc and c_proj
    width = visual.transformer.width
    hidden = visual.transformer.resblocks[0].mlp.c_fc.out_features
    per_block = 4 * (width + 3 * width) + 4 * (width + width) + 4 * (width + hidden) + 4 * (hidden + width)
    assert sum(p.numel() for name, p in visual.named_parameters() if name in trainable) == blocks * per_block
    assert all(not is_lora_parameter(n) for n, _ in model.visual.named_parameters())  # the base is untouched


def test_lora_learns_and_its_small_checkpoint_reloads_to_the_same_predictions(data, base_weights, tmp_path):
    result = run_training(data, tmp_path, tiny_config("lora", pretrained=base_weights))
    assert result.summary["best_val_acc"] >= result.summary["zeroshot_val_acc"] + 0.3, result.summary
    state = load_checkpoint(result.best_checkpoint)
    visual_keys = [k for k in state["model"] if k.startswith("visual.")]
    assert visual_keys and all(is_lora_parameter(k) for k in visual_keys)  # adapters only: no base weights
    adapters = sum(state["model"][k].numel() for k in visual_keys)
    head = state["model"]["head.weight"].numel() + state["model"]["head.bias"].numel()
    assert result.summary["trainable_params"] == adapters + head
    predictor = load_finetuned(result.best_checkpoint, data.regions, "cpu")
    assert predictor.checkpoint["strategy"] == "lora"
    predictions = predict_val(predictor, data)
    assert predictions["correct"].mean() == pytest.approx(result.summary["best_val_acc"])
    again = predict_val(load_finetuned(result.best_checkpoint, data.regions, "cpu"), data)
    np.testing.assert_array_equal(np.stack(again["top_probs"]), np.stack(predictions["top_probs"]))


def test_lora_resumes_after_an_interruption_to_the_same_result(data, base_weights, tmp_path):
    config = tiny_config("lora", pretrained=base_weights, epochs=2)

    def interrupt(epoch: int, batch: int) -> None:
        if (epoch, batch) == (2, 1):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(data, tmp_path / "cut", config, on_step=interrupt)
    resumed = run_training(data, tmp_path / "cut", config, resume=True)
    whole = run_training(data, tmp_path / "whole", config)
    pd.testing.assert_frame_equal(resumed.history.drop(columns="seconds"), whole.history.drop(columns="seconds"))
    got, want = load_checkpoint(resumed.best_checkpoint)["model"], load_checkpoint(whole.best_checkpoint)["model"]
    assert got.keys() == want.keys()
    # Within float rounding, not bit for bit: peft's nn.MultiheadAttention adapter merges its weights into the base
    # weights before each forward pass and subtracts them after, so the frozen base drifts by ~1e-8 per step.
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)


def test_text_scale_starts_at_zero_shot_and_trains_a_scale_and_a_bias_per_region(data, reference):
    seed_everything(0)
    model, _, _ = load_clip("lageo-tiny", pretrained=None, device="cpu")
    text = torch.nn.functional.normalize(torch.randn(4, model.visual.output_dim), dim=-1)
    embeddings = torch.randn(10, model.visual.output_dim)
    scaled = RegionClassifier(model.visual, text, 100.0, head="scaled")
    torch.testing.assert_close(scaled.classify(embeddings), RegionClassifier(model.visual, text, 100.0, "cosine")
                               .classify(embeddings))
    assert sum(p.numel() for p in scaled.head_parameters()) == 1 + 4

    result = reference("text_scale")
    assert result.summary["zeroshot_val_acc"] == reference("zeroshot").summary["best_val_acc"]
    state = load_checkpoint(result.best_checkpoint)
    assert state["head"] == "scaled" and {"log_scale", "bias"} <= set(state["model"])
    assert len(load_finetuned(result.best_checkpoint, data.regions, "cpu").class_ids) == 4


def test_training_regions_see_no_other_regions_image(data, tmp_path):
    trained = data.regions["id"].tolist()[:2]
    others = data.train[~data.train["region_id"].isin(trained)]
    broken = tmp_path / "images"
    import shutil

    shutil.copytree(data.images, broken)
    for path in others["image_path"]:
        (broken / path).write_bytes(b"not an image: reading it would be reported")
    config = tiny_config("partial", epochs=1, train_regions=trained)
    from lageo_utils.training import train

    result = train(data.train, data.val, data.regions, broken, tmp_path / "out", config, device="cpu")
    assert result.summary["skipped_images"] == []
    assert result.summary["n_train"] == data.train["region_id"].isin(trained).sum()
    assert load_checkpoint(result.best_checkpoint)["region_ids"] == data.regions["id"].tolist()  # all regions scored
    with pytest.raises(ParamError, match=r"train_regions \['atlantis'\] are not in the region file"):
        train(data.train, data.val, data.regions, broken, tmp_path / "x", tiny_config("partial", epochs=1,
                                                                                       train_regions=["atlantis"]))
    with pytest.raises(ParamError, match="train_regions must be a non-empty list"):
        TrainConfig(train_regions="downtown_la")


def test_wise_ft_at_alpha_0_and_1_equals_its_two_ends(data, reference):
    seed_everything(tiny_config("full").seed)  # the random base model the run started from
    base, preprocess, tokenizer = load_clip("lageo-tiny", pretrained=None, device="cpu")
    finetuned = load_finetuned(reference("full").best_checkpoint, data.regions, "cpu")
    finetuned.temperature = 1.0  # the ends are compared at one temperature: WiSE-FT mixes weights, not calibrations
    zero_shot = GeoPredictor(base, preprocess, tokenizer, data.regions, device="cpu")
    ends = {0.0: predict_val(zero_shot, data), 1.0: predict_val(finetuned, data)}
    for alpha, want in ends.items():
        got = predict_val(wise_ft(finetuned, base, alpha), data)
        np.testing.assert_allclose(np.stack(got["top_probs"]), np.stack(want["top_probs"]), atol=1e-5)
        assert got["pred_region"].tolist() == want["pred_region"].tolist()
    halfway = wise_ft(finetuned, base, 0.5)
    weight = next(n for n, _ in base.visual.named_parameters())
    mid = dict(halfway.classifier.visual.named_parameters())[weight]
    a, b = dict(base.visual.named_parameters())[weight], dict(finetuned.classifier.visual.named_parameters())[weight]
    torch.testing.assert_close(mid, (a + b) / 2)
    with pytest.raises(ValueError, match="alpha must be in"):
        interpolate_classifiers(zero_shot.classifier, finetuned.classifier, 1.5)


def test_temperature_scaling_keeps_top1_and_lowers_validation_nll(reference):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, (300, 5))
    labels = np.where(rng.random(300) < 0.5, logits.argmax(1), rng.integers(0, 5, 300))  # overconfident
    temperature = fit_temperature(logits, labels)
    assert temperature > 1 and nll(logits, labels, temperature) < nll(logits, labels)
    assert (np.argmax(logits / temperature, 1) == np.argmax(logits, 1)).all()

    summary = reference("linear_probe").summary
    assert summary["val_nll_calibrated"] <= summary["val_nll"] + 1e-9
    assert load_checkpoint(reference("linear_probe").best_checkpoint)["temperature"] == summary["temperature"]
