"""GeoCLIP as a peer method: the LA gallery, answers like GeoCLIP's predict, metrics, fine-tuning, weights.

A tiny random transformers CLIP backbone (768-d projected features, as GeoCLIP's image head
takes) stands in for ViT-L/14; the image head, location encoder and logit scale are the real
weights shipped in the geoclip package.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

pytest.importorskip("geoclip", reason="the optional 'peers' extra is not installed: pip install -e '.[peers]'")

from transformers import (  # after the skip: part of the extra
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from lageo_utils.checkpoints import CheckpointError, load_checkpoint
from lageo_utils.coordinate_metrics import coordinate_summary
from lageo_utils.geo import haversine_km, nearest_km
from lageo_utils.model import WeightsUnavailableError
from lageo_utils.peers import geoclip as gc

IMAGE_SIZE = 32
SPACING_M = 1500.0
TRAIN_COORDS = [(34.0561, -118.2468), (34.0561, -118.2468), (34.1017, -118.3406)]  # a duplicate on purpose


def tiny_clip(seed: int = 0) -> CLIPModel:
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": 99, "max_position_embeddings": 16},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": IMAGE_SIZE, "patch_size": 8},
        projection_dim=gc.IMAGE_FEATURE_DIM,
    )
    return CLIPModel(config).eval()


@pytest.fixture(scope="module")
def model() -> gc.GeoclipModel:
    return gc.load_geoclip(tiny_clip(), device="cpu")


@pytest.fixture(scope="module")
def gallery(regions) -> pd.DataFrame:
    lat, lon = zip(*TRAIN_COORDS)
    return gc.la_gps_gallery(regions, SPACING_M, lat, lon)


def save_png(path, rgb, noise: float = 0.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.asarray(rgb, float) + rng.normal(0, noise, (40, 40, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def photos(tmp_path_factory, regions) -> tuple[pd.DataFrame, object]:
    """Eight test photos at region centroids (two headings per capture point) and one unreadable file."""
    root = tmp_path_factory.mktemp("photos")
    rows = []
    for i in range(8):
        save_png(root / f"p{i}.png", (30 * i, 200 - 20 * i, 90), noise=20, seed=i)
        r = regions.iloc[i // 2]
        rows.append({"image_path": f"p{i}.png", "latitude": r.centroid_lat, "longitude": r.centroid_lon,
                     "region_id": r.id, "location_id": f"loc{i // 2}"})
    (root / "broken.png").write_bytes(b"not an image")
    rows.append({"image_path": "broken.png", "latitude": 34.0, "longitude": -118.3, "region_id": regions.iloc[0].id,
                 "location_id": "loc9"})
    return pd.DataFrame(rows), root


# -- the LA gallery -----------------------------------------------------------------------------


def test_la_gallery_covers_the_boxes_at_the_spacing_and_holds_the_training_coordinates(regions, gallery):
    grid = gallery[gallery["source"] == "grid"]
    # every point of every box lies within spacing / sqrt(2) of the gallery
    rng = np.random.default_rng(0)
    bounds = regions.geometry.bounds.to_numpy()  # west, south, east, north
    pick = bounds[rng.integers(0, len(bounds), 4000)]
    lat = pick[:, 1] + rng.random(4000) * (pick[:, 3] - pick[:, 1])
    lon = pick[:, 0] + rng.random(4000) * (pick[:, 2] - pick[:, 0])
    corners_lat, corners_lon = np.r_[bounds[:, 1], bounds[:, 3]], np.r_[bounds[:, 0], bounds[:, 2]]
    distance, _ = nearest_km(np.r_[lat, corners_lat], np.r_[lon, corners_lon], grid["latitude"], grid["longitude"])
    assert distance.max() * 1000 <= SPACING_M / math.sqrt(2) * 1.01
    # a regular grid at the spacing: each point's nearest other grid point is one spacing away
    coords = np.radians(grid[["latitude", "longitude"]].to_numpy())
    from sklearn.neighbors import BallTree

    step = BallTree(coords, metric="haversine").query(coords, k=2)[0][:, 1] * 6371008.8
    assert np.allclose(step, SPACING_M, rtol=0.01)
    # and reaches no further than spacing / sqrt(2) beyond the boxes (distance to a box: to its clamped point)
    g_lat, g_lon = grid["latitude"].to_numpy()[:, None], grid["longitude"].to_numpy()[:, None]
    to_box = haversine_km(g_lat, g_lon, np.clip(g_lat, bounds[:, 1], bounds[:, 3]),
                          np.clip(g_lon, bounds[:, 0], bounds[:, 2])).min(axis=1)
    assert to_box.max() * 1000 <= SPACING_M / math.sqrt(2) * 1.01
    # the training coordinates are in it, once each
    train = gallery[gallery["source"] == "train"]
    assert sorted(zip(train["latitude"], train["longitude"])) == sorted(set(TRAIN_COORDS))
    assert not gallery.duplicated(["latitude", "longitude"]).any()


def test_la_gallery_rejects_bad_input(regions):
    with pytest.raises(ValueError, match="spacing"):
        gc.la_gps_gallery(regions, 0)
    with pytest.raises(ValueError, match="row 1"):
        gc.la_gps_gallery(regions, 5000, [34.0, float("nan")], [-118.2, -118.3])


# -- answers ------------------------------------------------------------------------------------


def test_predictions_lie_in_the_gallery_with_descending_probabilities(model, gallery, photos, tmp_path):
    rows, root = photos
    found = gc.predict_geoclip(model, rows["image_path"].tolist(), gallery, top_k=5, root=root,
                               cache_dir=tmp_path / "cache", num_workers=0)
    assert found.rows.tolist() == list(range(8))
    assert found.failures["image_path"].tolist() == ["broken.png"]
    points = set(zip(gallery["latitude"], gallery["longitude"]))
    assert set(zip(found.answers.lat, found.answers.lon)) <= points
    assert set(zip(found.top_lat.ravel(), found.top_lon.ravel())) <= points
    assert found.top_prob.shape == (8, 5)
    assert np.all(np.diff(found.top_prob, axis=1) <= 0)
    assert np.all(found.top_prob.sum(axis=1) <= 1 + 1e-6) and np.all(found.top_prob > 0)
    assert np.array_equal(found.answers.confidence, found.top_prob[:, 0])
    assert np.array_equal(found.answers.lat, found.top_lat[:, 0])
    # different photos get different answers from the shipped weights (the model is not constant)
    assert len(set(map(tuple, found.top_prob.round(6)))) > 1
    # the second call reads the features from the cache, with the same answers
    again = gc.predict_geoclip(model, rows["image_path"].tolist(), gallery, top_k=5, root=root,
                               cache_dir=tmp_path / "cache", num_workers=0)
    assert np.array_equal(again.top_prob, found.top_prob)
    # voting by capture point: the two headings of a point get one answer
    voted = gc.predict_geoclip(model, rows["image_path"].tolist(), gallery, top_k=3, root=root,
                               location_ids=rows["location_id"].tolist(), cache_dir=tmp_path / "cache", num_workers=0)
    assert np.array_equal(voted.answers.lat[0::2], voted.answers.lat[1::2])


def test_answers_in_blocks_equal_answers_at_once(model, gallery, monkeypatch):
    features = np.random.default_rng(0).normal(0, 5, (7, gc.IMAGE_FEATURE_DIM)).astype(np.float32)
    whole, *whole_top = gc.answer_features(model, features, gallery, top_k=3)
    monkeypatch.setattr(gc, "_SIMILARITY_BLOCK", 2 * len(gallery))  # two images per block
    blocks, *block_top = gc.answer_features(model, features, gallery, top_k=3)
    assert np.array_equal(blocks.neighbours, whole.neighbours)
    assert np.allclose(block_top[2], whole_top[2], atol=1e-6)


def test_answers_match_geoclips_own_predict(model, gallery, photos, monkeypatch):
    """GeoCLIP's own class, built on the same tiny backbone and given the LA gallery, answers the same."""
    import geoclip
    from geoclip.model import image_encoder

    rows, root = photos
    monkeypatch.setattr(image_encoder.CLIPModel, "from_pretrained", classmethod(lambda cls, path: model.backbone))
    monkeypatch.setattr(image_encoder, "AutoProcessor", type("P", (), {
        "from_pretrained": staticmethod(lambda path: model.processor)}))
    theirs = geoclip.GeoCLIP(from_pretrained=True, clip_path="tiny").eval()
    theirs.gps_gallery = torch.tensor(gallery[["latitude", "longitude"]].to_numpy(), dtype=torch.float32)
    ours = gc.predict_geoclip(model, rows["image_path"].tolist()[:3], gallery, top_k=4, root=root, num_workers=0)
    for i, path in enumerate(rows["image_path"].tolist()[:3]):
        gps, prob = theirs.predict(str(root / path), top_k=4)
        assert np.allclose(prob.numpy(), ours.top_prob[i], rtol=1e-4, atol=1e-7)
        assert np.allclose(gps.numpy(), np.c_[ours.top_lat[i], ours.top_lon[i]], atol=1e-4)


def test_predictions_table_feeds_the_coordinate_metrics(model, gallery, photos):
    rows, root = photos
    found = gc.predict_geoclip(model, rows["image_path"].tolist(), gallery, top_k=3, root=root, num_workers=0)
    table = gc.predictions_table(rows, found)
    assert table["image_path"].tolist() == rows["image_path"].tolist()[:8]
    assert (table["method"] == gc.METHOD).all()
    expected = haversine_km(rows["latitude"][:8], rows["longitude"][:8], found.answers.lat, found.answers.lon)
    assert np.allclose(table["error_km"], expected)
    assert table["top_k_prob"].map(len).eq(3).all()
    summary = coordinate_summary(table, n_boot=50)
    assert summary["n_images"] == 8
    assert summary["median_error_km"] == pytest.approx(float(np.median(expected)))
    lo, hi = summary["median_error_km_ci95"]
    assert lo <= summary["median_error_km"] <= hi


def test_load_from_a_local_folder_and_the_width_check(tmp_path):
    """A saved whole CLIP model (as the hub's openai/clip-vit-large-patch14) loads as its image tower and projection."""
    clip = tiny_clip(seed=1)
    clip.save_pretrained(tmp_path / "backbone")
    gc.default_processor(clip).save_pretrained(tmp_path / "backbone")
    loaded = gc.load_geoclip(tmp_path / "backbone", device="cpu")
    assert isinstance(loaded.backbone, CLIPVisionModelWithProjection)
    assert isinstance(loaded.processor, CLIPImageProcessor)
    pixels = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        expected = gc.GeoclipModel(clip, loaded.processor, "clip").backbone_features(pixels)
        assert expected.shape == (2, gc.IMAGE_FEATURE_DIM)
        assert torch.allclose(loaded.backbone_features(pixels), expected, atol=1e-5)
    narrow = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=IMAGE_SIZE,
        patch_size=8, projection_dim=512))
    with pytest.raises(ValueError, match="768-d"):
        gc.load_geoclip(narrow, device="cpu")


def test_a_folder_without_the_image_projection_is_refused_not_filled_with_random_weights(tmp_path):
    """A vision tower saved without its projection would load with a random one: load_geoclip refuses it."""
    from transformers import CLIPVisionModel

    tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=8))
    tower.save_pretrained(tmp_path / "no-projection")
    gc.default_processor(tower).save_pretrained(tmp_path / "no-projection")
    with pytest.raises(WeightsUnavailableError, match=r"lacks 1 weight\(s\) of the image tower \(e.g. "
                                                      r"visual_projection.weight\)"):
        gc.load_geoclip(tmp_path / "no-projection", device="cpu")


# -- missing pieces -----------------------------------------------------------------------------


def test_missing_backbone_weights_give_the_two_fixes_at_once(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv(gc.BACKBONE_ENV, raising=False)
    for backbone in (None, tmp_path / "no-such-folder"):
        with pytest.raises(WeightsUnavailableError) as caught:
            gc.load_geoclip(backbone, cache_dir=tmp_path / "empty-hf-cache", device="cpu")
        message = str(caught.value)
        assert "1. run once with internet access" in message and "2. pass a local transformers folder" in message
        assert gc.BACKBONE_ENV in message
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(WeightsUnavailableError, match="lacks preprocessor_config.json, model.safetensors"):
        gc.check_geoclip_weights(tmp_path / "half")
    monkeypatch.chdir(tmp_path)  # a relative folder that does not exist reads as a hub id; the message says both
    with pytest.raises(WeightsUnavailableError, match=f"as a hub id, since no folder {tmp_path / 'models' / 'clip'} exists"):
        gc.check_geoclip_weights("models/clip", cache_dir=tmp_path / "empty-hf-cache")


def test_without_the_extra_the_message_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "geoclip", None)  # makes `import geoclip` fail
    with pytest.raises(gc.PeersUnavailableError, match=r"pip install -e '\.\[peers\]'"):
        gc.load_geoclip(tiny_clip(), device="cpu")


# -- fine-tuning --------------------------------------------------------------------------------

N_PLACES, TRAIN_PER_PLACE, VAL_PER_PLACE = 8, 4, 2


@pytest.fixture(scope="module")
def learnable(tmp_path_factory, regions) -> tuple[pd.DataFrame, pd.DataFrame, object]:
    """Photos whose colour encodes their place: each of 8 places (region centroids) has its own colour
    (a corner of the RGB cube), with pixel noise."""
    root = tmp_path_factory.mktemp("learnable")
    colours = [(r, g, b) for r in (20, 235) for g in (20, 235) for b in (20, 235)]
    splits: dict[str, list] = {"train": [], "val": []}
    for place in range(N_PLACES):
        r = regions.iloc[place]
        for k in range(TRAIN_PER_PLACE + VAL_PER_PLACE):
            split = "train" if k < TRAIN_PER_PLACE else "val"
            name = f"{split}-{place}-{k}.png"
            save_png(root / name, colours[place], noise=6, seed=100 * place + k)
            splits[split].append({"image_path": name, "latitude": r.centroid_lat, "longitude": r.centroid_lon})
    return pd.DataFrame(splits["train"]), pd.DataFrame(splits["val"]), root


CONFIG = gc.GeoclipTrainConfig(epochs=3, batch_size=16, learning_rate=2e-4, queue_size=16, seed=0)


@pytest.fixture(scope="module")
def finetuned(model, learnable, gallery, tmp_path_factory):
    train_rows, val_rows, root = learnable
    out = tmp_path_factory.mktemp("finetuned")
    result = gc.finetune_geoclip(model, train_rows, val_rows, out, CONFIG, root=root, gallery=gallery, device="cpu",
                                 num_workers=0, cache_dir=out.parent / "shared-feature-cache")
    return result


def test_finetuning_lowers_validation_loss(finetuned):
    history = finetuned.history
    assert history["epoch"].tolist() == list(range(CONFIG.epochs + 1))
    assert history["val_loss"].iloc[-1] < 0.7 * history["val_loss"].iloc[0]
    assert history["val_median_error_km"].iloc[-1] < 0.5 * history["val_median_error_km"].iloc[0]
    assert finetuned.summary["best_val_loss"] == history["val_loss"].min()
    assert finetuned.summary["best_epoch"] == int(history["val_loss"].idxmin())
    assert finetuned.summary["shipped_val_loss"] == history["val_loss"].iloc[0]
    assert json.loads((finetuned.out_dir / gc.SUMMARY).read_text())["n_train"] == N_PLACES * TRAIN_PER_PLACE
    assert pd.read_csv(finetuned.out_dir / gc.HISTORY).columns.tolist() == gc.HISTORY_COLUMNS


def test_checkpoint_reloads_to_the_measured_predictions(model, finetuned, learnable, gallery):
    train_rows, val_rows, root = learnable
    tuned = gc.load_finetuned(model, finetuned.best_checkpoint)
    assert not torch.equal(tuned.image_head[0].weight, model.image_head[0].weight)  # the shipped model is untouched
    found = gc.predict_geoclip(tuned, val_rows["image_path"].tolist(), gallery, top_k=1, root=root, num_workers=0,
                               method=gc.FINETUNED_METHOD)
    errors = haversine_km(val_rows["latitude"], val_rows["longitude"], found.answers.lat, found.answers.lon)
    best = finetuned.summary["best_epoch"]
    assert float(np.median(errors)) == pytest.approx(finetuned.history["val_median_error_km"][best], abs=1e-9)
    features = torch.as_tensor(gc.backbone_features(tuned, val_rows["image_path"].tolist(), root=root,
                                                    num_workers=0).features)
    coords = torch.tensor(val_rows[["latitude", "longitude"]].to_numpy(), dtype=torch.float32)
    assert gc.validation_loss(tuned, features, coords) == pytest.approx(finetuned.summary["best_val_loss"], rel=1e-6)
    again = gc.predict_geoclip(gc.load_finetuned(model, finetuned.best_checkpoint), val_rows["image_path"].tolist(),
                               gallery, top_k=1, root=root, num_workers=0)
    assert np.array_equal(again.top_prob, found.top_prob)


def test_an_interrupted_run_resumes_to_the_same_result(model, finetuned, learnable, gallery, tmp_path):
    train_rows, val_rows, root = learnable

    def stop(epoch: int, batch: int) -> None:
        if (epoch, batch) == (3, 1):  # in the last epoch
            raise KeyboardInterrupt

    kw = {"root": root, "gallery": gallery, "device": "cpu", "num_workers": 0,
          "cache_dir": finetuned.out_dir.parent / "shared-feature-cache"}
    with pytest.raises(KeyboardInterrupt):
        gc.finetune_geoclip(model, train_rows, val_rows, tmp_path, CONFIG, on_step=stop, **kw)
    assert load_checkpoint(tmp_path / gc.LAST)["epoch"] == 2
    resumed = gc.finetune_geoclip(model, train_rows, val_rows, tmp_path, CONFIG, resume=True, **kw)
    assert resumed.summary["resumed_from_epoch"] == 2
    columns = ["epoch", "train_loss", "val_loss", "val_median_error_km", "lr"]
    pd.testing.assert_frame_equal(resumed.history[columns], finetuned.history[columns])
    ours, theirs = load_checkpoint(resumed.best_checkpoint), load_checkpoint(finetuned.best_checkpoint)
    for key in ("image_head", "location_encoder"):
        assert all(torch.equal(ours[key][k], theirs[key][k]) for k in theirs[key])
    # other settings than epochs refuse to resume
    with pytest.raises(CheckpointError, match="learning_rate"):
        gc.finetune_geoclip(model, train_rows, val_rows, tmp_path,
                            gc.GeoclipTrainConfig(epochs=3, batch_size=16, learning_rate=3e-4, queue_size=16),
                            resume=True, **kw)


def test_bad_training_rows_are_named(model, learnable, tmp_path):
    train_rows, val_rows, root = learnable
    broken = train_rows.copy()
    broken.loc[1, "latitude"] = float("nan")
    with pytest.raises(ValueError, match=r"train row 1 \(train-0-1.png\) has an invalid coordinate"):
        gc.finetune_geoclip(model, broken, val_rows, tmp_path, CONFIG, root=root, device="cpu")
    with pytest.raises(ValueError, match=r"val rows lack column\(s\) \['longitude'\]"):
        gc.finetune_geoclip(model, train_rows, val_rows.drop(columns="longitude"), tmp_path, CONFIG, root=root,
                            device="cpu")


def test_the_loss_masks_a_capture_points_own_coordinates(model):
    torch.manual_seed(0)
    features = torch.randn(3, gc.IMAGE_FEATURE_DIM)
    coords = torch.tensor([[34.05, -118.25], [34.05, -118.25], [34.10, -118.30]])  # images 0 and 1: one capture point
    with torch.no_grad():
        loss = gc.contrastive_loss(model, features, coords, queue=coords[:1])
        s = model.logit_scale.exp() * model.image_embeddings(features) @ model.location_embeddings(coords).T
    # images 0 and 1 do not count each other (nor the queued copy of their place) as negatives; image 2 counts all four
    expected = (-torch.log_softmax(torch.stack([s[0, 0], s[0, 2]]), 0)[0]
                - torch.log_softmax(torch.stack([s[1, 1], s[1, 2]]), 0)[0]
                - torch.log_softmax(torch.stack([s[2, 2], s[2, 0], s[2, 1], s[2, 0]]), 0)[0]) / 3
    assert loss.item() == pytest.approx(expected.item(), abs=1e-3)  # float32 location features batched differently
