"""lageo: sub-city image geolocation in Los Angeles County with CLIP.

The command line: each module in this package adds one command group through ``register(subparsers)``
and sets ``func`` on its parsers; heavy libraries (torch, open_clip) are imported inside
the command functions so ``lageo --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys

from lageo_utils import __version__
from lageo_utils.logs import configure_logging


class CommandError(Exception):
    """A command failed in a way the user can fix; printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lageo", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"lageo {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show every library's log lines and warnings (also in the notebooks' kernels)")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):  # __main__: ``python -m lageo_utils.cli``
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        module.register(subparsers)
    return parser


def print_json(obj) -> None:
    """Print one JSON document to stdout (the commands' machine-readable output)."""
    print(json.dumps(obj, indent=2, default=str))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose or None)
    try:
        return int(args.func(args) or 0)
    except CommandError as exc:
        print(f"lageo {args.command}: error: {exc}", file=sys.stderr)
        return 2
