"""Project hygiene: pins agree, notebooks are committed without outputs."""

import json
import tomllib

import yaml
from conftest import PROJECT_ROOT


def _pyproject():
    return tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())


def test_environment_yml_pins_match_pyproject():
    project = _pyproject()["project"]
    wanted = set(project["dependencies"]) | {d for extra in project["optional-dependencies"].values() for d in extra}
    env = yaml.safe_load((PROJECT_ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert {p for p in pip_section if not p.startswith("-e")} == wanted
    assert all("==" in d for d in wanted), "every dependency is pinned exactly"


def test_notebooks_are_committed_without_outputs():
    notebooks = sorted((PROJECT_ROOT / "notebooks").glob("*.ipynb"))
    for path in notebooks:
        nb = json.loads(path.read_text())
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                assert not cell.get("outputs") and cell.get("execution_count") is None, path.name
