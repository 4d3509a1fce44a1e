"""Run directories: creation, parameters, provenance, the ``latest`` pointer and step inputs.

A run directory ``outputs/runs/<UTC timestamp>-<short id>/`` holds every file of one run
(see README, "Run directory"). A step never writes into a run where that step already ran:
re-running a notebook on a finished run forks a new run that starts from the parent's
inputs, so earlier results are never modified.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import platform
import re
import secrets
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import yaml

from lageo_utils.regions import PROJECT_ROOT

PROFILES_DIR = Path(__file__).parent / "profiles"
SECRET_PATTERN = re.compile(r"key|token|secret|password", re.IGNORECASE)

# What each notebook step reads and writes inside the run directory.
STEP_INPUTS: dict[str, list[str]] = {
    "01_explore_data": [],
    "02_zero_shot": ["params.yaml", "data.json", "test.csv"],
    "03_finetune": ["params.yaml", "data.json", "train.csv", "val.csv", "test.csv"],
    "04_evaluate": ["params.yaml", "data.json", "predictions_zeroshot.parquet", "predictions_finetuned.parquet"],
    "05_report": ["params.yaml", "metrics.json"],
}
STEP_OUTPUTS: dict[str, list[str]] = {
    "01_explore_data": ["manifest.csv", "train.csv", "val.csv", "test.csv", "audit.json", "data.json"],
    "02_zero_shot": ["predictions_zeroshot.parquet"],
    "03_finetune": ["history.csv", "train_summary.json", "predictions_finetuned.parquet"],
    "04_evaluate": ["classification_report_zeroshot.txt", "classification_report_finetuned.txt", "metrics.json"],
    "05_report": ["report.html"],
}
OPTIONAL_OUTPUTS = {"01_explore_data": ["excluded.csv"]}  # written only when not empty
STEPS = list(STEP_INPUTS)
PACKAGES = ["torch", "open_clip_torch", "numpy", "pandas", "scikit-learn", "geopandas", "papermill"]


class RunError(RuntimeError):
    """A run directory is missing, incomplete or would be overwritten."""


def outputs_dir() -> Path:
    """Where runs live: ``$LAGEO_OUTPUTS`` or ``<project>/outputs``."""
    return Path(os.environ.get("LAGEO_OUTPUTS", PROJECT_ROOT / "outputs"))


def project_path(path: str | os.PathLike) -> Path:
    """Resolve a relative path against the project root (so notebooks work from any folder)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else PROJECT_ROOT / path


def new_run_dir(outputs: Path | None = None) -> Path:
    """Create a fresh, empty run directory; never reuses an existing one."""
    root = (outputs or outputs_dir()) / "runs"
    root.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = root / f"{stamp}-{secrets.token_hex(3)}"
    path.mkdir(exist_ok=False)
    return path


def resolve_run_dir(run_dir: str | os.PathLike | None = None) -> Path:
    """``None``/``latest``: the run ``outputs/latest`` names; otherwise a path (relative to the project)."""
    if run_dir is None or str(run_dir) == "latest":
        latest = outputs_dir() / "latest"
        if not latest.exists():
            raise RunError(f"no run yet: {latest} does not exist. Run `lageo run --profile demo` (or notebook 01) first.")
        return latest.resolve()
    path = project_path(run_dir)
    if not path.is_dir():
        raise RunError(f"run directory {path} does not exist")
    return path


def mark_latest(run_dir: Path) -> None:
    """Point ``outputs/latest`` at ``run_dir`` atomically (a relative symlink)."""
    latest = run_dir.parent.parent / "latest"
    tmp = latest.with_name(f".latest-{secrets.token_hex(4)}")
    tmp.symlink_to(run_dir.relative_to(latest.parent))
    os.replace(tmp, latest)


def load_profile(name: str) -> dict:
    path = PROFILES_DIR / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
        raise RunError(f"unknown profile {name!r}; known profiles: {known}")
    return yaml.safe_load(path.read_text())


def resolve_params(profile: str = "demo", config: str | os.PathLike | None = None,
                   overrides: dict | None = None) -> dict:
    """Profile defaults, then a YAML config file, then ``-p NAME VALUE`` overrides."""
    params = load_profile(profile)
    if config is not None:
        extra = yaml.safe_load(project_path(config).read_text()) or {}
        if not isinstance(extra, dict):
            raise RunError(f"{config}: a config file must be a YAML mapping of parameter names to values")
        params.update(extra)
    params.update(overrides or {})
    check_no_secrets(params)
    return params


def check_no_secrets(params: dict) -> None:
    """API keys never enter params (they would be written to params.yaml and executed notebooks)."""
    bad = [k for k in params if SECRET_PATTERN.search(str(k))]
    if bad:
        raise RunError(f"parameters {bad} look like secrets; pass API keys only through environment variables")


def write_params(run_dir: Path, params: dict, parent: Path | None = None) -> Path:
    """Write ``params.yaml``: the parameters plus provenance (run id, date, versions, git commit)."""
    doc = {
        "run_id": run_dir.name,
        "created_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "params": params,
        "provenance": provenance(),
    }
    if parent is not None:
        doc["parent_run"] = parent.name
    path = run_dir / "params.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def update_params(run_dir: Path, params: dict) -> None:
    """Replace the ``params`` of a run's ``params.yaml``, keeping its id, date, provenance and parent."""
    path = run_dir / "params.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["params"] = params
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def read_params(run_dir: Path) -> dict:
    """The ``params`` mapping of a run."""
    path = run_dir / "params.yaml"
    if not path.exists():
        raise RunError(f"{path} is missing: was this run started by `lageo run` or notebook 01?")
    return yaml.safe_load(path.read_text())["params"]


def provenance() -> dict:
    """Software versions, platform and git commit, recorded with every run."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                                text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"versions": versions, "platform": platform.platform(), "git_commit": commit}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def start_step(step: str, run_dir: str | os.PathLike | None) -> Path:
    """The run directory a notebook step should read from and write to.

    Checks the step's inputs exist (an error names each missing file and the notebook that
    makes it). If this step already finished there, forks a new run with the parent's inputs so
    the finished run is never modified; a step that stopped part-way continues in place.
    """
    if step not in STEP_INPUTS:
        raise RunError(f"unknown step {step!r}; steps: {STEPS}")
    run = resolve_run_dir(run_dir)
    missing = [f for f in STEP_INPUTS[step] if not (run / f).exists()]
    if missing:
        makers = {f: next((s for s, outs in STEP_OUTPUTS.items() if f in outs), "lageo run") for f in missing}
        listing = ", ".join(f"{f} (made by {m})" for f, m in makers.items())
        raise RunError(f"{run} lacks the inputs of {step}: {listing}")
    return fork_run(run, step) if step_done(run, step) else run


def step_done(run: Path, step: str) -> bool:
    """Whether every output of ``step`` exists in ``run``."""
    return all((run / f).exists() for f in STEP_OUTPUTS[step])


def fork_run(parent: Path, step: str) -> Path:
    """A new run holding copies of the parent's files made by the steps before ``step``."""
    child = new_run_dir(parent.parent.parent)
    earlier = STEPS[: STEPS.index(step)]
    keep = {f for s in earlier for f in STEP_OUTPUTS[s] + OPTIONAL_OUTPUTS.get(s, [])}
    for name in sorted(keep):
        if (parent / name).exists():
            shutil.copy2(parent / name, child / name)
    if "03_finetune" in earlier and (parent / "checkpoints").is_dir():
        shutil.copytree(parent / "checkpoints", child / "checkpoints")
    # Figures are named after the step that drew them ("04_confusion_...").
    for figure in sorted((parent / "figures").glob("*.png")):
        if any(figure.name.startswith(s[:3]) for s in earlier):
            (child / "figures").mkdir(exist_ok=True)
            shutil.copy2(figure, child / "figures" / figure.name)
    write_params(child, read_params(parent), parent=parent)
    return child
