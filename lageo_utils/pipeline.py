"""The papermill pipeline: check everything that can be checked, run the notebooks into a new run
directory in the order ``runs.STEPS`` gives (01, 02, 03, 04, then 06 when ``interventions`` is set, then 05),
then render the report."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

import nbformat
import papermill
from jupyter_client.manager import AsyncKernelManager
from nbclient.exceptions import CellTimeoutError, DeadKernelError
from papermill.exceptions import PapermillExecutionError
from traitlets import Unicode
from traitlets.config import Config

from lageo_utils.backbones import IMAGE_STRATEGIES, is_image_only, requested_strategies, trained_strategies
from lageo_utils.data import ManifestError
from lageo_utils.engines import EngineUnavailableError, check_engine
from lageo_utils.model import WeightsUnavailableError, check_weights, resolve_device
from lageo_utils.notebook import PAPERMILL_KERNEL, html_exporter
from lageo_utils.params import ParamError
from lageo_utils.prompts import region_prompts
from lageo_utils.regions import PROJECT_ROOT, RegionsError, load_regions
from lageo_utils.runs import (
    OPTIONAL_STEPS,
    STEPS,
    RunDir,
    RunError,
    mark_latest,
    new_run_dir,
    outputs_dir,
    project_path,
    read_params,
    step_done,
    step_wanted,
    write_params,
)

log = logging.getLogger(__name__)

NOTEBOOKS_DIR = PROJECT_ROOT / "notebooks"
CELL_TIMEOUT_ENV = "LAGEO_CELL_TIMEOUT"


class StepFailed(RunError):
    """A notebook failed; the message names the notebook, the cell and the partial output."""


def notebook_parameters(notebook: Path) -> set[str]:
    """Names declared in a notebook's cell tagged ``parameters``."""
    return set(papermill.inspect_notebook(str(notebook)))


def preflight(params: dict) -> None:
    """Check, before any run directory or notebook, what would otherwise fail late: the region file and the
    prompts it gives, ``top_k``, ``batch_size`` against ``nproc``, the model's weights, the inference engine, GeoCLIP's extra and backbone (when
    ``geo_methods`` asks for it) and (for a manifest data source) the manifest itself.

    ``RunError`` carries the one message naming the file, field or parameter at fault.
    """
    from lageo_utils.steps import read_data_manifest  # the same reader step 01 uses

    try:
        regions = load_regions(project_path(params["regions"]))
        if not is_image_only(params["model"]):  # an image-only backbone reads no prompts
            region_prompts(regions)
        if params["top_k"] > len(regions):
            raise ParamError(f"top_k must be <= the number of regions ({len(regions)}), got {params['top_k']}")
        unknown = sorted(set(params["train_regions"] or []) - set(regions["id"]))
        if unknown:
            raise ParamError(f"train_regions {unknown} are not in the region file {params['regions']} "
                             f"(ids: {', '.join(regions['id'])})")
        if params["batch_size"] % params["nproc"]:  # each of the nproc processes takes an equal slice of a batch
            raise ParamError(f"batch_size must be a multiple of nproc ({params['nproc']}), got {params['batch_size']}")
        if is_image_only(params["model"]) and not trained_strategies(params):  # text-side ones are skipped
            raise ParamError(f"model {params['model']!r} is image-only (no text tower) and strategies "
                             f"{requested_strategies(params)} are all text-side: choose at least one of "
                             f"{', '.join(IMAGE_STRATEGIES)} (-p strategies linear_probe,partial)")
        check_weights(params["model"], params["pretrained"])
        check_engine(params["engine"], resolve_device(params["device"]))
        check_peers(params)
        if params["data_source"] == "manifest":
            read_data_manifest(params)
    except (ParamError, RegionsError, ManifestError, WeightsUnavailableError, EngineUnavailableError,
            ValueError) as exc:
        raise RunError(str(exc)) from None


def check_peers(params: dict) -> None:
    """When ``geo_methods`` asks for GeoCLIP: the ``peers`` extra is installed (else ``RunError`` saying how to
    install it) and its image backbone's weights are at hand (else ``WeightsUnavailableError`` with the two fixes)."""
    from lageo_utils.params import PEER_METHODS
    from lageo_utils.steps import geoclip_backbone

    if not set(params["geo_methods"]) & set(PEER_METHODS):
        return
    from lageo_utils.peers.geoclip import PeersUnavailableError, check_geoclip_weights, require_geoclip

    try:
        require_geoclip()
    except PeersUnavailableError as exc:
        raise RunError(str(exc)) from None
    check_geoclip_weights(geoclip_backbone(params))


def cell_timeout() -> int | None:
    """Seconds one notebook cell may run (``LAGEO_CELL_TIMEOUT``; none by default: training cells can take hours).
    Tests set it so that a stalled kernel fails a run instead of hanging it."""
    value = os.environ.get(CELL_TIMEOUT_ENV)
    return int(value) if value else None


class LoggedKernelManager(AsyncKernelManager):
    """A local kernel whose process output goes to a file instead of the terminal.

    A kernel writes its own log (e.g. "KeyboardInterrupt caught in kernel" when papermill interrupts it on
    shutdown) and whatever native libraries print straight to its inherited stdout/stderr, outside any cell.
    Sending that to ``kernel_log`` keeps the terminal at one line per step and keeps every word of it."""

    kernel_log = Unicode(help="File the kernel process's stdout and stderr are appended to.").tag(config=True)

    async def start_kernel(self, **kw) -> None:
        with open(self.kernel_log, "ab") as log:  # the kernel holds its own copy of the descriptor
            kw.setdefault("stdout", log)
            kw.setdefault("stderr", log)
            await super().start_kernel(**kw)


def run_step(step: str, run_dir: Path, params: dict, kernel_name: str | None = None) -> Path:
    """Execute one notebook with the parameters it declares; its executed copy goes into the run."""
    source = NOTEBOOKS_DIR / f"{step}.ipynb"
    wanted = notebook_parameters(source)
    given = {k: v for k, v in params.items() if k in wanted}
    given["run_dir"] = str(run_dir)
    target, kernel_log = RunDir(run_dir).notebook(step), RunDir(run_dir).kernel_log(step)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix="lageo-kernel-") as sockets:
            # Local kernels talk over Unix sockets: no TCP ports, no "running over TCP without encryption" warning,
            # and a folder of their own, so runs side by side never share one.
            config = Config({"KernelManager": {"transport": "ipc", "ip": str(Path(sockets) / "kernel")},
                             "LoggedKernelManager": {"kernel_log": str(kernel_log)}})
            papermill.execute_notebook(str(source), str(target), parameters=given, cwd=str(NOTEBOOKS_DIR),
                                       kernel_name=kernel_name or PAPERMILL_KERNEL, progress_bar=False,
                                       config=config, kernel_manager_class=LoggedKernelManager,
                                       execution_timeout=cell_timeout())
    except PapermillExecutionError as exc:
        raise StepFailed(
            f"notebook {source.name} failed in cell {exc.cell_index} (execution count {exc.exec_count}): "
            f"{exc.ename}: {exc.evalue}\npartial output: {target}{_kernel_log_hint(kernel_log)}"
        ) from None
    except (DeadKernelError, CellTimeoutError) as exc:  # the kernel died (killed, out of memory, a native crash),
        # or a cell ran past LAGEO_CELL_TIMEOUT: papermill passes both through as they are
        raise StepFailed(f"notebook {source.name}: {type(exc).__name__}: {exc}{_kernel_log_hint(kernel_log)}") from None
    return target


def _kernel_log_hint(kernel_log: Path) -> str:
    return f"\nkernel log: {kernel_log}" if kernel_log.exists() and kernel_log.stat().st_size else ""


def render_report(executed_report: Path, html_path: Path) -> Path:
    """Render the executed report notebook as one self-contained HTML file without code cells."""
    exporter = html_exporter()  # the lab template, keeping each figure's alt text
    exporter.exclude_input = True
    exporter.exclude_input_prompt = True
    exporter.exclude_output_prompt = True
    exporter.embed_images = True
    notebook = nbformat.read(executed_report, as_version=4)
    body, _ = exporter.from_notebook_node(notebook)
    html_path.write_text(body, encoding="utf-8")
    return html_path


def run_pipeline(params: dict, outputs: Path | None = None, kernel_name: str | None = None) -> Path:
    """Run every notebook into a new run directory; mark it ``latest`` only if all succeed.

    Earlier runs are never touched. ``preflight`` runs first: a run that cannot succeed leaves
    nothing behind. On failure the run directory keeps the partial output and a ``FAILED.json``
    saying which step failed; ``resume_pipeline`` continues it.
    """
    preflight(params)
    run_dir = new_run_dir(outputs or outputs_dir())
    write_params(run_dir, params)
    return _run_steps(run_dir, params, kernel_name)


def resume_pipeline(run_dir: Path, kernel_name: str | None = None) -> Path:
    """Continue an interrupted or failed run with its own parameters: finished steps are skipped,
    a step that stopped part-way continues (training resumes from ``checkpoints/last.pt``)."""
    run_dir = RunDir(run_dir)
    if step_done(run_dir, STEPS[-1]):
        raise RunError(f"{run_dir} is complete; start a new run instead")
    params = read_params(run_dir)
    preflight(params)
    run_dir.failed.unlink(missing_ok=True)
    return _run_steps(run_dir, params, kernel_name)


def _run_steps(run_dir: RunDir, params: dict, kernel_name: str | None) -> Path:
    log.info("run directory: %s", run_dir)
    for step in STEPS:
        if not step_wanted(step, params):
            log.info("%s: skipped (%s is empty)", step, OPTIONAL_STEPS[step])
            continue
        if step_done(run_dir, step):
            log.info("%s: already done", step)
            continue
        log.info("running %s", step)
        started = time.perf_counter()
        try:
            run_step(step, run_dir, params, kernel_name=kernel_name)
        except StepFailed as exc:
            run_dir.failed.write_text(json.dumps({"step": step, "error": str(exc)}, indent=2))
            raise
        log.info("%s: done in %.0f s", step, time.perf_counter() - started)
        if step == STEPS[-1]:
            render_report(run_dir.notebook(step), run_dir.report)
    mark_latest(run_dir)
    return run_dir
