"""The one parameter schema: every refusal, before any work, with one message naming parameter and value."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT

from lageo_utils.cli import main
from lageo_utils.params import PARAMS, ParamError, check_params, check_value, defaults
from lageo_utils.runs import RunError, profile_names, resolve_params
from lageo_utils.training import TrainConfig


@pytest.fixture
def outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("LAGEO_OUTPUTS", str(tmp_path / "outputs"))
    return tmp_path / "outputs"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("epoch", 3, r"unknown parameter 'epoch'; did you mean 'epochs'\?"),
        ("batchsize", 3, r"did you mean 'batch_size'"),
        ("zzz", 3, r"unknown parameter 'zzz' \(`lageo params` lists them all\)"),
        ("epochs", -1, r"epochs must be an integer >= 1, got -1"),
        ("epochs", 2.5, r"epochs must be an integer >= 1, got 2.5"),
        ("epochs", "8", r"epochs must be an integer >= 1, got '8'"),
        ("epochs", True, r"epochs must be an integer >= 1, got True"),
        ("batch_size", 0, r"batch_size must be an integer >= 1, got 0"),
        ("strategy", "bogus", r"unknown strategy 'bogus'; choose one of: zeroshot, text_scale, linear_probe"),
        ("strategy", "linear-probe", r"unknown strategy 'linear-probe' \(did you mean 'linear_probe'\?\)"),
        ("lr", "abc", r"lr must be a number > 0 \| none, got 'abc'"),
        ("lr", 0, r"lr must be a number > 0"),
        ("lr", float("nan"), r"lr must be a number > 0"),
        ("top_k", 0, r"top_k must be an integer >= 1, got 0"),
        ("warmup_fraction", 1.0, r"warmup_fraction must be a number >= 0 and < 1, got 1.0"),
        ("area_normalize", "yes", r"area_normalize must be true \| false, got 'yes'"),
        ("device", "gpu", r"device must be auto \| cpu \| cuda \| cuda:N \| mps, got 'gpu'"),
        ("model", "", r"model must be a non-empty text"),
        ("data_source", None, r"data_source must be demo \| manifest, got None"),
        ("geo_methods", "centroid,retreival",
         r"unknown geo_methods item 'retreival' \(did you mean 'retrieval'\?\); choose one of: centroid, expected"),
        ("geo_methods", ["geocell", "nearest"], r"unknown geo_methods item 'nearest'"),
        ("geo_methods", [], r"geo_methods must list at least one item"),
        ("geo_methods", ["retrieval", "retrieval"], r"geo_methods lists 'retrieval' more than once"),
        ("geo_methods", 3, r"geo_methods must be a list of centroid \| expected"),
        ("geocell_resolutions", [7, 16], r"geocell_resolutions item must be an integer >= 0 and <= 15, got 16"),
        ("geocell_resolutions", "7,x", r"geocell_resolutions item must be an integer >= 0 and <= 15, got 'x'"),
        ("geo_search", "annoy", r"unknown geo_search 'annoy'; choose one of: auto, exact, faiss, faiss-ivf"),
        ("interventions", "grayscale,skymask",
         r"unknown interventions item 'skymask' \(did you mean 'sky_mask'\?\); choose one of: grayscale, blur"),
        ("interventions", ["blur", "blur"], r"interventions lists 'blur' more than once"),
        ("interventions", "sky", r"unknown interventions item 'sky'"),
        ("interventions", {"blur": 1}, r"interventions must be a list of grayscale \| blur .* \(may be empty: none\), got \{.blur.: 1\}"),
    ],
)
def test_refusals_name_the_parameter_and_the_value(name, value, message):
    with pytest.raises(ParamError, match=message):
        check_value(name, value)


def test_values_come_back_in_their_declared_types():
    assert check_params({"lr": "1e-4", "epochs": 3, "pretrained": "none", "patience": None, "device": "cuda:1"}) == {
        "lr": 1e-4, "epochs": 3, "pretrained": None, "patience": None, "device": "cuda:1"}
    assert isinstance(check_value("buffer_m", 50), float)


def test_list_parameters_from_yaml_lists_or_comma_separated_text():
    assert check_value("geo_methods", "retrieval, geocell") == ["retrieval", "geocell"]
    assert check_value("geo_methods", ("centroid",)) == ["centroid"]
    assert check_value("geocell_resolutions", "7,8") == [7, 8]  # items read as YAML, like -p values
    assert defaults()["geocell_resolutions"] == [7, 8] and defaults()["geocell_resolutions"] is not PARAMS[
        "geocell_resolutions"].default
    assert PARAMS["geo_methods"].allowed() == ("list of centroid | expected | retrieval | region_retrieval | geocell | "
                                               "geoclip | geoclip_finetuned")
    params = resolve_params("demo", overrides={"geo_methods": "centroid,retrieval"})
    assert params["geo_methods"] == ["centroid", "retrieval"]


def test_declared_coordinate_choices_are_the_code_s():
    from lageo_utils import geolocate
    from lageo_utils.cli import predict
    from lageo_utils.params import GEO_METHODS, GEO_SEARCH_BACKENDS
    from lageo_utils.runs import MODELS

    assert GEO_METHODS == geolocate.METHODS == predict.METHODS and GEO_SEARCH_BACKENDS == geolocate.SEARCH_BACKENDS
    assert predict.RUN_MODELS == MODELS
    from lageo_utils.params import PARAMS, PEER_METHODS
    from lageo_utils.peers import geoclip
    from lageo_utils.steps import GEOCLIP_METHOD_OF

    assert PEER_METHODS == (geoclip.METHOD, geoclip.FINETUNED_METHOD) == tuple(GEOCLIP_METHOD_OF.values())
    assert PARAMS["geo_methods"].choices == GEO_METHODS + PEER_METHODS


def test_declared_strategy_and_prompt_choices_are_the_code_s():
    from lageo_utils import prompts, training
    from lageo_utils.params import PROMPT_VARIANTS, STRATEGIES

    assert PROMPT_VARIANTS == tuple(prompts.PROMPT_VARIANTS) and STRATEGIES == training.STRATEGIES


def test_declared_interventions_are_the_probing_module_s_and_may_be_empty():
    from lageo_utils import probing
    from lageo_utils.params import INTERVENTIONS

    assert INTERVENTIONS == tuple(probing.INTERVENTIONS)
    assert defaults()["interventions"] == [] and check_value("interventions", []) == []
    assert check_value("interventions", "") == [] and check_value("interventions", "hflip, blur") == ["hflip", "blur"]
    assert resolve_params("demo")["interventions"] == []
    assert resolve_params("demo-compare")["interventions"] == list(INTERVENTIONS) == resolve_params("la")["interventions"]
    from lageo_utils.cli.run import parse_overrides

    for off in ("[]", "", "none"):  # -p interventions [] (or "" or none)
        assert resolve_params("demo-compare", overrides=parse_overrides([["interventions", off]]))["interventions"] == []
    with pytest.raises(ParamError, match="geo_methods must list at least one item"):  # other lists stay non-empty
        check_value("geo_methods", "")


def test_every_default_and_profile_value_passes_the_schema():
    assert check_params(defaults()) == defaults()
    for profile in profile_names():
        params = resolve_params(profile)
        assert set(params) == set(PARAMS), profile
        assert check_params(params) == params


def test_profiles_config_and_overrides_are_all_checked(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("epoch: 3\n")
    with pytest.raises(RunError, match=r"config file .*c.yaml: unknown parameter 'epoch'; did you mean 'epochs'"):
        resolve_params("demo", config)
    config.write_text("lr: 1e-4\n")  # YAML 1.1 reads this as text: still a number
    assert resolve_params("demo", config)["lr"] == 1e-4
    config.write_text("- epochs\n")
    with pytest.raises(RunError, match="must be a YAML mapping"):
        resolve_params("demo", config)
    with pytest.raises(RunError, match=r"-p: unknown strategy .lora-ish."):
        resolve_params("demo", overrides={"strategy": "lora-ish"})


def test_train_config_goes_through_the_schema():
    with pytest.raises(ParamError, match="patience must be an integer >= 1 | none, got 0"):
        TrainConfig(patience=0)
    assert TrainConfig(lr="0.01", pretrained="none").lr == 0.01


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-p", "epoch", "3"], "unknown parameter 'epoch'; did you mean 'epochs'?"),
        (["-p", "epochs", "-1"], "epochs must be an integer >= 1, got -1"),
        (["-p", "batch_size", "0"], "batch_size must be an integer >= 1, got 0"),
        (["-p", "strategy", "bogus"], "unknown strategy 'bogus'"),
        (["-p", "lr", "abc"], "lr must be a number > 0 | none, got 'abc'"),
        (["-p", "top_k", "0"], "top_k must be an integer >= 1, got 0"),
        (["-p", "top_k", "16"], "top_k must be <= the number of regions (15), got 16"),
        (["-p", "nproc", "3"], "batch_size must be a multiple of nproc (3), got 32"),
        (["-p", "model", "ViT-B32"], "unknown model 'ViT-B32'; did you mean 'ViT-B-32'"),
        (["-p", "pretrained", "/no/such/weights.pt", "-p", "model", "ViT-B-32"], "the checkpoint file does not exist"),
        (["--profile", "la"], "are not in the Hugging Face cache and HF_HUB_OFFLINE is set"),
        (["--profile", "nope"], "unknown profile 'nope'"),
    ],
)
def test_lageo_run_refuses_at_once_and_writes_nothing(outputs, capsys, args, message):
    argv = ["run", *args] if args[0] == "--profile" else ["run", "--profile", "demo", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 5  # one message (the weights one carries its two fixes)
    assert not outputs.exists() or not any(outputs.rglob("*"))


def test_lageo_run_la_without_weights_names_both_fixes(outputs, capsys):
    assert main(["run", "--profile", "la"]) == 2
    err = capsys.readouterr().err
    assert "WeightsUnavailableError" not in err and "LAGEO_CLIP_WEIGHTS" in err and "--pretrained" in err
    assert not outputs.exists()


def test_lageo_run_refuses_a_manifest_problem_before_any_notebook(outputs, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.csv").write_text("image_path,latitude,longitude\na.jpg,34.05,-118.25\na.jpg,34.05,-118.25\n")
    code = main(["run", "--profile", "la", "-p", "model", "lageo-tiny", "-p", "pretrained", "none",
                 "-p", "data_dir", str(data)])
    assert code == 2
    assert "repeated image_path values, e.g. 'a.jpg' in data rows [1, 2]" in capsys.readouterr().err
    assert not outputs.exists()


def test_lageo_params_prints_the_schema_with_profile_values(capsys):
    assert main(["params"]) == 0
    out = capsys.readouterr().out
    for name in PARAMS:
        assert name in out
    header = out.splitlines()[0].split()
    assert header[:3] == ["name", "allowed", "default"] and set(profile_names()) <= set(header)
    assert main(["params", "--profile", "la", "--json"]) == 0
    import json

    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["strategy"]["la"] == "contrastive" and rows["epochs"]["allowed"] == "integer >= 1"


def test_readme_parameter_section_is_the_schema_table(capsys):
    assert main(["params", "--markdown"]) == 0
    table = capsys.readouterr().out.strip()
    assert table in (PROJECT_ROOT / "README.md").read_text(), "README's parameter table is stale: lageo params --markdown"


def test_a_notebook_run_by_hand_checks_its_parameters_in_its_first_cell(tmp_path):
    """``papermill 03_finetune.ipynb out.ipynb -p epochs abc`` stops at open_step, before any run is touched."""
    out = tmp_path / "out.ipynb"
    env = {**os.environ, "LAGEO_OUTPUTS": str(tmp_path / "outputs")}
    result = subprocess.run(
        [sys.executable, "-m", "papermill", str(PROJECT_ROOT / "notebooks" / "03_finetune.ipynb"), str(out),
         "-p", "epochs", "abc", "--cwd", str(PROJECT_ROOT / "notebooks")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode != 0
    assert "ParamError: epochs must be an integer >= 1, got 'abc'" in result.stderr
    assert not Path(env["LAGEO_OUTPUTS"]).exists()


def test_lageo_run_refuses_a_region_file_without_descriptions(outputs, tmp_path, capsys):
    import json

    doc = json.loads((PROJECT_ROOT / "regions" / "la_county_regions.geojson").read_text())
    del doc["features"][1]["properties"]["description"]
    regions_file = tmp_path / "regions.geojson"
    regions_file.write_text(json.dumps(doc))
    assert main(["run", "--profile", "demo", "-p", "regions", str(regions_file)]) == 2
    name = doc["features"][1]["properties"]["id"]
    assert f"region {name!r} has no 'description', which the prompt template needs" in capsys.readouterr().err
    assert not outputs.exists()


def test_lageo_run_refuses_unknown_training_regions_and_only_text_side_strategies_on_image_only_backbones(
        outputs, capsys):
    assert main(["run", "--profile", "demo", "-p", "train_regions", "downtown_la,atlantis"]) == 2
    assert "train_regions ['atlantis'] are not in the region file" in capsys.readouterr().err
    assert main(["run", "--profile", "demo", "-p", "model", "timm:lageo-tiny-dinov2", "-p", "strategies",
                 "zeroshot,contrastive"]) == 2
    assert ("'timm:lageo-tiny-dinov2' is image-only (no text tower) and strategies ['zeroshot', 'contrastive'] are "
            "all text-side: choose at least one of linear_probe, partial, lora, full") in capsys.readouterr().err
    # image-only weights are checked before any work, as CLIP's are (the tests run with HF_HUB_OFFLINE)
    assert main(["run", "--profile", "demo", "-p", "model", "timm:vit_small_patch14_dinov2", "-p", "pretrained",
                 "lvd142m"]) == 2
    err = capsys.readouterr().err
    assert "Weights for 'timm:vit_small_patch14_dinov2' are unavailable" in err and "Fix it in one of two ways" in err
    assert not outputs.exists()
