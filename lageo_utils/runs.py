"""Run directories: creation, parameters, provenance, the ``latest`` pointer and step inputs.

A run directory ``outputs/runs/<UTC timestamp>-<short id>/`` holds every file of one run
(see README, "Run directory"). A step never writes into a run where that step already ran:
re-running a notebook on a finished run forks a new run that starts from the parent's
inputs, so earlier results are never modified.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import yaml

from lageo_utils.backbones import EMBEDDING_METHODS, is_image_only
from lageo_utils.files import atomic_write
from lageo_utils.params import PROMPT_VARIANTS, STRATEGIES, ParamError, check_params, defaults
from lageo_utils.regions import PROJECT_ROOT

PROFILES_DIR = Path(__file__).parent / "profiles"
SECRET_PATTERN = re.compile(r"key|token|secret|password", re.IGNORECASE)
PACKAGES = ["torch", "open_clip_torch", "numpy", "pandas", "scikit-learn", "geopandas", "papermill"]

# The file names of a run directory: spelled here only (steps, report, pipeline and notebooks use RunDir).
PARAMS, MANIFEST, AUDIT, DATA = "params.yaml", "manifest.csv", "audit.json", "data.json"
HISTORY, TRAIN_SUMMARY, METRICS = "history.csv", "train_summary.json", "metrics.json"
REPORT, FAILED, PROBING = "report.html", "FAILED.json", "probing.json"
STRATEGIES_FILE = "strategies.json"  # step 03: each strategy's training summary and WiSE-FT search
CHECKPOINTS, FIGURES, NOTEBOOKS, LOCATORS = "checkpoints", "figures", "notebooks", "locator"
PEERS = "peers"  # steps 02/03: a peer method's GPS gallery, validation answers and summary (peers/<method>/)
SPLITS = ("train", "val", "test")
MODEL_LABELS = {"zeroshot": "Zero-shot CLIP", "finetuned": "Fine-tuned CLIP"}  # the prediction tables step 04 compares
MODELS = tuple(MODEL_LABELS)


def split_file(name: str) -> str:
    """``train``/``val``/``test``/``excluded`` -> its manifest file name."""
    return f"{name}.csv"


def predictions_file(model: str) -> str:
    return f"predictions_{model}.parquet"


def coordinates_file(model: str) -> str:
    """A model's coordinate answers: every method, per image and voted per capture point."""
    return f"coordinates_{model}.parquet"


def locator_dir(model: str) -> str:
    """A model's fitted locator (gallery, tuned settings, geocell head): a folder."""
    return f"{LOCATORS}/{model}"


def peer_dir(method: str) -> str:
    """A peer method's folder (``geoclip``: step 02, ``geoclip_finetuned``: step 03): gallery, validation answers,
    summary."""
    return f"{PEERS}/{method}"


def classification_report_file(model: str) -> str:
    return f"classification_report_{model}.txt"


def strategy_predictions_file(strategy: str, wise: bool = False) -> str:
    """One fine-tuning strategy's test predictions (``wise``: at its WiSE-FT weight chosen on validation)."""
    return f"predictions_strategy_{strategy}{'_wise' if wise else ''}.parquet"


def prompt_predictions_file(variant: str) -> str:
    """Zero-shot test predictions with one prompt variant."""
    return f"predictions_prompt_{variant}.parquet"


@dataclass(frozen=True)
class StepFiles:
    """What one notebook step reads and writes inside the run directory."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    optional: tuple[str, ...] = ()  # written only when not empty


STEP_FILES: dict[str, StepFiles] = {
    "01_explore_data": StepFiles((), (MANIFEST, *map(split_file, SPLITS), AUDIT, DATA), (split_file("excluded"),)),
    "02_zero_shot": StepFiles((PARAMS, DATA, *map(split_file, SPLITS)),
                              (predictions_file("zeroshot"), locator_dir("zeroshot"), coordinates_file("zeroshot")),
                              (*map(prompt_predictions_file, PROMPT_VARIANTS), peer_dir("geoclip"))),
    "03_finetune": StepFiles((PARAMS, DATA, *map(split_file, SPLITS)),
                             (HISTORY, TRAIN_SUMMARY, STRATEGIES_FILE, predictions_file("finetuned"),
                              locator_dir("finetuned"), coordinates_file("finetuned")),
                             (*(strategy_predictions_file(s, wise) for s in STRATEGIES for wise in (False, True)),
                              peer_dir("geoclip_finetuned"))),
    "04_evaluate": StepFiles((PARAMS, DATA, AUDIT, *map(split_file, SPLITS), *map(predictions_file, MODELS),
                              *map(locator_dir, MODELS), *map(coordinates_file, MODELS)),
                             (*map(classification_report_file, MODELS), METRICS)),
    # Step 06 runs before 05 (the report shows its results) and only when `interventions` is set: see STEPS.
    "06_probing": StepFiles((PARAMS, DATA, split_file("val"), STRATEGIES_FILE), (PROBING,)),
    "05_report": StepFiles((PARAMS, METRICS), (REPORT,)),
}
# The order `lageo run` executes (and forks count "earlier" by): the keys of STEP_FILES, so 06_probing comes before
# 05_report, whose report includes probing.json when it exists. Steps are named by what they do, not by when they run.
STEPS = list(STEP_FILES)
OPTIONAL_STEPS = {"06_probing": "interventions"}  # step -> the parameter that, when empty, skips it


def absent_files(params: dict) -> set[str]:
    """Step outputs (and so later steps' inputs) that a run with these parameters does not write: an image-only
    backbone has no zero-shot model, so no zero-shot predictions or classification report, and no zero-shot locator
    either when ``geo_methods`` holds no method answered from embeddings alone (``lageo_utils.backbones``)."""
    if not is_image_only(params.get("model", "")):
        return set()
    absent = {predictions_file("zeroshot"), classification_report_file("zeroshot")}
    methods = set(params.get("geo_methods") or ())
    if not methods & set(EMBEDDING_METHODS):
        absent.add(locator_dir("zeroshot"))
        if "geoclip" not in methods:  # GeoCLIP's answers fill the table on their own
            absent.add(coordinates_file("zeroshot"))
    return absent


def model_labels(model_name: str) -> dict[str, str]:
    """``MODEL_LABELS`` for a run's model: an image-only backbone's untrained model is not zero-shot CLIP."""
    if not is_image_only(model_name):
        return dict(MODEL_LABELS)
    return {"zeroshot": f"Frozen {model_name} (no head)", "finetuned": f"Fine-tuned {model_name}"}


def _run_absent_files(run: Path) -> set[str]:
    # With no output left (image-only, no embedding method), step 02 counts as done: step 03 embeds what it needs.
    return absent_files(read_params(run)) if RunDir(run).params_file.exists() else set()


def step_wanted(step: str, params: dict) -> bool:
    """Whether ``lageo run`` runs ``step`` with these parameters (an optional step needs its parameter set)."""
    return step not in OPTIONAL_STEPS or bool(params.get(OPTIONAL_STEPS[step]))


class RunDir(type(Path())):  # type(Path()): the concrete Path class of this platform, which can be subclassed
    """A run directory (a ``Path``) that names the files its steps read and write."""

    @property
    def params_file(self) -> Path:
        return self / PARAMS

    @property
    def manifest(self) -> Path:
        return self / MANIFEST

    def split(self, name: str) -> Path:
        return self / split_file(name)

    @property
    def audit(self) -> Path:
        return self / AUDIT

    @property
    def data_file(self) -> Path:
        return self / DATA

    def predictions(self, model: str) -> Path:
        return self / predictions_file(model)

    def coordinates(self, model: str) -> Path:
        return self / coordinates_file(model)

    def locator(self, model: str) -> Path:
        return self / locator_dir(model)

    @property
    def checkpoints(self) -> Path:
        return self / CHECKPOINTS

    def strategy_checkpoints(self, strategy: str) -> Path:
        """``checkpoints/<strategy>/``: best.pt, last.pt, history.csv, train_summary.json of one strategy."""
        return self / CHECKPOINTS / strategy

    def strategy_predictions(self, strategy: str, wise: bool = False) -> Path:
        return self / strategy_predictions_file(strategy, wise)

    def prompt_predictions(self, variant: str) -> Path:
        return self / prompt_predictions_file(variant)

    @property
    def strategies_file(self) -> Path:
        return self / STRATEGIES_FILE

    @property
    def history(self) -> Path:
        return self / HISTORY

    @property
    def train_summary(self) -> Path:
        return self / TRAIN_SUMMARY

    @property
    def metrics(self) -> Path:
        return self / METRICS

    def peer(self, method: str) -> Path:
        """``peers/<method>/`` (``gallery.parquet``, ``val_answers.parquet``, ``summary.json``); a fine-tuned peer
        trains into ``checkpoints/<method>/``."""
        return self / peer_dir(method)

    def classification_report(self, model: str) -> Path:
        return self / classification_report_file(model)

    def figure(self, name: str) -> Path:
        return self / FIGURES / f"{name}.png"

    def notebook(self, step: str) -> Path:
        return self / NOTEBOOKS / f"{step}.ipynb"

    def kernel_log(self, step: str) -> Path:
        """What the step's kernel process wrote to its own stdout and stderr (its log, native libraries)."""
        return self / NOTEBOOKS / f"{step}.kernel.log"

    @property
    def report(self) -> Path:
        return self / REPORT

    @property
    def failed(self) -> Path:
        return self / FAILED

    @property
    def probing(self) -> Path:
        return self / PROBING


class RunError(RuntimeError):
    """A run directory is missing, incomplete or would be overwritten."""


def outputs_dir() -> Path:
    """Where runs live: ``$LAGEO_OUTPUTS`` or ``<project>/outputs``."""
    return Path(os.environ.get("LAGEO_OUTPUTS", PROJECT_ROOT / "outputs"))


def project_path(path: str | os.PathLike) -> Path:
    """Resolve a relative path against the project root (so notebooks work from any folder)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else PROJECT_ROOT / path


def new_run_dir(outputs: Path | None = None) -> RunDir:
    """Create a fresh, empty run directory; never reuses an existing one."""
    root = (outputs or outputs_dir()) / "runs"
    root.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RunDir(root / f"{stamp}-{secrets.token_hex(3)}")
    path.mkdir(exist_ok=False)
    return path


def resolve_run_dir(run_dir: str | os.PathLike | None = None) -> RunDir:
    """``None``/``latest``: the run ``outputs/latest`` names; otherwise a path (relative to the project)."""
    if run_dir is None or str(run_dir) == "latest":
        latest = outputs_dir() / "latest"
        if not latest.exists():
            raise RunError(f"no run yet: {latest} does not exist. Run `lageo run --profile demo` (or notebook 01) first.")
        return RunDir(latest.resolve())
    path = project_path(run_dir)
    if not path.is_dir():
        raise RunError(f"run directory {path} does not exist")
    return RunDir(path)


def mark_latest(run_dir: Path) -> None:
    """Point ``outputs/latest`` at ``run_dir`` atomically (a relative symlink)."""
    latest = run_dir.parent.parent / "latest"
    tmp = latest.with_name(f".latest-{secrets.token_hex(4)}")
    tmp.symlink_to(run_dir.relative_to(latest.parent))
    os.replace(tmp, latest)


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def load_profile(name: str) -> dict:
    """A profile's values (checked against the parameter schema)."""
    path = PROFILES_DIR / f"{name}.yaml"
    if not path.exists():
        raise RunError(f"unknown profile {name!r}; known profiles: {profile_names()}")
    return _checked(yaml.safe_load(path.read_text()) or {}, f"profile {name!r} ({path})")


def resolve_params(profile: str = "demo", config: str | os.PathLike | None = None,
                   overrides: dict | None = None) -> dict:
    """Every parameter: declared defaults, then the profile, then a YAML config file, then ``-p NAME VALUE``.

    Each source is checked against the schema (``lageo_utils.params``); ``RunError`` names the
    source, the parameter and the value.
    """
    params = {**defaults(), **load_profile(profile)}
    if config is not None:
        path = project_path(config)
        try:
            extra = yaml.safe_load(path.read_text()) or {}
        except OSError as exc:
            raise RunError(f"{config}: cannot read the config file ({exc.strerror or exc})") from None
        except yaml.YAMLError as exc:
            raise RunError(f"{config}: not valid YAML ({exc})") from None
        if not isinstance(extra, dict):
            raise RunError(f"{config}: a config file must be a YAML mapping of parameter names to values")
        params.update(_checked(extra, f"config file {config}"))
    params.update(_checked(overrides or {}, "-p"))
    return params


def _checked(values: dict, source: str) -> dict:
    check_no_secrets(values)
    try:
        return check_params(values)
    except ParamError as exc:
        raise RunError(f"{source}: {exc}") from None


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
    return atomic_write(RunDir(run_dir).params_file, lambda tmp: tmp.write_text(yaml.safe_dump(doc, sort_keys=False)))


def update_params(run_dir: Path, params: dict) -> None:
    """Replace the ``params`` of a run's ``params.yaml``, keeping its id, date, provenance and parent."""
    path = RunDir(run_dir).params_file
    doc = yaml.safe_load(path.read_text())
    doc["params"] = params
    atomic_write(path, lambda tmp: tmp.write_text(yaml.safe_dump(doc, sort_keys=False)))


def read_params(run_dir: Path) -> dict:
    """The ``params`` mapping of a run."""
    path = RunDir(run_dir).params_file
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


def start_step(step: str, run_dir: str | os.PathLike | None) -> RunDir:
    """The run directory a notebook step should read from and write to.

    Checks the step's inputs exist (an error names each missing file and the notebook that
    makes it). If this step already finished there, forks a new run with the parent's inputs so
    the finished run is never modified; a step that stopped part-way continues in place.
    """
    if step not in STEP_FILES:
        raise RunError(f"unknown step {step!r}; steps: {STEPS}")
    run = resolve_run_dir(run_dir)
    absent = _run_absent_files(run)
    missing = [f for f in STEP_FILES[step].inputs if not (run / f).exists() and f not in absent]
    if missing:
        makers = {f: next((s for s, files in STEP_FILES.items() if f in files.outputs), "lageo run") for f in missing}
        listing = ", ".join(f"{f} (made by {m})" for f, m in makers.items())
        raise RunError(f"{run} lacks the inputs of {step}: {listing}")
    return fork_run(run, step) if step_done(run, step) else run


def step_done(run: Path, step: str) -> bool:
    """Whether every output of ``step`` exists in ``run`` (outputs its parameters make absent excepted)."""
    absent = _run_absent_files(run)
    return all((run / f).exists() or f in absent for f in STEP_FILES[step].outputs)


def fork_run(parent: Path, step: str) -> RunDir:
    """A new run holding copies of the parent's files made by the steps before ``step``."""
    parent = RunDir(parent)
    child = new_run_dir(parent.parent.parent)
    earlier = STEPS[: STEPS.index(step)]
    keep = {f for s in earlier for f in STEP_FILES[s].outputs + STEP_FILES[s].optional}
    for name in sorted(keep):
        if (parent / name).is_dir():  # a locator folder
            shutil.copytree(parent / name, child / name)
        elif (parent / name).exists():
            shutil.copy2(parent / name, child / name)
    if "03_finetune" in earlier and parent.checkpoints.is_dir():
        shutil.copytree(parent.checkpoints, child.checkpoints)
    # Figures are named after the step that drew them ("04_confusion_...").
    for figure in sorted((parent / FIGURES).glob("*.png")):
        if any(figure.name.startswith(s[:3]) for s in earlier):
            (child / FIGURES).mkdir(exist_ok=True)
            shutil.copy2(figure, child / FIGURES / figure.name)
    write_params(child, read_params(parent), parent=parent)
    return child
