"""Quiet, informative logging: lageo's own progress lines, other libraries' only when they matter.

Third-party INFO lines (open_clip logs through the root logger, papermill, the kernel's
transport) drown the pipeline's own progress, so by default only lageo's INFO lines and other
libraries' errors are shown. ``lageo -v`` (or ``LAGEO_VERBOSE=1``, which kernels started by
``lageo run -v`` inherit) shows everything.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

VERBOSE_ENV = "LAGEO_VERBOSE"
PACKAGE = "lageo_utils"
_HANDLER_NAME = "lageo"


class _OwnLinesFilter(logging.Filter):
    """Keep lageo's records at INFO and up, and other libraries' errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name == PACKAGE or record.name.startswith(PACKAGE + ".")
        return record.levelno >= (logging.INFO if own else logging.ERROR)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def configure_logging(verbose_output: bool | None = None) -> None:
    """One stderr handler on the root logger; idempotent (notebooks call it in every step)."""
    loud = verbose() if verbose_output is None else verbose_output
    if loud:
        os.environ[VERBOSE_ENV] = "1"  # kernels started from here inherit it
    root = logging.getLogger()
    handler = next((h for h in root.handlers if h.get_name() == _HANDLER_NAME), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.set_name(_HANDLER_NAME)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        # Handlers a library or the kernel installed would print the same records again.
        for other in list(root.handlers):
            root.removeHandler(other)
        root.addHandler(handler)
    handler.filters.clear()
    if not loud:
        handler.addFilter(_OwnLinesFilter())
        # The kernel's "Jupyter is migrating its paths" / transport notices come as warnings, not log records.
        warnings.filterwarnings("ignore", module="jupyter_client")
        warnings.filterwarnings("ignore", module="zmq")
    root.setLevel(logging.DEBUG if loud else logging.INFO)
