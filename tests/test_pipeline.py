"""End to end: `lageo run` on a reduced demo profile, notebooks alone, failures, the report."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import PROJECT_ROOT
from PIL import Image

from lageo_utils.notebook import PAPERMILL_KERNEL

pytestmark = pytest.mark.slow
REDUCED = ["-p", "demo_points_per_region", "3", "-p", "epochs", "2", "-p", "n_boot", "50", "-p", "demo_image_size", "96"]
METRIC_KEYS = {"n_images", "accuracy", "precision_macro", "recall_macro", "f1_macro", "precision_weighted",
               "recall_weighted", "f1_weighted", "acc_at_km", "median_error_km", "mean_error_km", "ece", "per_region"}
REPORT_SECTIONS = ["Model comparison", "Per-region classification report", "Confusion matrices", "Maps",
                   "Training", "Calibration", "Example predictions (top-3)", "Data and leakage audit", "Run"]


def lageo(*args, env, check=True):
    return subprocess.run([str(Path(sys.executable).parent / "lageo"), *args], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, check=check, timeout=900)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    outputs = tmp_path_factory.mktemp("outputs")
    return {**os.environ, "LAGEO_OUTPUTS": str(outputs), "PYTHONHASHSEED": "0", "LAGEO_CELL_TIMEOUT": "600"}


@pytest.fixture(scope="module")
def demo_result(env):
    return lageo("run", "--profile", "demo", *REDUCED, env=env)


@pytest.fixture(scope="module")
def demo_run(demo_result):
    return Path(re.search(r"run complete: (\S+)", demo_result.stdout).group(1))


def test_terminal_output_is_one_line_per_step(demo_result):
    lines = demo_result.stderr.strip().splitlines()
    assert all(line.startswith("INFO lageo_utils.pipeline: ") for line in lines), lines
    assert sum(line.endswith(" s") and ": done in " in line for line in lines) == 5
    assert "Kernel is running over TCP" not in demo_result.stderr and "open_clip" not in demo_result.stderr


def test_run_directory_has_every_file(demo_run, env):
    outputs = Path(env["LAGEO_OUTPUTS"])
    assert demo_run.parent == outputs / "runs"
    assert (outputs / "latest").resolve() == demo_run.resolve()
    for name in ["params.yaml", "manifest.csv", "train.csv", "val.csv", "test.csv", "audit.json", "data.json",
                 "predictions_zeroshot.parquet", "predictions_finetuned.parquet", "metrics.json", "history.csv",
                 "train_summary.json", "checkpoints/best.pt", "checkpoints/last.pt", "report.html"]:
        assert (demo_run / name).is_file(), name
    executed = sorted(p.name for p in (demo_run / "notebooks").glob("*.ipynb"))
    assert executed == ["01_explore_data.ipynb", "02_zero_shot.ipynb", "03_finetune.ipynb", "04_evaluate.ipynb",
                        "05_report.ipynb"]
    assert len(list((demo_run / "figures").glob("*.png"))) >= 12
    assert len(pd.read_csv(demo_run / "history.csv")) == 2
    audit = json.loads((demo_run / "audit.json").read_text())
    assert audit["exact_train_coordinate"] == 0  # location split by default


def test_metrics_json_keys(demo_run):
    metrics = json.loads((demo_run / "metrics.json").read_text())
    assert {"zeroshot", "finetuned", "params", "data"} <= metrics.keys()
    assert set(metrics["data"]) >= {"train", "val", "test"}
    for key in ("zeroshot", "finetuned"):
        m = metrics[key]
        assert METRIC_KEYS <= m.keys()
        assert set(m["acc_at_km"]) == {"1", "5", "10", "25"}
        assert m["n_images"] == metrics["data"]["test"]
        assert len(m["per_region"]) == 15
        assert 0 <= m["accuracy"] <= 1


def test_report_has_every_section_and_embedded_figures(demo_run):
    html = (demo_run / "report.html").read_text()
    for section in REPORT_SECTIONS:
        assert f'<h2 id="{section.replace(" ", "-")}">{section}' in html, section
    assert "Demo run — not a geolocation result" in html
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(images) >= 12
    first = Image.open(io.BytesIO(base64.b64decode(images[0])))
    assert np.asarray(first.convert("L")).std() > 5
    assert "steps.open_step" not in html  # no code in the report
    assert "src=\"figures/" not in html  # nothing refers to files outside the single HTML file


def test_same_seed_same_numbers(demo_run, env):
    again = lageo("run", "--profile", "demo", *REDUCED, env=env)
    run2 = Path(re.search(r"run complete: (\S+)", again.stdout).group(1))
    assert run2 != demo_run
    m1 = json.loads((demo_run / "metrics.json").read_text())
    m2 = json.loads((run2 / "metrics.json").read_text())
    for key in ("zeroshot", "finetuned"):
        assert m1[key] == m2[key]
    pd.testing.assert_frame_equal(pd.read_csv(demo_run / "history.csv").drop(columns="seconds"),
                                  pd.read_csv(run2 / "history.csv").drop(columns="seconds"))


def test_notebook_alone_with_papermill_forks_a_new_run(demo_run, env):
    import papermill

    before = (demo_run / "history.csv").read_text()
    papermill.execute_notebook(str(PROJECT_ROOT / "notebooks" / "03_finetune.ipynb"), str(demo_run.parent / "alone.ipynb"),
                               parameters={"run_dir": str(demo_run), "epochs": 1}, cwd=str(PROJECT_ROOT / "notebooks"),
                               kernel_name=PAPERMILL_KERNEL, progress_bar=False)
    assert (demo_run / "history.csv").read_text() == before  # the finished run is untouched
    children = [p for p in demo_run.parent.iterdir() if (p / "params.yaml").exists()
                and f"parent_run: {demo_run.name}" in (p / "params.yaml").read_text()]
    assert len(children) == 1 and len(pd.read_csv(children[0] / "history.csv")) == 1


def test_failing_notebook_stops_and_leaves_earlier_runs_intact(demo_run, env):
    outputs = Path(env["LAGEO_OUTPUTS"])
    latest_before = (outputs / "latest").resolve()
    # A value the schema accepts but the model cannot honour: the tiny encoder has fewer blocks.
    result = lageo("run", "--profile", "demo", *REDUCED, "-p", "strategy", "partial", "-p", "unfreeze_blocks", "99",
                   env=env, check=False)
    assert result.returncode != 0
    assert "03_finetune.ipynb failed in cell" in result.stderr and "partial output" in result.stderr
    assert (outputs / "latest").resolve() == latest_before
    assert (demo_run / "report.html").exists()
    failed = [p for p in (outputs / "runs").iterdir() if (p / "FAILED.json").exists()]
    assert len(failed) == 1 and json.loads((failed[0] / "FAILED.json").read_text())["step"] == "03_finetune"


def test_failed_run_resumes_with_finished_steps_kept(demo_run, env):
    from lageo_utils.runs import read_params, update_params

    outputs = Path(env["LAGEO_OUTPUTS"])
    failed = next(p for p in (outputs / "runs").iterdir() if (p / "FAILED.json").exists())
    kept = {name: (failed / name).read_bytes() for name in ("train.csv", "test.csv", "predictions_zeroshot.parquet")}
    update_params(failed, {**read_params(failed), "strategy": "linear_probe", "unfreeze_blocks": 2})  # the fix
    result = lageo("run", "--resume", str(failed), env=env)
    assert "02_zero_shot: already done" in result.stderr and "running 03_finetune" in result.stderr
    assert {name: (failed / name).read_bytes() for name in kept} == kept
    assert (failed / "report.html").exists() and not (failed / "FAILED.json").exists()
    assert (outputs / "latest").resolve() == failed.resolve()
    again = lageo("run", "--resume", str(failed), env=env, check=False)
    assert again.returncode != 0 and "is complete" in again.stderr


def test_lageo_report_renders_into_a_new_latest_run(demo_run, env):
    outputs = Path(env["LAGEO_OUTPUTS"])
    before = (demo_run / "report.html").read_bytes()
    result = lageo("report", str(demo_run), env=env)
    child = Path(re.search(r"report: (\S+)", result.stdout).group(1)).parent
    assert child != demo_run and (demo_run / "report.html").read_bytes() == before
    assert (outputs / "latest").resolve() == child.resolve()
    assert (child / "classification_report_finetuned.txt").exists()
    assert sorted(p.name for p in (child / "figures").glob("*.png")) == sorted(
        p.name for p in (demo_run / "figures").glob("*.png"))


def test_missing_inputs_fail_at_the_first_cell(env, tmp_path):
    import papermill
    from papermill.exceptions import PapermillExecutionError

    empty = tmp_path / "empty-run"
    empty.mkdir()
    with pytest.raises(PapermillExecutionError, match="lacks the inputs of 04_evaluate"):
        papermill.execute_notebook(str(PROJECT_ROOT / "notebooks" / "04_evaluate.ipynb"), str(tmp_path / "o.ipynb"),
                                   parameters={"run_dir": str(empty)}, cwd=str(PROJECT_ROOT / "notebooks"),
                                   kernel_name=PAPERMILL_KERNEL, progress_bar=False)


def test_report_screenshot_is_not_blank(demo_run, tmp_path):
    sys.path.insert(0, str(PROJECT_ROOT / "scripts"))
    from screenshot_report import find_chromium, screenshot

    if find_chromium() is None:
        pytest.skip("headless Chromium not installed (apt-get install chromium)")
    stats = screenshot(demo_run / "report.html", tmp_path / "report.png")
    assert stats["std"] > 10 and stats["non_white"] > 0.02


# a code cell draws a figure when it shows one the steps made, saves one, or embeds a saved one
DRAWS_FIGURE = re.compile(r"figs\[|steps\.show\(|report\.figure\(")


def test_executed_notebooks_show_figures_as_png_with_alt_text(demo_run):
    import nbformat

    drawn = {}
    for path in sorted((demo_run / "notebooks").glob("*.ipynb")):
        assert "<Figure size" not in path.read_text(), f"{path.name}: a figure came out as text"
        notebook = nbformat.read(path, as_version=4)
        cells = [c for c in notebook.cells if c.cell_type == "code" and DRAWS_FIGURE.search(c.source)]
        drawn[path.name] = len(cells)
        for cell in cells:
            pngs = [o for o in cell.outputs if "image/png" in o.get("data", {})]
            assert pngs, f"{path.name}: no image/png output in cell {cell.source!r}"
            assert all(o.metadata["image/png"]["alt"] for o in pngs), f"{path.name}: image without alt text"
    assert drawn == {"01_explore_data.ipynb": 4, "02_zero_shot.ipynb": 0, "03_finetune.ipynb": 1,
                     "04_evaluate.ipynb": 7, "05_report.ipynb": 8}
    # the explorer's picture lives in its ipywidgets Output, saved with the notebook's widget state
    evaluate = nbformat.read(demo_run / "notebooks" / "04_evaluate.ipynb", as_version=4)
    state = evaluate.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    shown = [o for model in state.values() if model["model_name"] == "OutputModel"
             for o in model["state"].get("outputs", [])]
    assert [sorted(o["data"]) for o in shown] == [["image/png", "text/plain"]]
    assert "Zero-shot CLIP on images/" in shown[0]["metadata"]["image/png"]["alt"]
    report_html = (demo_run / "report.html").read_text()
    assert report_html.count("<img") >= 12 and "No description has been provided" not in report_html  # alt kept
