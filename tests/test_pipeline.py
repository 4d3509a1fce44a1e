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
# The seed trained on 9 regions and scored 15: these are the 9 with test images in the seed's report.
SEED_TRAINED = "downtown_la,hollywood,beverly_hills,santa_monica,venice_beach,griffith_park,koreatown,pasadena,long_beach"
REDUCED = ["-p", "demo_points_per_region", "3", "-p", "epochs", "2", "-p", "n_boot", "50", "-p", "demo_image_size", "96",
           "-p", "strategies", "linear_probe,text_scale,partial", "-p", "train_regions", SEED_TRAINED,
           "-p", "wise_alphas", "0,0.5,1"]
METRIC_KEYS = {"n_images", "accuracy", "precision_macro", "recall_macro", "f1_macro", "precision_weighted",
               "recall_weighted", "f1_weighted", "acc_at_km", "median_error_km", "mean_error_km", "ece", "per_region"}
REPORT_SECTIONS = ["Model comparison", "Per-region classification report", "Confusion matrices", "Maps",
                   "Training", "Calibration", "Example predictions (top-3)", "Coordinates: where exactly",
                   "Strategies side by side", "Trained and untrained regions", "Prompt variants",
                   "Data and leakage audit", "Run"]
METHODS = ["centroid", "expected", "retrieval", "region_retrieval", "geocell"]
COORDINATE_KEYS = {"n_images", "acc_at_km", "acc_at_km_ci95", "median_error_km", "median_error_km_ci95",
                   "per_capture_point"}


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


@pytest.fixture(scope="module")
def probing_result(demo_run, env):
    """The same run with probing on (step 06): also the second run of test_same_seed_same_numbers."""
    return lageo("run", "--profile", "demo", *REDUCED, "-p", "interventions", "grayscale,sky_mask", env=env)


@pytest.fixture(scope="module")
def probing_run(probing_result):
    return Path(re.search(r"run complete: (\S+)", probing_result.stdout).group(1))


def test_terminal_output_is_one_line_per_step(demo_result):
    lines = demo_result.stderr.strip().splitlines()
    assert all(line.startswith("INFO lageo_utils.pipeline: ") for line in lines), lines
    assert sum(line.endswith(" s") and ": done in " in line for line in lines) == 5
    assert "Kernel is running over TCP" not in demo_result.stderr and "open_clip" not in demo_result.stderr


def test_kernel_process_output_goes_to_the_kernel_log_not_the_terminal(tmp_path, capfd):
    """What a kernel writes outside any cell (its own log, native libraries) must not break the one line per step."""
    import nbformat
    from nbclient import NotebookClient
    from traitlets.config import Config

    from lageo_utils.pipeline import LoggedKernelManager

    log_file = tmp_path / "step.kernel.log"
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import os\nos.write(1, b'native stdout\\n')\nos.write(2, b'native stderr\\n')\nprint('cell output')")])
    client = NotebookClient(notebook, kernel_name=PAPERMILL_KERNEL, kernel_manager_class=LoggedKernelManager,
                            config=Config({"LoggedKernelManager": {"kernel_log": str(log_file)}}))
    client.execute()
    assert notebook.cells[0].outputs[0]["text"] == "cell output\n"  # cell output still reaches the notebook
    assert "native stdout" in log_file.read_text() and "native stderr" in log_file.read_text()
    captured = capfd.readouterr()
    assert "native" not in captured.out and "native" not in captured.err


@pytest.mark.parametrize(("ending", "error"), [("os.kill(os.getpid(), signal.SIGKILL)", "DeadKernelError"),
                                               ("time.sleep(60)", "CellTimeoutError")])
def test_a_kernel_that_dies_or_stalls_fails_the_step_and_names_its_log(tmp_path, monkeypatch, ending, error):
    import nbformat

    from lageo_utils import pipeline

    parameters = nbformat.v4.new_code_cell("run_dir = None", metadata={"tags": ["parameters"]})
    last = nbformat.v4.new_code_cell(f"import os, signal, time\nos.write(2, b'last words\\n')\n{ending}")
    kernelspec = {"name": PAPERMILL_KERNEL, "language": "python", "display_name": "Python 3"}
    nbformat.write(nbformat.v4.new_notebook(cells=[parameters, last], metadata={"kernelspec": kernelspec}),
                   tmp_path / "99_ends.ipynb")
    monkeypatch.setattr(pipeline, "NOTEBOOKS_DIR", tmp_path)
    monkeypatch.setenv(pipeline.CELL_TIMEOUT_ENV, "5")
    run = tmp_path / "run"
    with pytest.raises(pipeline.StepFailed, match=f"99_ends.ipynb: {error}") as failure:
        pipeline.run_step("99_ends", run, {})
    kernel_log = run / "notebooks" / "99_ends.kernel.log"
    assert f"kernel log: {kernel_log}" in str(failure.value) and "last words" in kernel_log.read_text()


def test_run_directory_has_every_file(demo_run, env):
    outputs = Path(env["LAGEO_OUTPUTS"])
    assert demo_run.parent == outputs / "runs"
    assert (outputs / "latest").resolve() == demo_run.resolve()
    for name in ["params.yaml", "manifest.csv", "train.csv", "val.csv", "test.csv", "audit.json", "data.json",
                 "predictions_zeroshot.parquet", "predictions_finetuned.parquet", "metrics.json", "history.csv",
                 "train_summary.json", "checkpoints/linear_probe/best.pt", "checkpoints/partial/last.pt", "report.html",
                 "strategies.json", "predictions_strategy_partial_wise.parquet", "predictions_prompt_visual.parquet",
                 "coordinates_zeroshot.parquet", "coordinates_finetuned.parquet", "locator/zeroshot/locator.json",
                 "locator/zeroshot/gallery.npz", "locator/finetuned/locator.json", "locator/finetuned/geocell.pt",
                 "figures/04_coordinate_errors.png", "figures/04_risk_coverage.png", "figures/04_neighbours.png"]:
        assert (demo_run / name).is_file(), name
    executed = sorted(p.name for p in (demo_run / "notebooks").glob("*.ipynb"))
    assert executed == ["01_explore_data.ipynb", "02_zero_shot.ipynb", "03_finetune.ipynb", "04_evaluate.ipynb",
                        "05_report.ipynb"]
    kernel_logs = sorted(p.name for p in (demo_run / "notebooks").glob("*.kernel.log"))
    assert kernel_logs == [name.replace(".ipynb", ".kernel.log") for name in executed]
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
    assert {"methods", "ceilings", "baselines", "risk_coverage", "paired_vs_centroid"} <= metrics.keys()
    for key in ("zeroshot", "finetuned"):
        assert list(metrics["methods"][key]) == METHODS
        for method, summary in metrics["methods"][key].items():
            assert COORDINATE_KEYS <= summary.keys(), method
            assert set(summary["acc_at_km"]) == {"0.025", "0.1", "0.5", "1", "5", "10", "25"}
            lo, hi = summary["median_error_km_ci95"]
            assert lo <= summary["median_error_km"] <= hi
        # centroid answers are the predictions table's: the coordinate metrics agree with the region metrics
        assert metrics["methods"][key]["centroid"]["median_error_km"] == pytest.approx(metrics[key]["median_error_km"])
        assert list(metrics["paired_vs_centroid"][key]) == METHODS[1:]
        assert set(metrics["risk_coverage"][key]) == set(METHODS)
    assert {"centroid", "retrieval", "geocell"} <= metrics["ceilings"].keys()
    assert {"chance", "majority_region", "fixed_point", "random_gallery_image"} <= metrics["baselines"].keys()
    # linear_probe keeps the encoder: the fine-tuned model reuses zero-shot's gallery, retrieval and geocell settings
    settings = metrics["coordinate_settings"]
    assert settings["finetuned"]["retrieval"] == settings["zeroshot"]["retrieval"]
    assert metrics["methods"]["finetuned"]["retrieval"] == metrics["methods"]["zeroshot"]["retrieval"]


def test_strategies_side_by_side_with_trained_and_untrained_regions(demo_run):
    metrics = json.loads((demo_run / "metrics.json").read_text())
    strategies = metrics["strategies"]
    assert list(strategies) == ["linear_probe", "text_scale", "partial"]
    assert strategies["linear_probe"]["accuracy"] == metrics["finetuned"]["accuracy"]  # the first is 'finetuned'
    assert strategies["text_scale"]["trainable_params"] == 16  # a scale and a bias per region (15)
    for m in strategies.values():
        assert METRIC_KEYS <= m.keys() and {"difference", "ci"} <= m["paired_vs_zeroshot"].keys()
    wise = strategies["partial"]["wise_ft"]
    assert [row["alpha"] for row in wise["grid"]] == [0.0, 0.5, 1.0] and wise["alpha"] in (0.0, 0.5, 1.0)
    assert strategies["linear_probe"]["wise_ft"] is None  # its encoder did not change
    trained = set(SEED_TRAINED.split(","))
    for model, parts in metrics["regions_breakdown"].items():
        assert set(parts["trained"]["regions"]) <= trained, model
        assert not set(parts["untrained"]["regions"]) & trained
        assert 0 <= parts["untrained"]["pulled_into_trained"] <= 1
    for model, calibration in metrics["calibration"].items():
        assert calibration["temperature"] > 0 and calibration["ece"] >= 0, model
    assert list(metrics["prompts"]) == ["name", "seed", "visual", "ensemble"]
    history = pd.read_csv(demo_run / "checkpoints" / "partial" / "history.csv")
    assert len(history) == 2


def test_coordinate_answers_every_method_per_image_and_voted(demo_run):
    from lageo_utils.geolocate import load_locator

    test, train = pd.read_csv(demo_run / "test.csv"), pd.read_csv(demo_run / "train.csv")
    for key in ("zeroshot", "finetuned"):
        table = pd.read_parquet(demo_run / f"coordinates_{key}.parquet")
        counts = table.groupby(["method", "voted"]).size()
        assert set(counts.index) == {(m, v) for m in METHODS for v in (False, True)} and set(counts) == {len(test)}
        assert set(table["image_path"]) == set(test["image_path"])
        voted = table[table["voted"]]
        assert (voted.groupby(["method", "location_id"])["pred_lat"].nunique() == 1).all()
        gallery = load_locator(demo_run / "locator" / key).gallery
        assert sorted(gallery.paths) == sorted(train["image_path"])  # the gallery is the training split, nothing else
    predictions = pd.read_parquet(demo_run / "predictions_finetuned.parquet")
    centroid = table[(table["method"] == "centroid") & ~table["voted"]]
    assert np.allclose(centroid["error_km"], predictions["error_km"])


def test_coordinate_settings_see_the_validation_split_only(demo_run, tmp_path, monkeypatch):
    """Re-fit the zero-shot locator on a copy of the run, recording what fit_locator is given."""
    import shutil

    from lageo_utils import geolocate, steps
    from lageo_utils.predict import GeoPredictor
    from lageo_utils.runs import RunDir, read_params

    run = RunDir(tmp_path / "run")
    shutil.copytree(demo_run, run)
    params = read_params(run)
    seen = {}

    def spy(centroids, gallery, val_embeddings, val_probs, val_lat, val_lon, **kwargs):
        seen.update(gallery=list(gallery.paths), val_lat=np.asarray(val_lat), n_val=len(val_embeddings))
        return real(centroids, gallery, val_embeddings, val_probs, val_lat, val_lon, **kwargs)

    real = geolocate.fit_locator
    monkeypatch.setattr(geolocate, "fit_locator", spy)
    monkeypatch.setenv("LAGEO_OUTPUTS", str(demo_run.parent.parent))  # the run's embedding cache
    model, preprocess, tokenizer = steps.load_model(params)
    predictor = GeoPredictor(model, preprocess, tokenizer, steps.regions_of(params), device="cpu",
                             model_name=params["model"])
    embedded = steps.embed_splits(run, params, predictor)
    predictor.temperature = steps.fit_validation_temperature(run, predictor, embedded["val"])  # as step 02 does
    steps.locate(run, params, predictor, "zeroshot", embedded)
    val, test = pd.read_csv(run / "val.csv"), pd.read_csv(run / "test.csv")
    assert np.array_equal(seen["val_lat"], val["latitude"]) and seen["n_val"] == len(val)
    assert not set(seen["gallery"]) & (set(val["image_path"]) | set(test["image_path"]))
    before = pd.read_parquet(demo_run / "coordinates_zeroshot.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(run / "coordinates_zeroshot.parquet"), before)  # same seed


def test_lageo_predict_answers_with_the_run_s_gallery(demo_run, capsys):
    from lageo_utils.cli import main

    image_root = Path(json.loads((demo_run / "data.json").read_text())["image_root"])
    image = pd.read_csv(demo_run / "test.csv")["image_path"].iloc[0]
    assert main(["predict", str(image_root / image), "--method", "retrieval", "--run", str(demo_run)]) == 0
    [answer] = json.loads(capsys.readouterr().out)
    assert answer["method"] == "retrieval" and answer["model"] == "finetuned"
    table = pd.read_parquet(demo_run / "coordinates_finetuned.parquet")
    expected = table[(table["method"] == "retrieval") & ~table["voted"] & (table["image_path"] == image)].iloc[0]
    assert (answer["lat"], answer["lon"]) == pytest.approx((expected["pred_lat"], expected["pred_lon"]), abs=1e-6)
    assert [Path(n["path"]).relative_to(image_root).as_posix() for n in answer["neighbours"]] == list(
        expected["neighbours"])
    assert {"path", "lat", "lon", "similarity"} == set(answer["neighbours"][0])

    assert main(["predict", str(image_root / image), "--method", "centroid", "--model", "lageo-tiny",
                 "--pretrained", "none"]) == 0  # without --run: the seed's output
    [seed_output] = json.loads(capsys.readouterr().out)
    assert set(seed_output) == {"image", "top_regions", "top_pred_gps", "top_pred_prob"}

    assert main(["predict", str(image_root / image), "--method", "geocell"]) == 2
    assert "--method geocell answers from a run's gallery" in capsys.readouterr().err
    assert main(["predict", str(image_root / image), "--run", str(demo_run), "--model", "ViT-B-32"]) == 2
    assert "--model names the run's model: zeroshot or finetuned" in capsys.readouterr().err


def test_lageo_predict_refuses_a_run_without_a_locator(demo_run, tmp_path, capsys):
    from lageo_utils.cli import main

    old = tmp_path / "old-run"
    old.mkdir()
    (old / "params.yaml").write_bytes((demo_run / "params.yaml").read_bytes())
    assert main(["predict", "x.jpg", "--method", "retrieval", "--run", str(old)]) == 2
    assert "has no fitted locator for the finetuned model" in capsys.readouterr().err


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


def test_same_seed_same_numbers(demo_run, probing_run):
    run2 = probing_run  # the same parameters and probing, which changes none of the other results
    assert run2 != demo_run
    m1 = json.loads((demo_run / "metrics.json").read_text())
    m2 = json.loads((run2 / "metrics.json").read_text())
    for key in ("zeroshot", "finetuned", "methods", "ceilings", "baselines", "paired_vs_centroid"):
        assert m1[key] == m2[key], key
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
    # seed 7 (the demo's is 42): resumed below, it is the second run of the lageo compare test
    result = lageo("run", "--profile", "demo", *REDUCED, "-p", "strategy", "partial", "-p", "unfreeze_blocks", "99",
                   "-p", "seed", "7", env=env, check=False)
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


def test_compare_shows_two_demo_runs_with_different_seeds(demo_run, env, tmp_path):
    from lageo_utils.runs import read_params

    runs = [p for p in (Path(env["LAGEO_OUTPUTS"]) / "runs").iterdir() if (p / "metrics.json").exists()]
    other = next(p for p in runs if read_params(p)["seed"] == 7)  # the resumed run of the test above
    assert read_params(demo_run)["seed"] == 42
    lageo("compare", str(demo_run), str(other), "--out", str(tmp_path / "cmp"), "--n-boot", "50", env=env)
    rows = pd.read_csv(tmp_path / "cmp" / "comparison.csv")
    assert set(rows["run"]) == {demo_run.name, other.name}
    regions = rows[rows["method"] == "region (centroid)"]  # one accuracy row per run and model, then coordinates
    assert sorted(zip(regions["run"], regions["model"])) == sorted(
        (r.name, m) for r in (demo_run, other) for m in ("finetuned", "zeroshot"))
    assert regions["accuracy_ci95"].notna().all() and rows["median_error_km_ci95"].notna().all()
    html = (tmp_path / "cmp" / "comparison.html").read_text()
    assert "Parameters that differ" in html and "<th>seed</th>" in html and demo_run.name in html


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
                     "04_evaluate.ipynb": 9, "05_report.ipynb": 11}
    # the explorer's picture lives in its ipywidgets Output, saved with the notebook's widget state
    evaluate = nbformat.read(demo_run / "notebooks" / "04_evaluate.ipynb", as_version=4)
    state = evaluate.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    shown = [o for model in state.values() if model["model_name"] == "OutputModel"
             for o in model["state"].get("outputs", [])]
    assert [sorted(o["data"]) for o in shown] == [["image/png", "text/plain"]]
    assert "Zero-shot CLIP on images/" in shown[0]["metadata"]["image/png"]["alt"]
    report_html = (demo_run / "report.html").read_text()
    assert report_html.count("<img") >= 12 and "No description has been provided" not in report_html  # alt kept


def test_report_says_retrieval_is_leaky_beside_image_split_numbers(demo_run):
    from lageo_utils import report

    metrics = json.loads((demo_run / "metrics.json").read_text())
    leaky = report.coordinate_markdown(metrics, {"split_strategy": "image"})
    assert "Retrieval is leaky under the image-level split" in leaky and "other headings of a test panorama" in leaky
    honest = report.coordinate_markdown(metrics, {"split_strategy": "location", "buffer_m": 0.0})
    assert "leaky" not in honest and "test images have a training image within 1 m" in honest
    table = report.coordinate_table(metrics)
    assert {"Ceiling", "Baseline", "Fine-tuned CLIP", "Fine-tuned CLIP, voted per capture point"} <= set(
        table.index.get_level_values(0))
    assert list(table.columns[:4]) == ["ACC@25 m", "ACC@100 m", "ACC@500 m", "ACC@1 km"]


PROBING_KEYS = {"split", "interventions", "skipped", "text_found", "models", "bootstrap"}
REGRESSION_KEYS = {"effects", "lr_tests", "interaction", "n_rows", "n_clusters", "clustered_by", "ci_level",
                   "dropped_regions", "separated_cells", "warnings"}


def test_probing_runs_before_the_report_and_writes_probing_json(probing_result, probing_run):
    lines = probing_result.stderr.splitlines()
    assert lines.index("INFO lageo_utils.pipeline: running 06_probing") < lines.index(
        "INFO lageo_utils.pipeline: running 05_report")
    doc = json.loads((probing_run / "probing.json").read_text())
    assert doc.keys() == PROBING_KEYS and doc["split"] == "val" and doc["skipped"] == {}
    assert list(doc["interventions"]) == ["grayscale", "sky_mask"] and doc["text_found"] is None
    assert doc["interventions"]["sky_mask"]["settings"]["fraction"] == pytest.approx(1 / 3)
    assert doc["bootstrap"] == {"n_boot": 50, "seed": 42, "ci_level": 0.95}
    assert list(doc["models"]) == ["zeroshot", "linear_probe", "text_scale", "partial"]  # every strategy
    val = pd.read_csv(probing_run / "val.csv")
    for model, result in doc["models"].items():
        drops = pd.DataFrame(result["drops"])
        assert list(drops["intervention"]) == ["grayscale", "sky_mask"] and set(drops["n_images"]) == {len(val)}
        assert drops["accuracy_original"].nunique() == 1  # the same original images for every intervention
        assert np.allclose(drops["accuracy_drop"], drops["accuracy_original"] - drops["accuracy"])
        assert (drops["accuracy_drop_lo"] <= drops["accuracy_drop"]).all()
        assert (drops["accuracy_drop"] <= drops["accuracy_drop_hi"]).all()
        per_region = pd.DataFrame(result["per_region"])
        assert set(per_region["region"]) == set(val["region_id"]) and per_region["n_images"].sum() == 2 * len(val)
        regression = result["regression"]
        if "not_fitted" in regression:  # the reduced demo's models may answer one region for every image
            assert (drops["accuracy_drop"] == 0).all() and "nothing to regress" in regression["not_fitted"], model
        else:
            assert REGRESSION_KEYS <= regression.keys(), model
            assert [e["intervention"] for e in regression["effects"]] == ["grayscale", "sky_mask"]
    for name in ("06_interventions", "06_region_drops_zeroshot", "06_region_drops_partial"):
        assert np.asarray(Image.open(probing_run / "figures" / f"{name}.png").convert("L")).std() > 5, name


def test_report_shows_what_the_model_relies_on(probing_run):
    import nbformat

    html = (probing_run / "report.html").read_text()
    section = html[html.index('<h2 id="What-the-model-relies-on">'):html.index('<h2 id="Data-and-leakage-audit">')]
    assert "Accuracy drop [CI]" in section and "sky_mask" in section
    assert "p (LR test)" in section or "Fine-tuned CLIP: no regression" in section
    assert "Probing was not run" not in section
    assert section.count("<img") == 1 + 4  # the thumbnails and one heatmap per model: zero-shot and 3 strategies
    executed = nbformat.read(probing_run / "notebooks" / "05_report.ipynb", as_version=4)
    [cell] = [c for c in executed.cells if "report.probing_figures" in c.source]
    pngs = [o for o in cell.outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 1 + 4 and all(o.metadata["image/png"]["alt"] for o in pngs)
    assert (probing_run / "notebooks" / "06_probing.ipynb").is_file()


def test_without_interventions_probing_is_skipped_and_the_report_says_so(demo_result, demo_run):
    assert "INFO lageo_utils.pipeline: 06_probing: skipped (interventions is empty)" in demo_result.stderr
    assert not (demo_run / "probing.json").exists() and not list((demo_run / "figures").glob("06_*"))
    assert not (demo_run / "notebooks" / "06_probing.ipynb").exists()
    html = (demo_run / "report.html").read_text()
    assert '<h2 id="What-the-model-relies-on">' in html
    assert "Probing was not run" in html and "-p interventions grayscale" in html
