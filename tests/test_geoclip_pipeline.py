"""GeoCLIP as a method of the pipeline: ``geo_methods geoclip,geoclip_finetuned`` through steps 01-04 and the report.

The steps run in-process on a reduced demo (3 points per region, 1 epoch, 2 km gallery spacing) with
GeoCLIP's backbone a tiny random transformers CLIP saved to a folder (``geoclip_backbone``); the image
head and location encoder are the real weights shipped in the geoclip package. Random-weight numbers:
they show the wiring, not GeoCLIP's skill.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd
import pytest

from lageo_utils.cli import main
from lageo_utils.params import GEO_METHODS, PEER_METHODS, check_value, defaults

REDUCED = {"demo_points_per_region": 3, "demo_image_size": 64, "epochs": 1, "n_boot": 20, "prompt_variants": ["name"],
           "num_workers": 0, "geo_methods": ["centroid", "geoclip", "geoclip_finetuned"], "geoclip_spacing_m": 2000.0,
           "geoclip_epochs": 1, "geoclip_lr": 1e-3, "geoclip_batch_size": 64, "geoclip_queue_size": 32}
COORDINATE_KEYS = {"n_images", "acc_at_km", "acc_at_km_ci95", "median_error_km", "median_error_km_ci95",
                   "per_capture_point"}


def test_geoclip_methods_are_choices_but_not_defaults():
    assert check_value("geo_methods", "centroid,geoclip,geoclip_finetuned") == ["centroid", *PEER_METHODS]
    assert defaults()["geo_methods"] == list(GEO_METHODS) and not set(PEER_METHODS) & set(GEO_METHODS)


@pytest.fixture
def outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("LAGEO_OUTPUTS", str(tmp_path / "outputs"))
    return tmp_path / "outputs"


def test_lageo_run_without_the_extra_says_how_to_install_it(outputs, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "geoclip", None)  # makes `import geoclip` fail
    assert main(["run", "--profile", "demo", "-p", "geo_methods", "centroid,geoclip_finetuned"]) == 2
    err = capsys.readouterr().err
    assert "pip install -e '.[peers]'" in err and "geoclip_finetuned" in err and "Traceback" not in err
    assert not outputs.exists()


def test_lageo_run_without_the_backbone_gives_the_two_fixes(outputs, tmp_path, capsys):
    pytest.importorskip("geoclip", reason="the optional 'peers' extra is not installed: pip install -e '.[peers]'")
    assert main(["run", "--profile", "demo", "-p", "geo_methods", "centroid,geoclip",
                 "-p", "geoclip_backbone", str(tmp_path / "no-such-folder")]) == 2
    err = capsys.readouterr().err
    assert "no-such-folder" in err and "the folder does not exist" in err
    assert "1. run once with internet access" in err and "2. pass a local transformers folder" in err
    assert "Traceback" not in err and not outputs.exists()


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    """A tiny random CLIPModel (768-d projection, as GeoCLIP's image head takes) saved as a transformers folder."""
    pytest.importorskip("geoclip", reason="the optional 'peers' extra is not installed: pip install -e '.[peers]'")
    from test_geoclip import tiny_clip

    from lageo_utils.peers import geoclip as gc

    folder = tmp_path_factory.mktemp("tiny-geoclip-backbone")
    clip = tiny_clip(seed=3)
    clip.save_pretrained(folder)
    gc.default_processor(clip).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def geoclip_run(tmp_path_factory, backbone):
    """A reduced demo run with steps 01-03 done in-process (the notebooks call the same functions)."""
    from lageo_utils import steps

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LAGEO_OUTPUTS", str(tmp_path_factory.mktemp("outputs")))
        run, params = steps.open_step("01_explore_data", None, profile="demo", geoclip_backbone=str(backbone),
                                      **REDUCED)
        steps.prepare_data(run, params)
        steps.zero_shot(*steps.open_step("02_zero_shot", run))
        steps.finetune(*steps.open_step("03_finetune", run))
        yield run, params, steps.coordinate_metrics(run, params)


def test_metrics_score_both_geoclip_methods_with_intervals_and_paired_against_centroid(geoclip_run):
    run, params, doc = geoclip_run
    for model, method in (("zeroshot", "geoclip"), ("finetuned", "geoclip_finetuned")):
        assert list(doc["methods"][model]) == ["centroid", method]
        summary = doc["methods"][model][method]
        assert COORDINATE_KEYS <= summary.keys()
        assert summary["n_images"] == doc["methods"][model]["centroid"]["n_images"] == len(pd.read_csv(run / "test.csv"))
        lo, hi = summary["median_error_km_ci95"]
        assert lo <= summary["median_error_km"] <= hi
        paired = doc["paired_vs_centroid"][model][method]
        low, high = paired["median_error_km"]["ci"]
        assert low <= paired["median_error_km"]["difference"] <= high and paired["resampled"] == "location_id"
        assert set(doc["risk_coverage"][model]) == {"centroid", method}
        assert doc["best_method"][model] is None  # a peer is not one of lageo's methods chosen on validation
        peer = doc["peers"][method]
        assert peer["coordinates_of"] == model and peer["val"]["n_images"] == len(pd.read_csv(run / "val.csv"))
    training = doc["peers"]["geoclip_finetuned"]["training"]
    history = pd.read_csv(run / "checkpoints" / "geoclip_finetuned" / "history.csv")
    assert history["epoch"].tolist() == [0, 1] and training["best_epoch"] == int(history["val_loss"].idxmin())
    assert doc["peers"]["geoclip"]["training"] is None


def test_answers_lie_in_the_la_gallery_and_are_geoclips_own(geoclip_run, backbone):
    from lageo_utils.peers import geoclip as gc

    run, params, _ = geoclip_run
    test = pd.read_csv(run / "test.csv")
    root = json.loads((run / "data.json").read_text())["image_root"]
    shipped = gc.load_geoclip(backbone, device="cpu")
    for model, method in (("zeroshot", "geoclip"), ("finetuned", "geoclip_finetuned")):
        gallery = pd.read_parquet(run / "peers" / method / "gallery.parquet")
        train = pd.read_csv(run / "train.csv")
        points = set(zip(gallery["latitude"], gallery["longitude"]))
        assert set(zip(train["latitude"], train["longitude"])) <= points  # the training coordinates are in it
        assert (gallery["source"] == "grid").sum() > 0
        table = pd.read_parquet(run / f"coordinates_{model}.parquet")
        rows = table[table["method"] == method]
        assert sorted(rows["voted"].value_counts().tolist()) == [len(test), len(test)]
        assert set(zip(rows["pred_lat"], rows["pred_lon"])) <= points
        for lat, lon, prob in zip(rows["top_k_lat"], rows["top_k_lon"], rows["top_k_prob"]):
            assert set(zip(lat, lon)) <= points and len(prob) == params["geoclip_top_k"]
            assert np.all(np.diff(prob) <= 0)
        assert np.allclose(rows["confidence"], [p[0] for p in rows["top_k_prob"]])
        # the run's answers are those of the library's predict with the model the step used (best.pt when tuned)
        model_used = shipped if method == "geoclip" else gc.load_finetuned(
            shipped, run / "checkpoints" / "geoclip_finetuned" / "best.pt")
        found = gc.predict_geoclip(model_used, test["image_path"].tolist(), gallery, top_k=params["geoclip_top_k"],
                                   root=root, num_workers=0)
        per_image = rows[~rows["voted"]].set_index("image_path").loc[test["image_path"]]
        assert np.allclose(per_image["pred_lat"], found.answers.lat) and np.allclose(per_image["pred_lon"],
                                                                                     found.answers.lon)
        assert np.allclose(np.stack(per_image["top_k_prob"]), found.top_prob, atol=1e-6)
        # voted: one answer per capture point
        voted = rows[rows["voted"]]
        assert (voted.groupby("location_id")[["pred_lat", "pred_lon"]].nunique() == 1).all().all()


def test_the_report_names_the_geoclip_methods(geoclip_run):
    from lageo_utils import figures, report

    run, params, doc = geoclip_run
    table = report.coordinate_table(doc)
    assert {("Zero-shot CLIP", "geoclip"), ("Fine-tuned CLIP", "geoclip_finetuned"),
            ("Zero-shot CLIP, voted per capture point", "geoclip")} <= set(table.index)
    text = report.coordinate_markdown(doc, params)
    assert "`geoclip` (listed with Zero-shot CLIP" in text and "`geoclip_finetuned` (listed with Fine-tuned CLIP" in text
    assert "| Zero-shot CLIP | geoclip |" in text  # the paired comparison against centroid
    fig = figures.risk_coverage_figure(doc["risk_coverage"], {"zeroshot": "Zero-shot CLIP", "finetuned": "Fine-tuned"})
    assert any("geoclip_finetuned" in t.get_text() for t in fig.legends[0].get_texts())


def test_geoclip_answers_beside_an_image_only_backbone_without_other_frozen_methods(tmp_path, backbone, monkeypatch):
    """``geo_methods centroid,geoclip`` with a timm backbone: nothing of lageo's answers before training, GeoCLIP does."""
    from lageo_utils import steps
    from lageo_utils.runs import step_done

    monkeypatch.setenv("LAGEO_OUTPUTS", str(tmp_path / "outputs"))
    run, params = steps.open_step("01_explore_data", None, profile="demo", geoclip_backbone=str(backbone),
                                  model="timm:lageo-tiny-dinov2", pretrained="none", strategies=["linear_probe"],
                                  **{**REDUCED, "geo_methods": ["centroid", "geoclip"]})
    steps.prepare_data(run, params)
    steps.zero_shot(*steps.open_step("02_zero_shot", run))
    assert step_done(run, "02_zero_shot")
    table = pd.read_parquet(run / "coordinates_zeroshot.parquet")
    assert set(table["method"]) == {"geoclip"} and not (run / "locator" / "zeroshot").exists()
    steps.finetune(*steps.open_step("03_finetune", run))
    doc = steps.coordinate_metrics(run, params)
    assert list(doc["methods"]["zeroshot"]) == ["geoclip"] and "geoclip" in doc["peers"]
    assert doc["methods"]["zeroshot"]["geoclip"]["n_images"] == len(pd.read_csv(run / "test.csv"))
