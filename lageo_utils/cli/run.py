"""``lageo run``: the whole pipeline with papermill; ``lageo report``: re-render a run's report."""

from __future__ import annotations

import yaml

from lageo_utils.cli import CommandError


def register(subparsers) -> None:
    run = subparsers.add_parser("run", help="run notebooks 01..05 into a new run directory and render the report")
    run.add_argument("--profile", default="demo", help="demo (offline, synthetic) or la (the real study)")
    run.add_argument("--config", default=None, help="YAML file of parameters overriding the profile")
    run.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                     help="override one parameter (value parsed as YAML: 8, 1e-4, true, none)")
    run.add_argument("--outputs", default=None, help="outputs folder (default: ./outputs or $LAGEO_OUTPUTS)")
    run.add_argument("--resume", default=None, metavar="RUN_DIR",
                     help="continue an interrupted or failed run with its own parameters (finished steps are kept)")
    run.set_defaults(func=_run)

    report = subparsers.add_parser(
        "report", help="re-run notebook 05 on a run into a new run (now latest) and render its report.html")
    report.add_argument("run_dir", nargs="?", default=None, help="run directory (default: outputs/latest)")
    report.set_defaults(func=_report)


def parse_overrides(pairs: list[list[str]]) -> dict:
    """``-p NAME VALUE`` pairs with YAML-typed values (``none``/``null`` become None)."""
    out = {}
    for name, value in pairs:
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):
            if parsed.lower() == "none":
                parsed = None
            else:
                try:  # PyYAML reads "1e-4" as text (YAML 1.1 wants "1.0e-4")
                    parsed = float(parsed)
                except ValueError:
                    pass
        out[name] = parsed
    return out


def _run(args) -> int:
    from pathlib import Path

    from lageo_utils.pipeline import resume_pipeline, run_pipeline
    from lageo_utils.runs import RunError, resolve_params, resolve_run_dir

    try:
        if args.resume:
            if args.param or args.config:
                raise RunError("--resume continues a run with its own parameters; -p/--config cannot change them")
            run_dir = resume_pipeline(resolve_run_dir(args.resume))
        else:
            params = resolve_params(args.profile, args.config, parse_overrides(args.param))
            run_dir = run_pipeline(params, Path(args.outputs) if args.outputs else None)
    except RunError as exc:
        raise CommandError(str(exc)) from None
    print(f"run complete: {run_dir}\nreport: {run_dir / 'report.html'}")
    return 0


def _report(args) -> int:
    from lageo_utils.pipeline import render_report, run_step
    from lageo_utils.runs import RunError, mark_latest, read_params, start_step

    try:
        run_dir = start_step("05_report", args.run_dir)  # a finished run is forked, never rewritten
        executed = run_step("05_report", run_dir, read_params(run_dir))
        html = render_report(executed, run_dir.report)
        mark_latest(run_dir)
    except RunError as exc:
        raise CommandError(str(exc)) from None
    print(f"report: {html}")
    return 0
