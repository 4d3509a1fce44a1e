"""The report's section "What the model relies on": its tables and notes agree with probing.json."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from lageo_utils import probing, report
from lageo_utils.params import check_value
from lageo_utils.steps import _probe_model

PARAMS = {"n_boot": 50, "seed": 0}


def predictions(accuracy: float, seed: int, n_points: int = 30, regions=("a", "b", "c")) -> pd.DataFrame:
    """A predictions table of ``n_points`` capture points with 2 headings each, ``accuracy`` of them right."""
    rng = np.random.default_rng(seed)
    n = 2 * n_points
    true = np.array(regions)[np.arange(n) // 2 % len(regions)]
    correct = rng.random(n) < accuracy
    wrong = np.array([regions[(regions.index(t) + 1) % len(regions)] for t in true])
    return pd.DataFrame({"image_path": [f"img{i}.jpg" for i in range(n)], "location_id": np.arange(n) // 2,
                         "true_region": true, "pred_region": np.where(correct, true, wrong), "confidence": 0.5,
                         "error_km": np.where(correct, 0.5, 20.0)})


@pytest.fixture(scope="module")
def doc() -> dict:
    interventions = [probing.make_intervention("grayscale"), probing.make_intervention("sky_mask")]
    fitted = _probe_model(predictions(0.8, 1), {"grayscale": predictions(0.6, 2), "sky_mask": predictions(0.2, 3)},
                          PARAMS)
    always_wrong = predictions(0.0, 4)
    unfitted = _probe_model(always_wrong, {"grayscale": always_wrong, "sky_mask": always_wrong}, PARAMS)
    document = probing.probing_json({"zeroshot": unfitted, "finetuned": fitted}, interventions,
                                    skipped={"text_removal": probing.TESSERACT_INSTALL},
                                    text_found={"share": 0.25, "n_images": 60}, n_boot=50)
    return json.loads(json.dumps(document))  # as read back from probing.json


def test_a_model_that_answers_alike_everywhere_keeps_its_drops_without_a_regression(doc):
    zeroshot = doc["models"]["zeroshot"]
    assert "not_fitted" in zeroshot["regression"] and "nothing to regress" in zeroshot["regression"]["not_fitted"]
    assert [d["accuracy_drop"] for d in zeroshot["drops"]] == [0.0, 0.0]
    assert "effects" in doc["models"]["finetuned"]["regression"]


def test_drops_table_shows_the_json_numbers_with_their_intervals(doc):
    table = report.probing_drops_table(doc)
    assert list(table.index) == [("Zero-shot CLIP", "grayscale"), ("Zero-shot CLIP", "sky_mask"),
                                 ("Fine-tuned CLIP", "grayscale"), ("Fine-tuned CLIP", "sky_mask")]
    sky = next(d for d in doc["models"]["finetuned"]["drops"] if d["intervention"] == "sky_mask")
    cell = table.loc[("Fine-tuned CLIP", "sky_mask"), "Accuracy drop [CI]"]
    assert cell == f"{sky['accuracy_drop']:+.3f} [{sky['accuracy_drop_lo']:+.3f}, {sky['accuracy_drop_hi']:+.3f}]"
    assert sky["accuracy_drop"] > 0.3 and table.loc[("Fine-tuned CLIP", "sky_mask"), "Images"] == 60


def test_effects_table_has_the_fitted_model_s_effects_and_lr_tests(doc):
    table = report.probing_effects_table(doc)
    assert list(table.index) == [("Fine-tuned CLIP", "grayscale"), ("Fine-tuned CLIP", "sky_mask")]
    lr = {t["intervention"]: t for t in doc["models"]["finetuned"]["regression"]["lr_tests"]}
    assert table.loc[("Fine-tuned CLIP", "sky_mask"), "LR statistic (df)"] == (
        f"{lr['sky_mask']['lr_statistic']:.1f} ({lr['sky_mask']['df']})")
    assert table.loc[("Fine-tuned CLIP", "sky_mask"), "Log-odds ratio [95% CI]"].startswith("-")


def test_notes_name_skipped_interventions_text_share_and_what_could_not_be_estimated(doc):
    notes = report.probing_notes(doc)
    assert "`text_removal` skipped: Tesseract OCR is not installed" in notes and "apt-get install tesseract-ocr" in notes
    assert "Tesseract found text in 25% of the 60 images" in notes
    assert "Zero-shot CLIP: no regression" in notes and "every validation image" in notes


def test_not_run_message_gives_a_command_that_the_schema_accepts():
    message = report.probing_not_run_markdown()
    assert "Probing was not run" in message and "--profile demo-compare" in message
    listed = report.PROBING_ON.split("-p interventions ")[1]
    assert check_value("interventions", listed) == listed.split(",")


def test_notes_say_so_when_every_intervention_was_skipped():
    doc = probing.probing_json({}, [], skipped={"text_removal": probing.TESSERACT_INSTALL})
    notes = report.probing_notes(doc)
    assert "No intervention could be run" in notes and "`text_removal` skipped" in notes
