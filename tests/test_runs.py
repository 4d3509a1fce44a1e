import json

import pytest
import yaml

from lageo_utils.cli.run import parse_overrides
from lageo_utils.runs import (
    RunError,
    fork_run,
    mark_latest,
    new_run_dir,
    read_params,
    resolve_params,
    resolve_run_dir,
    start_step,
    write_params,
)


@pytest.fixture
def outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("LAGEO_OUTPUTS", str(tmp_path / "outputs"))
    return tmp_path / "outputs"


def test_run_dirs_are_new_and_named_by_utc_time(outputs):
    a, b = new_run_dir(), new_run_dir()
    assert a != b and a.parent == b.parent == outputs / "runs"
    assert a.name[:8].isdigit() and a.name[8] == "T" and a.name[15] == "Z"


def test_params_precedence_profile_config_overrides(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("epochs: 3\nlr: 0.001\n")
    params = resolve_params("demo", config, {"lr": 0.01})
    assert params["epochs"] == 3 and params["lr"] == 0.01 and params["model"] == "lageo-tiny"
    assert resolve_params("la")["pretrained"] == "openai"
    with pytest.raises(RunError, match="unknown profile 'nope'"):
        resolve_params("nope")


def test_secret_like_params_are_refused():
    with pytest.raises(RunError, match="look like secrets"):
        resolve_params("demo", overrides={"GOOGLE_MAPS_API_KEY": "AIza-not-real"})


def test_parse_overrides_types():
    assert parse_overrides([["epochs", "8"], ["lr", "1e-4"], ["pretrained", "none"], ["area_normalize", "true"]]) == {
        "epochs": 8, "lr": 1e-4, "pretrained": None, "area_normalize": True}


def test_missing_inputs_name_the_file_and_its_maker(outputs):
    run = new_run_dir()
    write_params(run, {"model": "m"})
    with pytest.raises(RunError, match=r"lacks the inputs of 03_finetune: data.json \(made by 01_explore_data\)"):
        start_step("03_finetune", run)


def test_latest_and_forking_never_modify_a_finished_run(outputs):
    run = new_run_dir()
    write_params(run, {"epochs": 8})
    for name in ("data.json", "train.csv", "val.csv", "test.csv", "manifest.csv", "audit.json"):
        (run / name).write_text(name)
    for name in ("history.csv", "train_summary.json", "strategies.json", "predictions_finetuned.parquet",
                 "predictions_zeroshot.parquet", "coordinates_zeroshot.parquet", "coordinates_finetuned.parquet"):
        (run / name).write_text(name)
    for model in ("zeroshot", "finetuned"):  # locators are folders
        (run.locator(model)).mkdir(parents=True)
        (run.locator(model) / "locator.json").write_text(model)
    (run / "figures").mkdir()
    (run / "figures" / "01_regions_map.png").write_bytes(b"png")
    (run / "figures" / "04_confusion_finetuned.png").write_bytes(b"png")
    mark_latest(run)
    assert resolve_run_dir(None) == run.resolve()

    child = start_step("03_finetune", None)  # 03 already ran here: fork
    assert child != run and (run / "history.csv").read_text() == "history.csv"
    assert (child / "train.csv").read_text() == "train.csv" and not (child / "history.csv").exists()
    assert (child.locator("zeroshot") / "locator.json").read_text() == "zeroshot"  # step 02's folder, copied
    assert not child.locator("finetuned").exists() and not child.coordinates("finetuned").exists()
    assert (child / "figures" / "01_regions_map.png").exists()
    assert not (child / "figures" / "04_confusion_finetuned.png").exists()  # drawn from models the child lacks
    doc = yaml.safe_load((child / "params.yaml").read_text())
    assert doc["parent_run"] == run.name and read_params(child) == {"epochs": 8}

    fresh = new_run_dir()
    write_params(fresh, {})
    for name in ("data.json", "train.csv", "val.csv", "test.csv"):
        (fresh / name).write_text("x")
    assert start_step("03_finetune", fresh) == fresh  # nothing to protect: same run
    (fresh / "history.csv").write_text("stopped part-way")
    assert start_step("03_finetune", fresh) == fresh  # an unfinished step continues in place


def test_resolve_run_dir_errors(outputs):
    with pytest.raises(RunError, match="no run yet"):
        resolve_run_dir(None)
    with pytest.raises(RunError, match="does not exist"):
        resolve_run_dir(outputs / "runs" / "missing")


def test_fork_copies_checkpoints_only_after_training(outputs):
    run = new_run_dir()
    write_params(run, {})
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "best.pt").write_bytes(b"w")
    (run / "metrics.json").write_text(json.dumps({}))
    assert not (fork_run(run, "03_finetune") / "checkpoints").exists()
    assert (fork_run(run, "05_report") / "checkpoints" / "best.pt").exists()


def test_probing_runs_before_the_report_only_when_interventions_are_set(outputs):
    from lageo_utils.runs import STEPS, step_wanted

    assert STEPS == ["01_explore_data", "02_zero_shot", "03_finetune", "04_evaluate", "06_probing", "05_report"]
    assert not step_wanted("06_probing", {"interventions": []})
    assert step_wanted("06_probing", {"interventions": ["hflip"]}) and step_wanted("05_report", {"interventions": []})
    run = new_run_dir()
    write_params(run, {})
    (run / "metrics.json").write_text("{}")
    (run / "probing.json").write_text("{}")
    (run / "figures").mkdir()
    (run / "figures" / "06_interventions.png").write_bytes(b"png")
    with pytest.raises(RunError, match=r"lacks the inputs of 06_probing: .*strategies.json \(made by 03_finetune\)"):
        start_step("06_probing", run)
    report_fork = fork_run(run, "05_report")  # `lageo report` keeps the probing results the report shows
    assert (report_fork / "probing.json").exists() and (report_fork / "figures" / "06_interventions.png").exists()
    probing_fork = fork_run(run, "06_probing")  # probing again: a new run without the old results
    assert not (probing_fork / "probing.json").exists() and not (probing_fork / "figures").exists()
