"""``lageo compare RUN_DIR... --out DIR``: runs side by side in one HTML page and a CSV."""

from __future__ import annotations

from lageo_utils.cli import CommandError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare", help="compare finished runs: headline metrics with intervals, differing parameters, paired tests")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="two or more run directories")
    parser.add_argument("--out", required=True, help="folder for comparison.html, comparison.csv, comparison.png")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of the paired comparisons")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=_compare)


def _compare(args) -> int:
    from lageo_utils.compare import write_comparison
    from lageo_utils.params import ParamError, check_value
    from lageo_utils.runs import RunError

    try:
        n_boot, seed = check_value("n_boot", args.n_boot), check_value("seed", args.seed)
        html = write_comparison(args.runs, args.out, n_boot=n_boot, seed=seed)
    except (RunError, ParamError, FileNotFoundError) as exc:
        raise CommandError(str(exc)) from None
    print(f"comparison: {html}")
    return 0
