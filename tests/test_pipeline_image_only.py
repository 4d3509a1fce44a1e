"""End to end with an image-only backbone: a tiny random timm ViT through `lageo run` (notebooks 01-05; step 06's
model choice is checked directly, as its notebook would add most of a minute).

Image-side methods (linear probe, partial fine-tuning, retrieval, geocells) run; the text-side ones
(zero-shot, prompt variants, text_scale, WiSE-FT) are skipped and the notebooks and the report say so.
"""

from __future__ import annotations

import json

import nbformat
import pandas as pd
import pytest
from test_pipeline import METHODS, METRIC_KEYS

from lageo_utils.backbones import EMBEDDING_METHODS

pytestmark = pytest.mark.slow
TIMM_TINY = "timm:lageo-tiny-dinov2"
# As small as the pipeline allows: few images, one epoch, few resamples, one geocell resolution; text_scale is asked
# for and must be skipped.
OVERRIDES = {"model": TIMM_TINY, "pretrained": None, "demo_points_per_region": 3, "demo_image_size": 64, "epochs": 1,
             "n_boot": 10, "geocell_resolutions": [7], "strategies": ["linear_probe", "text_scale", "partial"]}


@pytest.fixture(scope="module")
def image_only_run(tmp_path_factory):
    from lageo_utils.pipeline import run_pipeline
    from lageo_utils.runs import resolve_params

    with pytest.MonkeyPatch.context() as patch:
        outputs = tmp_path_factory.mktemp("outputs")
        patch.setenv("LAGEO_OUTPUTS", str(outputs))  # the notebooks' kernels inherit it
        patch.setenv("LAGEO_CELL_TIMEOUT", "600")
        run = run_pipeline(resolve_params("demo", overrides=OVERRIDES), outputs=outputs)
    return run


def test_every_step_ran_and_no_zero_shot_model_was_written(image_only_run):
    run = image_only_run
    executed = sorted(p.name for p in (run / "notebooks").glob("*.ipynb"))
    assert executed == ["01_explore_data.ipynb", "02_zero_shot.ipynb", "03_finetune.ipynb", "04_evaluate.ipynb",
                        "05_report.ipynb"]
    for name in ("predictions_finetuned.parquet", "checkpoints/linear_probe/best.pt", "checkpoints/partial/best.pt",
                 "locator/zeroshot/locator.json", "locator/finetuned/geocell.pt", "metrics.json",
                 "classification_report_finetuned.txt", "report.html"):
        assert (run / name).is_file(), name
    for name in ("predictions_zeroshot.parquet", "classification_report_zeroshot.txt", "checkpoints/text_scale",
                 "predictions_strategy_partial_wise.parquet", "predictions_prompt_seed.parquet"):
        assert not (run / name).exists(), name
    assert list(json.loads((run / "strategies.json").read_text())) == ["linear_probe", "partial"]


def test_the_frozen_backbone_answers_retrieval_and_geocells_and_the_fine_tuned_one_everything(image_only_run):
    test = pd.read_csv(image_only_run / "test.csv")
    for model, methods in (("zeroshot", list(EMBEDDING_METHODS)), ("finetuned", METHODS)):
        table = pd.read_parquet(image_only_run / f"coordinates_{model}.parquet")
        assert list(table["method"].unique()) == methods, model
        assert set(table["image_path"]) == set(test["image_path"])


def test_metrics_have_the_image_side_rows_and_say_what_was_skipped(image_only_run):
    metrics = json.loads((image_only_run / "metrics.json").read_text())
    assert "zeroshot" not in metrics and "comparison" not in metrics
    assert METRIC_KEYS <= metrics["finetuned"].keys() and metrics["finetuned"]["n_images"] == metrics["data"]["test"]
    assert list(metrics["strategies"]) == ["linear_probe", "partial"]
    for strategy in metrics["strategies"].values():
        assert METRIC_KEYS <= strategy.keys()
        assert strategy["paired_vs_zeroshot"] is None and strategy["wise_ft"] is None
    assert list(metrics["methods"]["zeroshot"]) == list(EMBEDDING_METHODS)
    assert list(metrics["methods"]["finetuned"]) == METHODS
    assert metrics["paired_vs_centroid"]["zeroshot"] == {}  # no centroid answer to pair with
    assert "zeroshot" not in metrics["calibration"] and "prompts" in metrics and not metrics["prompts"]
    skipped = metrics["skipped"]
    assert {"zero-shot classification (step 02)", "strategies text_scale", "WiSE-FT"} <= skipped.keys()
    assert "prompt variants (name, seed, visual, ensemble)" in skipped
    assert all("no text tower" in reason or "region probabilities" in reason for reason in skipped.values())


def test_the_notebooks_and_the_report_say_what_was_skipped(image_only_run):
    for step in ("02_zero_shot", "03_finetune", "04_evaluate", "05_report"):
        notebook = nbformat.read(image_only_run / "notebooks" / f"{step}.ipynb", as_version=4)
        shown = [o["data"]["text/markdown"] for c in notebook.cells if c.cell_type == "code" for o in c.outputs
                 if "text/markdown" in o.get("data", {})]
        assert any("Text-side methods skipped" in text and "text_scale" in text for text in shown), step
    html = (image_only_run / "report.html").read_text()
    assert "Text-side methods skipped" in html and "image-only" in html and "WiSE-FT" in html
    assert f"Fine-tuned {TIMM_TINY}" in html and f"Frozen {TIMM_TINY} (no head)" in html
    assert "Zero-shot CLIP" not in html and "minus zero-shot" not in html  # no zero-shot model, no pairing with it


def test_probing_would_probe_each_trained_strategy_and_no_zero_shot_model(image_only_run):
    from lageo_utils import steps
    from lageo_utils.runs import read_params

    assert list(steps.probing_predictors(image_only_run, read_params(image_only_run))) == ["linear_probe", "partial"]


def test_the_head_started_from_zero_and_the_cache_knows_the_backbone_family(image_only_run):
    from lageo_utils.checkpoints import load_checkpoint

    state = load_checkpoint(image_only_run / "checkpoints" / "linear_probe" / "best.pt")
    assert not state["model"]["class_embeddings"].any()  # no text: the linear head started from zero
    families = {json.loads(meta.read_text())["family"]
                for meta in (image_only_run.parent.parent / "cache" / "embeddings").glob("*/meta.json")}
    assert families == {"image-only"}


def test_a_finished_image_only_run_is_complete(image_only_run):
    from lageo_utils.pipeline import resume_pipeline
    from lageo_utils.runs import STEPS, RunError, read_params, step_done, step_wanted

    params = read_params(image_only_run)
    wanted = [step for step in STEPS if step_wanted(step, params)]  # 06_probing: interventions is empty
    assert all(step_done(image_only_run, step) for step in wanted)  # the absent zero-shot files are not missing
    with pytest.raises(RunError, match="is complete"):
        resume_pipeline(image_only_run)


def test_lageo_predict_answers_from_an_image_only_run(image_only_run, capsys):
    from lageo_utils.cli import main

    image_root = json.loads((image_only_run / "data.json").read_text())["image_root"]
    image = pd.read_csv(image_only_run / "test.csv")["image_path"].iloc[0]
    path = f"{image_root}/{image}"
    assert main(["predict", path, "--run", str(image_only_run)]) == 0  # the fine-tuned head: centroid
    [answer] = json.loads(capsys.readouterr().out)
    assert answer["model"] == "finetuned" and answer["method"] == "centroid" and answer["region"]
    assert main(["predict", path, "--run", str(image_only_run), "--model", "zeroshot", "--method", "retrieval"]) == 0
    [answer] = json.loads(capsys.readouterr().out)
    table = pd.read_parquet(image_only_run / "coordinates_zeroshot.parquet")
    expected = table[(table["method"] == "retrieval") & ~table["voted"] & (table["image_path"] == image)].iloc[0]
    assert (answer["lat"], answer["lon"]) == pytest.approx((expected["pred_lat"], expected["pred_lon"]), abs=1e-6)
    assert main(["predict", path, "--run", str(image_only_run), "--model", "zeroshot", "--method", "centroid"]) == 2
    assert "has no region head" in capsys.readouterr().err
