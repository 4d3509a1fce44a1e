"""Cue-removal probing: the transforms do what they say, intervened embeddings are cached apart, the analysis
finds the cue a constructed data set hides in the sky."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from lageo_utils import probing
from lageo_utils.embed import embed_paths
from lageo_utils.model import TINY_MODEL, load_clip
from lageo_utils.predict import GeoPredictor, predictions_from_probs
from lageo_utils.probing import (
    FILL,
    INTERVENTIONS,
    InterventionPreprocess,
    intervention_drops,
    intervention_regression,
    intervention_thumbnails,
    make_intervention,
    probe_model,
    probing_json,
    region_drop_heatmap,
    region_drops,
    resolve_interventions,
)

needs_tesseract = pytest.mark.skipif(not probing.tesseract_available(),
                                     reason="the tesseract program is not installed (apt-get install tesseract-ocr)")
PLAIN = ["grayscale", "blur", "sky_mask", "ground_mask", "center_occlude", "hflip"]


def noise_image(width: int = 60, height: int = 45, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_clip(TINY_MODEL, pretrained=None, device="cpu")  # model, preprocess, tokenizer


# -- the transforms ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "rows", "cols"), [
    ("sky_mask", slice(0, 15), slice(None)),  # a third of 45 rows
    ("ground_mask", slice(30, 45), slice(None)),
    ("center_occlude", slice(11, 33), slice(15, 45)),  # half of 60 x 45, centred (22.5 rows round to 22)
])
def test_masks_fill_their_band_uniformly_and_leave_the_rest(name, rows, cols):
    image = noise_image()
    before = np.asarray(image).copy()
    out = np.asarray(make_intervention(name)(image))
    assert out.shape == before.shape
    assert (out[rows, cols] == FILL).all()
    untouched = np.ones(before.shape[:2], dtype=bool)
    untouched[rows, cols] = False
    np.testing.assert_array_equal(out[untouched], before[untouched])
    np.testing.assert_array_equal(np.asarray(image), before)  # the input is not modified


def test_mask_settings_are_checked_and_change_the_band():
    out = np.asarray(make_intervention("sky_mask", fraction=0.5, fill=(0, 0, 0))(noise_image()))
    assert (out[:22] == 0).all() and (out[23:] != 0).any()
    with pytest.raises(ValueError, match="fraction"):
        make_intervention("ground_mask", fraction=1.5)
    with pytest.raises(ValueError, match="fill"):
        make_intervention("center_occlude", fill=(300, 0, 0))


def test_grayscale_has_equal_channels_and_keeps_luminance():
    image = noise_image()
    out = np.asarray(make_intervention("grayscale")(image)).astype(int)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    luma = np.asarray(image).astype(float) @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose(out[..., 0], luma, atol=1)


def high_frequency_energy(image: Image.Image) -> float:
    """Energy of the spectrum outside the lowest quarter of frequencies."""
    gray = np.asarray(image.convert("L"), dtype=float)
    spectrum = np.abs(np.fft.fftshift(np.fft.fft2(gray - gray.mean()))) ** 2
    h, w = gray.shape
    yy, xx = np.mgrid[:h, :w]
    high = (np.abs(yy - h // 2) > h / 8) | (np.abs(xx - w // 2) > w / 8)
    return float(spectrum[high].sum())


def test_blur_lowers_high_frequency_energy_more_with_a_larger_sigma():
    image = noise_image(224, 224)
    energies = [high_frequency_energy(image)] + [high_frequency_energy(make_intervention("blur", sigma=s)(image))
                                                 for s in (1.0, 3.0)]
    assert energies[0] > 4 * energies[1] > 4 * energies[2]
    with pytest.raises(ValueError, match="sigma"):
        make_intervention("blur", sigma=0)


def test_hflip_mirrors():
    image = noise_image()
    np.testing.assert_array_equal(np.asarray(make_intervention("hflip")(image)), np.asarray(image)[:, ::-1])


def test_transforms_are_deterministic_and_keep_size():
    image = noise_image()
    for name in PLAIN:
        a, b = make_intervention(name)(image), make_intervention(name)(image)
        assert a.size == image.size and a.mode == "RGB"
        assert a.tobytes() == b.tobytes(), name


def test_unknown_intervention_names_the_value_and_the_choices():
    with pytest.raises(ValueError, match=r"unknown intervention 'sky'.*'sky_mask'"):
        make_intervention("sky")
    with pytest.raises(ValueError, match="blur: bad settings"):
        make_intervention("blur", radius=2)
    assert set(PLAIN) | {"text_removal"} == set(INTERVENTIONS)


def text_image() -> Image.Image:
    image = Image.new("RGB", (420, 140), (235, 235, 235))
    ImageDraw.Draw(image).text((20, 35), "MAIN ST", fill=(10, 10, 10), font=ImageFont.load_default(size=64))
    return image


@needs_tesseract
def test_text_removal_finds_drawn_text_and_blurs_it():
    image = text_image()
    boxes = probing.find_text(image)
    assert boxes, "Tesseract should read the drawn words"
    removal = make_intervention("text_removal")
    out = removal(image)
    assert probing.find_text(out) == []
    left, top, width, height = boxes[0]
    word = (left, top, left + width, top + height)
    assert high_frequency_energy(out.crop(word)) < 0.2 * high_frequency_energy(image.crop(word))
    assert np.asarray(out)[:10].tobytes() == np.asarray(image)[:10].tobytes()  # far from the text: unchanged
    assert removal.engine.startswith("tesseract-")


@needs_tesseract
def test_detect_text_reports_which_images_have_text_and_caches_it(tmp_path, monkeypatch):
    text_image().save(tmp_path / "sign.png")
    noise_image(seed=3).save(tmp_path / "plain.png")
    found = probing.detect_text(["sign.png", "plain.png", "missing.png"], tmp_path, cache_dir=tmp_path / "cache")
    assert found["image_path"].tolist() == ["sign.png", "plain.png"]
    assert found["text_found"].tolist() == [True, False]

    def no_ocr(*args, **kwargs):
        raise AssertionError("OCR ran again")

    monkeypatch.setattr(probing, "find_text", no_ocr)
    again = probing.detect_text(["sign.png", "plain.png"], tmp_path, cache_dir=tmp_path / "cache")
    pd.testing.assert_frame_equal(again, found)


def test_text_removal_is_skipped_with_an_install_hint_without_tesseract(monkeypatch):
    monkeypatch.setattr(probing.shutil, "which", lambda cmd: None)
    chosen, skipped = resolve_interventions(["sky_mask", "text_removal"])
    assert [i.name for i in chosen] == ["sky_mask"]
    assert "apt-get install tesseract-ocr" in skipped["text_removal"]


def test_thumbnails_show_the_original_and_each_intervention():
    interventions = [make_intervention(n) for n in PLAIN]
    fig = intervention_thumbnails(noise_image(), interventions)
    assert [ax.get_title() for ax in fig.axes] == ["original"] + [n.replace("_", " ") for n in PLAIN]


# -- embedding through the cache -----------------------------------------------------------------------


def test_intervened_embeddings_are_cached_per_intervention(tiny, tmp_path, monkeypatch):
    model, preprocess, _ = tiny
    paths = []
    for i in range(3):
        noise_image(seed=i).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    calls: list[int] = []
    forward = model.encode_image
    monkeypatch.setattr(model, "encode_image", lambda images, **kw: calls.append(len(images)) or forward(images, **kw))

    def embed(name, **settings):
        wrapped = InterventionPreprocess(make_intervention(name, **settings), preprocess)
        return embed_paths(model, wrapped, paths, cache_dir=tmp_path / "cache", num_workers=0).embeddings

    sky = embed("sky_mask")
    assert sum(calls) == 3
    np.testing.assert_array_equal(embed("sky_mask"), sky)
    assert sum(calls) == 3  # the second call computed nothing
    ground = embed("ground_mask")
    wider = embed("sky_mask", fraction=0.5)
    plain = embed_paths(model, preprocess, paths, cache_dir=tmp_path / "cache", num_workers=0).embeddings
    assert sum(calls) == 12  # another intervention, other settings, no intervention: each computed once
    for other in (ground, wider, plain):
        assert not np.allclose(other, sky)
    reference = torch.stack([preprocess(make_intervention("sky_mask")(Image.open(p).convert("RGB"))) for p in paths])
    with torch.no_grad():
        np.testing.assert_allclose(sky, F.normalize(forward(reference), dim=-1).numpy(), atol=1e-5)
    assert len(list((tmp_path / "cache").iterdir())) == 4


# -- analysis ---------------------------------------------------------------------------------------------


def predictions(n_points: int, accuracy: float, seed: int, regions=("a", "b", "c")) -> pd.DataFrame:
    """A predictions table of ``n_points`` capture points with 2 headings each."""
    rng = np.random.default_rng(seed)
    n = 2 * n_points
    true = np.array(regions)[np.arange(n) // 2 % len(regions)]
    wrong = np.array([regions[(regions.index(t) + 1) % len(regions)] for t in true])
    correct = rng.random(n) < accuracy
    return pd.DataFrame({
        "image_path": [f"img{i}.jpg" for i in range(n)],
        "location_id": np.arange(n) // 2,
        "true_region": true,
        "pred_region": np.where(correct, true, wrong),
        "confidence": 0.5,
        "error_km": np.where(correct, rng.uniform(0, 2, n), rng.uniform(3, 30, n)),
    })


def test_paired_drops_match_a_direct_computation():
    original = predictions(40, 0.7, seed=1)
    blurred = predictions(40, 0.5, seed=2).sample(frac=1, random_state=0)  # another row order: paired by path
    drops = intervention_drops(original, {"blur": blurred}, n_boot=200, seed=5)
    row = drops.iloc[0]
    merged = original.merge(blurred, on="image_path", suffixes=("", "_b"))
    a = (merged["true_region"] == merged["pred_region"]).to_numpy(float)
    b = (merged["true_region_b"] == merged["pred_region_b"]).to_numpy(float)
    assert row["accuracy_drop"] == pytest.approx(a.mean() - b.mean())
    assert row["acc_1km_drop"] == pytest.approx((merged["error_km"] <= 1).mean() - (merged["error_km_b"] <= 1).mean())

    # the bootstrap by hand: draw capture points with replacement, same generator and seed
    rng = np.random.default_rng(5)
    location = merged["location_id"].to_numpy()
    diffs = []
    for _ in range(200):
        drawn = np.bincount(rng.integers(0, 40, 40), minlength=40)[location]
        diffs.append(np.sum(drawn * (a - b)) / drawn.sum())
    assert row["accuracy_drop_lo"] == pytest.approx(np.percentile(diffs, 2.5))
    assert row["accuracy_drop_hi"] == pytest.approx(np.percentile(diffs, 97.5))
    assert row["accuracy_drop_lo"] < row["accuracy_drop"] < row["accuracy_drop_hi"]
    assert row["resampled"] == "location_id"


def test_region_drops_and_heatmap():
    original = predictions(30, 0.8, seed=1)
    masked = predictions(30, 0.4, seed=2)
    table = region_drops(original, {"sky_mask": masked})
    for region, part in original.groupby("true_region"):
        row = table[table["region"] == region].iloc[0]
        other = masked.set_index("image_path").loc[part["image_path"]]
        direct = (part["true_region"] == part["pred_region"]).mean() - (other["true_region"] == other["pred_region"]).mean()
        assert row["drop"] == pytest.approx(direct)
        assert row["n_images"] == len(part)
    names = pd.DataFrame({"id": ["a", "b", "c"], "name": ["Alpha", "Beta", "Gamma"]})
    fig = region_drop_heatmap(table, names)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["Alpha", "Beta", "Gamma"]


def test_tables_of_other_images_are_refused():
    original = predictions(10, 0.5, seed=1)
    with pytest.raises(ValueError, match="different images"):
        intervention_drops(original, {"blur": predictions(12, 0.5, seed=1)}, n_boot=10)
    with pytest.raises(ValueError, match="'none' names the original"):
        intervention_regression(original, {"none": original})


# -- end to end on a constructed data set: only the sky tells the region -----------------------------------

SKY_GREYS = (40, 100, 160, 220)


def sky_scene(region: int, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """Noise everywhere but the top quarter, a sky whose brightness tells the region (plus a little jitter)."""
    pixels = rng.integers(0, 256, (size, size, 3)).astype(float)
    pixels[: size // 4] = SKY_GREYS[region] + rng.normal(0, 12, 3)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def sky_probe(tiny):
    """Nearest-centroid classification of tiny-CLIP embeddings; predictions for the originals and each intervention."""
    model, preprocess, _ = tiny
    rng = np.random.default_rng(0)
    regions = pd.DataFrame({"id": ["r0", "r1", "r2", "r3"], "name": ["R0", "R1", "R2", "R3"],
                            "centroid_lat": [34.0, 34.1, 34.2, 34.3], "centroid_lon": -118.3})

    def embed(images):
        with torch.no_grad():
            return F.normalize(model.encode_image(torch.stack([preprocess(i) for i in images])), dim=-1).numpy()

    train_regions = np.repeat(np.arange(4), 10)
    train = embed([sky_scene(r, rng) for r in train_regions])
    centroids = np.stack([train[train_regions == r].mean(axis=0) for r in range(4)])
    val_regions = np.repeat(np.arange(4), 30)  # 15 capture points x 2 headings per region
    val_images = [sky_scene(r, rng) for r in val_regions]
    manifest = pd.DataFrame({"image_path": [f"v{i}.png" for i in range(len(val_regions))],
                             "latitude": regions["centroid_lat"].to_numpy()[val_regions], "longitude": -118.3,
                             "region_id": regions["id"].to_numpy()[val_regions],
                             "location_id": np.arange(len(val_regions)) // 2})

    def predict(images):
        scores = embed(images) @ centroids.T * 50
        probs = np.exp(scores - scores.max(axis=1, keepdims=True))
        return predictions_from_probs(manifest, probs / probs.sum(axis=1, keepdims=True), regions, top_k=2)

    original = predict(val_images)
    intervened = {name: predict([make_intervention(name)(i) for i in val_images]) for name in PLAIN}
    return original, intervened, regions


def test_sky_mask_has_the_largest_drop_when_only_the_sky_tells_the_region(sky_probe):
    original, intervened, _ = sky_probe
    drops = intervention_drops(original, intervened, n_boot=200, seed=0).set_index("intervention")
    print("\n", drops[["accuracy_original", "accuracy", "accuracy_drop", "accuracy_drop_lo", "accuracy_drop_hi"]])
    assert drops["accuracy_original"].iloc[0] > 0.45  # the sky is read (chance: 0.25)
    assert drops["accuracy_drop"].idxmax() == "sky_mask"
    assert drops.loc["sky_mask", "accuracy_drop_lo"] > 0
    assert drops.loc["sky_mask", "accuracy"] < 0.4
    for name in ("ground_mask", "center_occlude", "hflip"):  # no region cue there
        assert abs(drops.loc[name, "accuracy_drop"]) < 0.1, name


def test_the_regression_says_the_sky_carries_the_region(sky_probe):
    original, intervened, _ = sky_probe
    result = intervention_regression(original, intervened)
    effects = result["effects"].set_index("intervention")
    tests = result["lr_tests"].set_index("intervention")
    print("\n", effects, "\n", tests, "\n", result["interaction"], result["warnings"])
    assert effects["log_odds_ratio"].idxmin() == "sky_mask"
    assert effects.loc["sky_mask", "ci_hi"] < 0
    assert effects.loc["sky_mask", "ci_lo"] < effects.loc["sky_mask", "log_odds_ratio"]
    assert tests.loc["sky_mask", "p_value"] < 1e-3 and effects.loc["sky_mask", "p_value"] < 1e-3
    assert tests.loc["sky_mask", "df"] == 4  # the main effect and 3 region interactions
    assert tests.loc["hflip", "p_value"] > 0.01
    assert result["clustered_by"] == "location_id" and result["n_clusters"] == 60
    assert result["n_rows"] == 7 * 120
    assert result["dropped_regions"] == []
    rates = probing._stacked(original, intervened).groupby(["condition", "region"])["correct"].mean()
    assert sorted(map(tuple, result["separated_cells"])) == sorted(rates[(rates == 0) | (rates == 1)].index)


def test_probing_json_is_json_safe_and_complete(sky_probe):
    original, intervened, regions = sky_probe
    subset = {k: intervened[k] for k in ("sky_mask", "hflip")}
    result = probe_model(original, subset, n_boot=50, seed=0)
    doc = probing_json({"zeroshot": result}, [make_intervention(n) for n in subset],
                       skipped={"text_removal": "no tesseract"}, n_boot=50)
    text = json.dumps(doc, allow_nan=False)
    back = json.loads(text)
    assert set(back) == {"split", "interventions", "skipped", "text_found", "models", "bootstrap"}
    assert back["interventions"]["sky_mask"]["settings"] == {"fraction": pytest.approx(1 / 3), "fill": list(FILL)}
    model = back["models"]["zeroshot"]
    assert [r["intervention"] for r in model["drops"]] == ["sky_mask", "hflip"]
    assert len(model["per_region"]) == 2 * len(regions)
    assert {r["intervention"] for r in model["regression"]["effects"]} == {"sky_mask", "hflip"}
    assert back["skipped"] == {"text_removal": "no tesseract"}


def test_regions_without_information_are_left_out_of_the_regression():
    original = predictions(30, 0.6, seed=1)
    masked = predictions(30, 0.3, seed=2)
    for table in (original, masked):  # region c: always right, whatever is done to the images
        always = table["true_region"] == "c"
        table.loc[always, "pred_region"] = "c"
    result = intervention_regression(original, {"sky_mask": masked})
    assert result["dropped_regions"] == ["c"]
    assert result["n_rows"] == 2 * int((original["true_region"] != "c").sum())
    assert np.isfinite(result["effects"]["log_odds_ratio"]).all()


# -- predicting intervened images through the predictor and the cache -------------------------------------


@pytest.fixture
def zero_shot(tiny, regions):
    model, preprocess, tokenizer = tiny
    return GeoPredictor(model, preprocess, tokenizer, regions.head(3), device="cpu", model_name=TINY_MODEL)


def small_manifest(folder, regions, images) -> pd.DataFrame:
    for i, image in enumerate(images):
        image.save(folder / f"{i}.png")
    first = regions.head(3)
    picks = np.arange(len(images)) % 3
    return pd.DataFrame({"image_path": [f"{i}.png" for i in range(len(images))],
                         "latitude": first["centroid_lat"].to_numpy()[picks],
                         "longitude": first["centroid_lon"].to_numpy()[picks],
                         "region_id": first["id"].to_numpy()[picks], "location_id": np.arange(len(images))})


def test_predict_intervened_uses_the_intervened_images_and_the_cache(zero_shot, regions, tmp_path, monkeypatch):
    manifest = small_manifest(tmp_path, regions, [noise_image(seed=i) for i in range(4)])
    sky = make_intervention("sky_mask")
    table = probing.predict_intervened(zero_shot, manifest, tmp_path, sky, cache_dir=tmp_path / "cache", top_k=2)
    direct = zero_shot.probabilities(torch.cat([zero_shot.embed_image(sky(noise_image(seed=i))) for i in range(4)]))
    np.testing.assert_allclose(np.stack(table["top_probs"]), np.sort(direct, axis=1)[:, ::-1][:, :2], atol=1e-5)
    assert table.attrs["intervention"] == {"name": "sky_mask", "fraction": pytest.approx(1 / 3), "fill": FILL}
    assert zero_shot.preprocess is not None and not isinstance(zero_shot.preprocess, InterventionPreprocess)

    calls: list[int] = []
    forward = zero_shot.model.encode_image
    monkeypatch.setattr(zero_shot.model, "encode_image",
                        lambda images, **kw: calls.append(len(images)) or forward(images, **kw))
    again = probing.predict_intervened(zero_shot, manifest, tmp_path, sky, cache_dir=tmp_path / "cache", top_k=2)
    assert calls == []
    pd.testing.assert_frame_equal(again, table)


@needs_tesseract
def test_predict_intervened_reports_the_share_of_images_with_text(zero_shot, regions, tmp_path, monkeypatch):
    manifest = small_manifest(tmp_path, regions, [text_image(), noise_image(seed=1), noise_image(seed=2)])
    removal = make_intervention("text_removal")
    table = probing.predict_intervened(zero_shot, manifest, tmp_path, removal, cache_dir=tmp_path / "cache")
    assert table.attrs["text_found"] == {"share": pytest.approx(1 / 3), "n_images": 3}
    monkeypatch.setattr(probing, "find_text", lambda *a, **k: pytest.fail("OCR ran again"))
    again = probing.predict_intervened(zero_shot, manifest, tmp_path, removal, cache_dir=tmp_path / "cache")
    pd.testing.assert_frame_equal(again, table)


@needs_tesseract
def test_text_removal_settings_from_yaml_lists_give_the_same_cache_key():
    listed = make_intervention("text_removal", ocr_modes=[3, 11])
    assert repr(listed) == repr(make_intervention("text_removal"))
    assert "ocr_modes=(3, 11)" in repr(listed) and "boxes" not in repr(listed)
