"""The papermill pipeline: run notebooks 01..05 into a new run directory, then render the report."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nbformat
import papermill
from nbconvert import HTMLExporter
from papermill.exceptions import PapermillExecutionError

from lageo_utils.regions import PROJECT_ROOT
from lageo_utils.runs import (
    STEPS,
    RunError,
    mark_latest,
    new_run_dir,
    outputs_dir,
    read_params,
    step_done,
    write_params,
)

log = logging.getLogger(__name__)

NOTEBOOKS_DIR = PROJECT_ROOT / "notebooks"


class StepFailed(RunError):
    """A notebook failed; the message names the notebook, the cell and the partial output."""


def notebook_parameters(notebook: Path) -> set[str]:
    """Names declared in a notebook's cell tagged ``parameters``."""
    return set(papermill.inspect_notebook(str(notebook)))


def run_step(step: str, run_dir: Path, params: dict, kernel_name: str | None = None) -> Path:
    """Execute one notebook with the parameters it declares; its executed copy goes into the run."""
    source = NOTEBOOKS_DIR / f"{step}.ipynb"
    wanted = notebook_parameters(source)
    given = {k: v for k, v in params.items() if k in wanted}
    given["run_dir"] = str(run_dir)
    target = run_dir / "notebooks" / source.name
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        papermill.execute_notebook(str(source), str(target), parameters=given, cwd=str(NOTEBOOKS_DIR),
                                   kernel_name=kernel_name, progress_bar=False)
    except PapermillExecutionError as exc:
        raise StepFailed(
            f"notebook {source.name} failed in cell {exc.cell_index} (execution count {exc.exec_count}): "
            f"{exc.ename}: {exc.evalue}\npartial output: {target}"
        ) from None
    return target


def render_report(executed_report: Path, html_path: Path) -> Path:
    """Render the executed report notebook as one self-contained HTML file without code cells."""
    exporter = HTMLExporter(template_name="lab")
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

    Earlier runs are never touched. On failure the run directory keeps the partial output
    and a ``FAILED.json`` saying which step failed; ``resume_pipeline`` continues it.
    """
    run_dir = new_run_dir(outputs or outputs_dir())
    write_params(run_dir, params)
    return _run_steps(run_dir, params, kernel_name)


def resume_pipeline(run_dir: Path, kernel_name: str | None = None) -> Path:
    """Continue an interrupted or failed run with its own parameters: finished steps are skipped,
    a step that stopped part-way continues (training resumes from ``checkpoints/last.pt``)."""
    if step_done(run_dir, STEPS[-1]):
        raise RunError(f"{run_dir} is complete; start a new run instead")
    (run_dir / "FAILED.json").unlink(missing_ok=True)
    return _run_steps(run_dir, read_params(run_dir), kernel_name)


def _run_steps(run_dir: Path, params: dict, kernel_name: str | None) -> Path:
    log.info("run directory: %s", run_dir)
    for step in STEPS:
        if step_done(run_dir, step):
            log.info("%s: already done", step)
            continue
        log.info("running %s", step)
        try:
            run_step(step, run_dir, params, kernel_name=kernel_name)
        except StepFailed as exc:
            (run_dir / "FAILED.json").write_text(json.dumps({"step": step, "error": str(exc)}, indent=2))
            raise
        if step == STEPS[-1]:
            render_report(run_dir / "notebooks" / f"{step}.ipynb", run_dir / "report.html")
    mark_latest(run_dir)
    return run_dir
