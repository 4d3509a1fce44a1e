"""Zero-shot geolocation: prompts, open_clip agreement, the seed's predict contract, tables and the CLI."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lageo_utils.cli import main
from lageo_utils.geo import haversine_km
from lageo_utils.images import ImageReadError
from lageo_utils.model import TINY_MODEL, load_clip
from lageo_utils.predict import GeoPredictor, load_finetuned, load_predictor, predict_manifest, predictions_from_probs
from lageo_utils.prompts import DEFAULT_TEMPLATE, encode_region_texts, region_prompts
from lageo_utils.training import TrainConfig, train

TABLE_COLUMNS = ["image_path", "latitude", "longitude", "true_region", "pred_region", "top_regions", "top_probs",
                 "confidence", "pred_lat", "pred_lon", "error_km", "correct"]
ENSEMBLE = [DEFAULT_TEMPLATE, "Street scene in {name}, Los Angeles County", "{description} ({name})"]


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return load_clip(TINY_MODEL, pretrained=None, device="cpu")


@pytest.fixture(scope="module")
def predictor(clip, regions):
    return GeoPredictor(*clip, regions, device="cpu", model_name=TINY_MODEL)


@pytest.fixture
def photos(tmp_path):
    rng = np.random.default_rng(7)
    paths = []
    for i in range(3):
        path = tmp_path / f"photo_{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_default_prompt_is_the_seeds(regions):
    prompts = region_prompts(regions)
    assert len(prompts) == len(regions) and all(len(p) == 1 for p in prompts)
    first = regions.iloc[0]
    assert prompts[0] == [f"A street view photo from {first['name']}, {first['description']}"]
    assert len(region_prompts(regions, ENSEMBLE)[3]) == 3
    with pytest.raises(ValueError, match="unknown field 'city'"):
        region_prompts(regions, ["{city}"])


def test_text_features_are_normalised_ensemble_means(clip, regions):
    model, _, tokenizer = clip
    single = encode_region_texts(model, tokenizer, regions)
    assert single.shape == (len(regions), 64) and single.dtype == torch.float32
    torch.testing.assert_close(single.norm(dim=-1), torch.ones(len(regions)))

    ensemble = encode_region_texts(model, tokenizer, regions, ENSEMBLE)
    per_template = [encode_region_texts(model, tokenizer, regions, [t]) for t in ENSEMBLE]
    torch.testing.assert_close(ensemble, F.normalize(torch.stack(per_template).mean(dim=0), dim=-1))
    assert not torch.allclose(ensemble, single)


def test_logits_equal_open_clips_zero_shot_classifier(clip, regions, photos):
    model, preprocess, tokenizer = clip
    names = list(zip(regions["name"], regions["description"]))
    templates = [lambda r, t=t: t.format(name=r[0], description=r[1]) for t in ENSEMBLE]
    classifier = open_clip.build_zero_shot_classifier(model, tokenizer, names, templates, device="cpu")
    predictor = GeoPredictor(model, preprocess, tokenizer, regions, templates=ENSEMBLE, device="cpu")

    images = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in photos])
    with torch.no_grad():
        features = F.normalize(model.encode_image(images), dim=-1)
        expected = model.logit_scale.exp() * features @ classifier
    torch.testing.assert_close(predictor.logits(features), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(predictor.logits(features * 3.0), expected, rtol=1e-5, atol=1e-5)


def test_predict_follows_the_seed_contract(predictor, regions, photos):
    n = len(regions)
    gps, probs = predictor.predict(photos[0], top_k=5)
    assert len(gps) == len(probs) == 5
    assert all(isinstance(p, tuple) and len(p) == 2 for p in gps) and all(isinstance(p, float) for p in probs)
    assert probs == sorted(probs, reverse=True)

    all_gps, all_probs = predictor.predict(photos[0], top_k=n + 10)
    assert len(all_probs) == n and sum(all_probs) == pytest.approx(1.0)
    assert all_gps[:5] == gps and all_probs[:5] == pytest.approx(probs)
    centroids = set(zip(regions["centroid_lat"], regions["centroid_lon"]))
    assert set(all_gps) == centroids

    # the same image given as a PIL image (any mode) gives the same answer
    assert predictor.predict(Image.open(photos[0]).convert("RGBA"), top_k=5) == (gps, probs)
    with pytest.raises(ValueError, match="top_k"):
        predictor.predict(photos[0], top_k=0)
    with pytest.raises(ImageReadError, match="file not found"):
        predictor.predict(photos[0].with_name("absent.jpg"))


def test_predictions_are_reproducible_with_a_seed(predictor, regions, photos):
    torch.manual_seed(0)
    again = GeoPredictor(*load_clip(TINY_MODEL, pretrained=None, device="cpu"), regions, device="cpu")
    assert again.predict(photos[1]) == predictor.predict(photos[1])


def test_unscaled_softmax_reproduces_the_seed(clip, regions, predictor, photos):
    seed_style = GeoPredictor(*clip, regions, device="cpu", scale="none")
    features = predictor.embed_image(photos[0])
    cosines = (features @ predictor.text_features.T).double()
    np.testing.assert_allclose(seed_style.probabilities(features), cosines.softmax(dim=-1).numpy(), rtol=1e-6)
    learned = predictor.probabilities(features)
    scale = float(clip[0].logit_scale.detach().exp())
    np.testing.assert_allclose(learned, (scale * cosines).softmax(dim=-1).numpy(), rtol=1e-5)
    assert seed_style.probabilities(features).max() < learned.max()  # unscaled is flatter
    with pytest.raises(ValueError, match="scale must be one of"):
        GeoPredictor(*clip, regions, device="cpu", scale="sharp")


def test_predict_embeddings_accepts_numpy(predictor, photos):
    features = torch.cat([predictor.embed_image(p) for p in photos])
    top_idx, top_prob = predictor.predict_embeddings(features.numpy(), top_k=3)
    assert top_idx.shape == top_prob.shape == (3, 3)
    probs = predictor.probabilities(features)
    np.testing.assert_array_equal(top_idx, np.argsort(-probs, axis=1, kind="stable")[:, :3])
    np.testing.assert_allclose(top_prob[1], predictor.predict(photos[1], top_k=3)[1], rtol=1e-5)  # float32, batch vs single


def test_predictions_table_from_probabilities(regions):
    ids = regions["id"].tolist()
    rows = pd.DataFrame({
        "image_path": ["a.jpg", "b.jpg"],
        "latitude": [34.05, 33.77],
        "longitude": [-118.25, -118.19],
        "region_id": [ids[0], ids[1]],
        "location_id": ["loc-a", "loc-b"],
        "heading": [0, 90],
    }, index=[10, 11])
    probs = np.full((2, len(ids)), 0.01)
    probs[0, 0], probs[0, 2] = 0.6, 0.2
    probs[1, 4], probs[1, 1] = 0.5, 0.3

    table = predictions_from_probs(rows, probs, regions, top_k=3)

    assert list(table.columns) == [*TABLE_COLUMNS, "location_id", "heading"]
    assert table["pred_region"].tolist() == [ids[0], ids[4]]
    assert table["top_regions"].tolist()[0] == [ids[0], ids[2], ids[1]]  # ties broken by class order
    assert table["top_probs"].tolist()[1] == pytest.approx([0.5, 0.3, 0.01])
    assert table["confidence"].tolist() == pytest.approx([0.6, 0.5])
    assert table["correct"].tolist() == [True, False]
    assert table["pred_lat"].tolist() == [regions["centroid_lat"][0], regions["centroid_lat"][4]]
    expected_km = haversine_km(33.77, -118.19, regions["centroid_lat"][4], regions["centroid_lon"][4])
    assert table["error_km"][1] == pytest.approx(float(expected_km))
    assert table["location_id"].tolist() == ["loc-a", "loc-b"]

    unlabelled = predictions_from_probs(rows.drop(columns=["region_id"]), probs, regions)
    assert unlabelled["true_region"].tolist()[0] is not None  # assigned from the coordinates
    with pytest.raises(ValueError, match=r"expected \(2 images, 15 regions\)"):
        predictions_from_probs(rows, probs[:, :3], regions)


def test_predict_manifest_reports_unreadable_images(predictor, regions, photos, tmp_path):
    (tmp_path / "broken.jpg").write_bytes(photos[0].read_bytes()[:200])
    centre = regions.iloc[2]
    manifest = pd.DataFrame({
        "image_path": [photos[0].name, "broken.jpg", photos[1].name, photos[2].name],
        "latitude": centre["centroid_lat"],
        "longitude": centre["centroid_lon"],
        "region_id": centre["id"],
    })

    table = predict_manifest(predictor, manifest, tmp_path, batch_size=2, top_k=3, cache_dir=tmp_path / "cache")

    assert list(table.columns) == [*TABLE_COLUMNS, "confidence_uncalibrated"]  # through the embedding pipeline
    assert table["image_path"].tolist() == [photos[0].name, photos[1].name, photos[2].name]
    assert [f["image_path"] for f in table.attrs["failures"]] == ["broken.jpg"]
    assert "truncated" in table.attrs["failures"][0]["reason"]
    gps, probs = predictor.predict(photos[1], top_k=3)
    assert table["top_probs"][1] == pytest.approx(probs, abs=1e-6)
    assert (table["pred_lat"][1], table["pred_lon"][1]) == gps[0]
    assert table["correct"].tolist() == (table["pred_region"] == centre["id"]).tolist()
    assert (table["error_km"] == 0).tolist() == table["correct"].tolist()  # truth at the centroid

    table.to_parquet(tmp_path / "predictions.parquet")
    stored = pd.read_parquet(tmp_path / "predictions.parquet")
    assert stored.attrs["failures"] == table.attrs["failures"]
    assert stored["top_regions"].map(list).tolist() == table["top_regions"].tolist()


def test_load_predictor_zero_shot(regions):
    predictor = load_predictor(TINY_MODEL, "none", regions, device="cpu", templates=ENSEMBLE)
    assert isinstance(predictor, GeoPredictor)
    assert predictor.region_ids == regions["id"].tolist() and predictor.templates == ENSEMBLE
    with pytest.raises(ValueError, match="come from the checkpoint"):  # never silently ignored
        load_predictor(TINY_MODEL, "none", regions, checkpoint="best.pt", templates=ENSEMBLE)


def _cli(capsys, *args) -> tuple[int, object, str]:
    code = main(["predict", *map(str, args)])
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if captured.out.strip() else None, captured.err


def test_cli_prints_one_object_per_image(capsys, photos, tmp_path):
    (tmp_path / "notes.jpg").write_text("hello")
    code, out, _ = _cli(capsys, photos[0], tmp_path / "notes.jpg", photos[1], "--model", TINY_MODEL,
                     "--pretrained", "none", "--top-k", "3")
    assert code == 0
    assert [o["image"] for o in out] == [str(photos[0]), str(tmp_path / "notes.jpg"), str(photos[1])]
    assert out[1] == {"image": str(tmp_path / "notes.jpg"), "error": "not an image (unrecognised format)"}
    for item in (out[0], out[2]):
        assert set(item) == {"image", "top_regions", "top_pred_gps", "top_pred_prob"}
        assert len(item["top_regions"]) == len(item["top_pred_gps"]) == len(item["top_pred_prob"]) == 3
        assert item["top_pred_prob"] == sorted(item["top_pred_prob"], reverse=True)


def test_cli_exit_codes(capsys, photos, tmp_path):
    code, out, _ = _cli(capsys, tmp_path / "absent.jpg", "--model", TINY_MODEL, "--pretrained", "none")
    assert code == 1 and out == [{"image": str(tmp_path / "absent.jpg"), "error": "file not found"}]

    code, out, err = _cli(capsys, photos[0], "--pretrained", tmp_path / "no_weights.pt")
    assert code == 2 and out is None
    assert "no_weights.pt" in err and "LAGEO_CLIP_WEIGHTS" in err

    code, out, err = _cli(capsys, photos[0], "--model", TINY_MODEL, "--pretrained", "none", "--top-k", "0")
    assert code == 2 and out is None and "--top-k must be at least 1" in err


def test_cli_predicts_with_a_finetuned_checkpoint(capsys, regions, photos, tmp_path):
    four = regions.iloc[:4].reset_index(drop=True)
    manifest = pd.DataFrame({"image_path": [p.name for p in photos] * 2,
                             "latitude": np.repeat(four["centroid_lat"].to_numpy()[:3], 2),
                             "longitude": np.repeat(four["centroid_lon"].to_numpy()[:3], 2),
                             "region_id": np.repeat(four["id"].to_numpy()[:3], 2)})
    config = TrainConfig(strategy="linear_probe", model_name=TINY_MODEL, pretrained=None, epochs=1, lr=0.5,
                         batch_size=4, num_workers=0)
    train(manifest, manifest, four, photos[0].parent, tmp_path / "run", config, device="cpu")
    best = tmp_path / "run" / "best.pt"
    regions_file = tmp_path / "four.geojson"
    four.to_file(regions_file, driver="GeoJSON")

    code, out, _ = _cli(capsys, photos[0], "--checkpoint", best, "--regions", regions_file, "--top-k", "2")

    assert code == 0
    expected_gps, expected_probs = load_finetuned(best, four, device="cpu").predict(photos[0], top_k=2)
    assert out[0]["top_pred_gps"] == [list(g) for g in expected_gps]
    assert out[0]["top_pred_prob"] == pytest.approx(expected_probs)
    assert set(out[0]["top_regions"]) <= set(four["id"])


def test_a_region_without_a_field_the_template_needs_is_named(regions):
    from lageo_utils.regions import RegionsError

    broken = regions.copy()
    broken.loc[2, "description"] = ""
    with pytest.raises(RegionsError, match=rf"region '{broken.loc[2, 'id']}' has no 'description', which the prompt"):
        region_prompts(broken)
    assert len(region_prompts(broken, ["A street in {name}"])) == len(broken)  # a template without it is fine


def test_prompt_controls_load_and_refuse_a_descriptor_that_names_a_region(regions, reference_dir, tmp_path):
    import json

    from lageo_utils.prompts import PROMPT_VARIANTS, load_prompt_controls
    from lageo_utils.regions import RegionsError

    ours = load_prompt_controls(None, regions)
    assert list(ours) == regions["id"].tolist()
    authors_eight = regions[regions["id"].isin(json.loads((reference_dir / "prompt_controls.json").read_text())
                                               ["visual_descriptors"])]
    assert len(load_prompt_controls(reference_dir / "prompt_controls.json", authors_eight)) == 8
    with pytest.raises(RegionsError, match=r"no visual descriptor for regions \['malibu'"):
        load_prompt_controls(reference_dir / "prompt_controls.json", regions)

    for leak, name in (("palm trees near the Santa Monica pier", "Santa Monica"), ("views of griffith park", "griffith park"),
                       ("the observatory dome", "observatory")):
        doc = {"visual_descriptors": {**ours, "hollywood": leak}}
        (tmp_path / "leak.json").write_text(json.dumps(doc))
        with pytest.raises(RegionsError, match=rf"descriptor of region 'hollywood' contains the region name '{name}'"):
            load_prompt_controls(tmp_path / "leak.json", regions)

    visual = region_prompts(regions, PROMPT_VARIANTS["visual"], ours)
    assert all(name.lower() not in prompt[0].lower() for name, prompt in zip(regions["name"], visual))
    with pytest.raises(RegionsError, match="has no 'visual'"):
        region_prompts(regions, PROMPT_VARIANTS["visual"])  # the visual variant needs the descriptors
