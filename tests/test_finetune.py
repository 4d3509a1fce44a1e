"""Fine-tuning: strategies, learning, determinism, interrupted runs that resume, checkpoints, the CLI."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from lageo_utils.checkpoints import CheckpointError, load_checkpoint
from lageo_utils.predict import RegionClassifier, load_finetuned
from lageo_utils.training import HISTORY_COLUMNS, TrainConfig, train

N_TRAIN, N_VAL = 16, 6  # images per region
EPOCHS = 3
LR = {"linear_probe": 0.5, "partial": 1e-3, "full": 5e-4, "contrastive": 5e-4, "zeroshot": None}
SUMMARY_KEYS = {"strategy", "epochs_run", "best_epoch", "best_val_acc", "zeroshot_val_acc"}

# Each region's visual signature: a colour and a pattern (stripes, stripes, checkerboard, disc).
COLOURS = [(200, 40, 40), (40, 160, 60), (40, 70, 200), (220, 200, 40)]


def draw_region_image(kind: int, rng: np.random.Generator, size: int = 64) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size]
    shift = int(rng.integers(0, 8))
    if kind == 0:
        mask = ((y + shift) // 8) % 2 == 0
    elif kind == 1:
        mask = ((x + shift) // 8) % 2 == 0
    elif kind == 2:
        mask = ((x + shift) // 8 + (y + shift) // 8) % 2 == 0
    else:
        cx, cy = rng.integers(16, 48, 2)
        mask = (x - cx) ** 2 + (y - cy) ** 2 < rng.integers(100, 300)
    colour = np.array(COLOURS[kind], float) + rng.normal(0, 15, 3)
    pixels = np.where(mask[..., None], colour, 255 - 0.5 * colour) + rng.normal(0, 12, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_split(root, name: str, regions, per_region: int, rng) -> pd.DataFrame:
    (root / name).mkdir(parents=True, exist_ok=True)
    rows = []
    for kind, region in enumerate(regions.itertuples()):
        for i in range(per_region):
            path = f"{name}/{region.id}_{i:02d}.png"
            draw_region_image(kind, rng).save(root / path)
            rows.append({"image_path": path, "latitude": region.centroid_lat, "longitude": region.centroid_lon,
                         "region_id": region.id})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on the 2 shared cores of the test machine, two threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory, regions):
    base = tmp_path_factory.mktemp("finetune")
    four = regions.iloc[:4].reset_index(drop=True)
    rng = np.random.default_rng(0)
    images = base / "images"
    frames = {name: write_split(images, name, four, n, rng) for name, n in (("train", N_TRAIN), ("val", N_VAL))}
    splits = base / "splits"
    splits.mkdir()
    for name, frame in frames.items():
        frame.to_csv(splits / f"{name}.csv", index=False)
    return SimpleNamespace(base=base, images=images, splits=splits, regions=four, cache=base / "cache", **frames)


def tiny_config(strategy: str, **changes) -> TrainConfig:
    settings = dict(strategy=strategy, model_name="lageo-tiny", pretrained=None, epochs=EPOCHS, lr=LR[strategy],
                    batch_size=16, num_workers=0)
    return TrainConfig(**{**settings, **changes})


def run_training(data, out, config, **kwargs):
    return train(data.train, data.val, data.regions, data.images, out, config, device="cpu", cache_dir=data.cache,
                 **kwargs)


@pytest.fixture(scope="module")
def reference(data):
    """Uninterrupted runs, one per strategy, trained on first use."""
    done = {}

    def get(strategy: str):
        if strategy not in done:
            done[strategy] = run_training(data, data.base / f"run-{strategy}", tiny_config(strategy))
        return done[strategy]

    return get


@pytest.mark.parametrize("strategy", ["linear_probe", "partial", "contrastive", "full"])
def test_strategy_learns_the_regions_visual_signatures(reference, strategy):
    result = reference(strategy)
    summary = result.summary
    assert summary["best_val_acc"] >= summary["zeroshot_val_acc"] + 0.3, summary
    assert list(result.history.columns) == HISTORY_COLUMNS
    assert summary["epochs_run"] == EPOCHS == len(result.history)
    assert summary["best_epoch"] == int(result.history.loc[result.history["val_acc"].idxmax(), "epoch"])
    assert summary["best_val_acc"] == result.history["val_acc"].max()
    on_disk = json.loads((result.out_dir / "train_summary.json").read_text())
    assert SUMMARY_KEYS <= set(on_disk) and on_disk["strategy"] == strategy
    assert load_checkpoint(result.best_checkpoint)["epoch"] == summary["best_epoch"]
    assert load_checkpoint(result.last_checkpoint)["epoch"] == EPOCHS
    assert not list(result.out_dir.glob("*.tmp"))


@pytest.mark.parametrize("strategy", ["linear_probe", "partial", "contrastive", "full"])
def test_run_interrupted_mid_epoch_resumes_to_the_same_result(data, reference, tmp_path, strategy):
    def interrupt(epoch: int, batch: int) -> None:
        if (epoch, batch) == (2, 1):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(data, tmp_path, tiny_config(strategy), on_step=interrupt)
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1
    assert len(pd.read_csv(tmp_path / "history.csv")) == 1

    resumed = run_training(data, tmp_path, tiny_config(strategy), resume=True)
    expected = reference(strategy)
    assert resumed.summary["resumed_from_epoch"] == 1
    assert resumed.summary["best_val_acc"] == expected.summary["best_val_acc"]
    assert resumed.summary["best_epoch"] == expected.summary["best_epoch"]
    pd.testing.assert_frame_equal(resumed.history.drop(columns="seconds"), expected.history.drop(columns="seconds"))
    got, want = load_checkpoint(resumed.best_checkpoint)["model"], load_checkpoint(expected.best_checkpoint)["model"]
    assert got.keys() == want.keys()
    assert all(torch.equal(got[name], want[name]) for name in want)


def test_same_seed_same_history_and_another_seed_differs(data, tmp_path):
    def history(name: str, seed: int) -> pd.DataFrame:
        config = tiny_config("partial", epochs=1, augment=True, seed=seed, num_workers=1)  # augmented in a worker
        return run_training(data, tmp_path / name, config).history.drop(columns="seconds")

    first = history("a", seed=7)
    pd.testing.assert_frame_equal(first, history("b", seed=7))
    assert not first.equals(history("c", seed=8))


def test_head_starts_at_the_zero_shot_logits(data, reference):
    from lageo_utils.embed import embed_manifest
    from lageo_utils.model import load_clip
    from lageo_utils.predict import GeoPredictor
    from lageo_utils.prompts import encode_region_texts

    model, preprocess, tokenizer = load_clip("lageo-tiny", pretrained=None, device="cpu")
    class_embeddings = encode_region_texts(model, tokenizer, data.regions, device="cpu")
    scale = model.logit_scale.exp().item()
    classifier = RegionClassifier(model.visual, class_embeddings, scale)
    embeddings = torch.from_numpy(embed_manifest(model, preprocess, data.val, data.images, num_workers=0).embeddings)
    with torch.no_grad():
        head_logits = classifier.classify(embeddings)
        contrastive_logits = RegionClassifier(model.visual, class_embeddings, scale, head="cosine").classify(embeddings)
    zero_shot_logits = scale * embeddings @ class_embeddings.T
    torch.testing.assert_close(head_logits, zero_shot_logits, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(contrastive_logits, zero_shot_logits, rtol=1e-6, atol=1e-5)
    assert torch.equal(head_logits.argmax(1), zero_shot_logits.argmax(1))

    top_idx, _ = GeoPredictor(model, preprocess, tokenizer, data.regions, device="cpu").predict_embeddings(embeddings)
    assert torch.equal(torch.from_numpy(top_idx[:, 0]), head_logits.argmax(1))

    # Epoch 0 of every strategy is the zero-shot model, whether evaluated on images or cached embeddings.
    accuracies = {s: reference(s).summary["zeroshot_val_acc"] for s in ("linear_probe", "partial", "contrastive")}
    zeroshot = reference("zeroshot").summary
    assert set(accuracies.values()) == {zeroshot["best_val_acc"]}
    assert (zeroshot["epochs_run"], zeroshot["best_epoch"]) == (0, 0)


def test_zeroshot_checkpoint_predicts_exactly_like_zero_shot_clip(data, reference):
    from lageo_utils.checkpoints import seed_everything
    from lageo_utils.model import load_clip
    from lageo_utils.predict import GeoPredictor

    seed_everything(tiny_config("zeroshot").seed)  # the random base model the run started from
    model, preprocess, tokenizer = load_clip("lageo-tiny", pretrained=None, device="cpu")
    best = reference("zeroshot").best_checkpoint
    temperature = load_checkpoint(best)["temperature"]  # fitted on validation; the same for both sides
    zero_shot = predict_val(GeoPredictor(model, preprocess, tokenizer, data.regions, device="cpu",
                                         temperature=temperature), data)
    from_checkpoint = predict_val(load_finetuned(best, data.regions, "cpu"), data)
    assert from_checkpoint["top_regions"].tolist() == zero_shot["top_regions"].tolist()
    np.testing.assert_allclose(np.stack(from_checkpoint["top_probs"]), np.stack(zero_shot["top_probs"]), atol=1e-6)
    assert zero_shot["correct"].mean() == reference("zeroshot").summary["best_val_acc"]


def test_training_leaves_a_given_model_untouched(data, tmp_path):
    from lageo_utils.model import load_clip, weights_identity

    clip = load_clip("lageo-tiny", pretrained=None, device="cpu")
    before = weights_identity(clip[0])
    result = run_training(data, tmp_path, tiny_config("partial", epochs=1), clip=clip)
    assert result.summary["epochs_run"] == 1
    assert weights_identity(clip[0]) == before
    assert all(p.requires_grad for p in clip[0].visual.parameters())


def test_gradient_accumulation_matches_the_larger_batch(data, tmp_path):
    def head_after_one_epoch(name: str, **changes) -> torch.Tensor:
        result = run_training(data, tmp_path / name, tiny_config("linear_probe", epochs=1, **changes))
        return load_checkpoint(result.last_checkpoint)["model"]["head.weight"]

    whole = head_after_one_epoch("whole", batch_size=16)
    accumulated = head_after_one_epoch("accumulated", batch_size=8, grad_accum_steps=2)
    torch.testing.assert_close(accumulated, whole, rtol=1e-4, atol=1e-5)
    assert not torch.equal(whole, head_after_one_epoch("smaller", batch_size=8))


def test_regions_without_training_images_keep_their_text_weights(data, regions, tmp_path):
    five = regions.iloc[:5].reset_index(drop=True)  # the fifth region has no images
    config = tiny_config("linear_probe", epochs=1)
    result = train(data.train, data.val, five, data.images, tmp_path, config, device="cpu", cache_dir=data.cache)
    state = load_checkpoint(result.last_checkpoint)["model"]
    initial = state["class_embeddings"] * load_checkpoint(result.last_checkpoint)["logit_scale"]
    assert torch.equal(state["head.weight"][4], initial[4])
    assert state["head.bias"][4] == 0
    assert not torch.equal(state["head.weight"][:4], initial[:4])


def test_early_stopping_and_resuming_a_finished_run(data, tmp_path):
    config = tiny_config("linear_probe", epochs=6, lr=1e-12, patience=2)  # nothing improves after epoch 1
    result = run_training(data, tmp_path, config)
    assert result.summary["stopped_early"] and result.summary["epochs_run"] == 3
    assert result.summary["best_epoch"] == 1
    again = run_training(data, tmp_path, config, resume=True)
    assert again.summary["epochs_run"] == 3


def test_unreadable_training_images_are_skipped_and_reported(data, tmp_path):
    (data.images / "broken.png").write_bytes(b"not a png at all")
    broken = data.train.iloc[[0]].assign(image_path="broken.png")
    train_set = pd.concat([data.train, broken], ignore_index=True)
    for strategy in ("partial", "linear_probe"):
        config = tiny_config(strategy, epochs=1)
        result = train(train_set, data.val, data.regions, data.images, tmp_path / strategy, config, device="cpu",
                       cache_dir=data.cache)
        skipped = result.summary["skipped_images"]
        assert [s["image_path"] for s in skipped] == ["broken.png"], skipped
        assert skipped[0]["reason"]
        assert result.summary["n_train"] == len(data.train)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"strategy": "lora-xl"}, "unknown strategy 'lora-xl'"),
        ({"epochs": 0}, "epochs must be an integer >= 1"),
        ({"lr": 0.0}, "lr must be a number > 0"),
        ({"lr": -1e-4}, "lr must be a number > 0"),
        ({"batch_size": 0}, "batch_size must be"),
        ({"unfreeze_blocks": 0}, "unfreeze_blocks must be"),
    ],
)
def test_bad_parameters_are_clear_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{"strategy": "partial", **changes})


def test_a_region_absent_from_the_region_file_is_an_error(data, tmp_path):
    bad = data.train.copy()
    bad.loc[3, "region_id"] = "atlantis"
    bad.to_csv(tmp_path / "train.csv", index=False)
    for manifest in (tmp_path / "train.csv", bad):
        with pytest.raises(ValueError, match="atlantis"):
            train(manifest, data.val, data.regions, data.images, tmp_path / "out", tiny_config("linear_probe"))
    assert not (tmp_path / "out" / "last.pt").exists()


def test_resume_refuses_a_missing_or_different_run(data, reference, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        run_training(data, tmp_path, tiny_config("linear_probe"), resume=True)
    finished = reference("linear_probe").out_dir
    with pytest.raises(CheckpointError, match="lr"):
        run_training(data, finished, tiny_config("linear_probe", lr=0.1), resume=True)


def test_checkpoints_load_safely_with_what_resuming_needs(reference):
    state = torch.load(reference("partial").last_checkpoint, weights_only=True)
    assert {"model", "optimizer", "scheduler", "epoch", "rng", "config", "region_ids"} <= set(state)
    assert state["config"]["strategy"] == "partial" and state["config"]["model_name"] == "lageo-tiny"
    # A randomly initialised base cannot be reloaded: the checkpoint holds the whole encoder.
    assert state["self_contained"] and "visual.conv1.weight" in state["model"]


@pytest.fixture(scope="module")
def local_weights(tmp_path_factory):
    """The tiny model's weights as a local checkpoint file: a base model that can be reloaded."""
    from lageo_utils.model import load_clip

    path = tmp_path_factory.mktemp("weights") / "lageo-tiny.pt"
    torch.save(load_clip("lageo-tiny", pretrained=None, device="cpu")[0].state_dict(), path)
    return path


def test_checkpoint_of_a_reloadable_base_holds_only_what_was_trained(data, local_weights, tmp_path):
    config = tiny_config("partial", pretrained=str(local_weights), epochs=1)
    result = run_training(data, tmp_path / "run", config)
    model_state = load_checkpoint(result.best_checkpoint)["model"]
    trained_blocks = {k.split(".")[3] for k in model_state if k.startswith("visual.transformer.resblocks.")}
    assert trained_blocks == {"1", "2"}  # the last two of three blocks
    assert {"visual.proj", "visual.ln_post.weight", "head.weight"} <= set(model_state)
    assert "visual.conv1.weight" not in model_state

    predictions = predict_val(load_finetuned(result.best_checkpoint, data.regions, "cpu"), data)
    assert predictions["correct"].mean() == pytest.approx(result.summary["best_val_acc"])

    local_weights_changed = tmp_path / "other.pt"
    state = torch.load(local_weights, weights_only=True)
    state["visual.conv1.weight"] += 1
    torch.save(state, local_weights_changed)
    config_file = load_checkpoint(result.best_checkpoint)
    config_file["config"]["pretrained"] = str(local_weights_changed)
    torch.save(config_file, tmp_path / "moved.pt")
    with pytest.raises(CheckpointError, match="not those this checkpoint was trained from"):
        load_finetuned(tmp_path / "moved.pt", data.regions, "cpu")


def predict_val(predictor, data) -> pd.DataFrame:
    from lageo_utils.predict import predict_manifest

    return predict_manifest(predictor, data.val, data.images, top_k=3)


@pytest.mark.parametrize("strategy", ["linear_probe", "contrastive"])
def test_finetuned_checkpoint_predicts_like_its_validation(data, reference, strategy):
    from lageo_utils.predict import load_predictor

    result = reference(strategy)
    predictor = load_finetuned(result.best_checkpoint, data.regions, "cpu")
    predictions = predict_val(predictor, data)
    assert predictions["correct"].mean() == pytest.approx(result.summary["best_val_acc"])
    gps, probs = predictor.predict(data.images / data.val["image_path"][0], top_k=2)
    assert len(gps) == len(probs) == 2 and probs[0] >= probs[1]

    via_zeroshot = load_predictor("lageo-tiny", None, data.regions, checkpoint=result.best_checkpoint, device="cpu")
    assert predict_val(via_zeroshot, data)["pred_region"].tolist() == predictions["pred_region"].tolist()

    reordered = data.regions.iloc[::-1].reset_index(drop=True)
    again = predict_val(load_finetuned(result.best_checkpoint, reordered, "cpu"), data)
    assert again["pred_region"].tolist() == predictions["pred_region"].tolist()


def test_finetuned_checkpoint_needs_its_regions(data, regions, reference):
    with pytest.raises(ValueError, match=r"regions \['[^']+', '[^']+'\] are not in the checkpoint"):
        load_finetuned(reference("linear_probe").best_checkpoint, regions.iloc[3:6], "cpu")


def cli(*args) -> int:
    from lageo_utils.cli import main

    return main(["train", *map(str, args)])


def test_cli_trains_resumes_and_writes_its_files(data, tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--splits", data.splits, "--image-root", data.images, "--model", "lageo-tiny", "--pretrained", "none",
              "--strategy", "linear_probe", "--out", out, "--lr", "0.5", "--batch-size", "16", "--seed", "3",
              "--num-workers", "0", "--cache-dir", data.cache, "--device", "cpu"]
    assert cli(*common, "--epochs", "1") == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["epochs_run"] == 1
    for name in ("best.pt", "last.pt", "history.csv", "train_summary.json"):
        assert (out / name).is_file()
    assert cli(*common, "--epochs", "2", "--resume") == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert (summary["epochs_run"], summary["resumed_from_epoch"], summary["seed"]) == (2, 1, 3)
    assert pd.read_csv(out / "history.csv")["epoch"].tolist() == [1, 2]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--strategy", "lora-xl"], "unknown strategy"),
        (["--epochs", "0"], "epochs must be"),
        (["--lr", "0"], "lr must be a number > 0"),
        (["--resume"], "nothing to resume"),
        (["--regions", "missing.geojson"], "region file not found"),
    ],
)
def test_cli_bad_parameters_exit_2(data, tmp_path, capsys, args, message):
    code = cli("--splits", data.splits, "--image-root", data.images, "--model", "lageo-tiny", "--pretrained", "none",
               "--out", tmp_path / "out", *args)
    assert code == 2
    assert message in capsys.readouterr().err


def test_cli_rejects_a_split_with_an_unknown_region(data, tmp_path, capsys):
    splits = tmp_path / "splits"
    splits.mkdir()
    data.train.assign(region_id="atlantis").to_csv(splits / "train.csv", index=False)
    data.val.to_csv(splits / "val.csv", index=False)
    code = cli("--splits", splits, "--image-root", data.images, "--model", "lageo-tiny", "--pretrained", "none",
               "--out", tmp_path / "out")
    assert code == 2
    assert "atlantis" in capsys.readouterr().err
