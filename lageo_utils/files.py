"""File helpers every step shares: atomic writes and content hashes."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

TEMP_MARK = ".tmp"  # in the name of every temporary file atomic_write makes


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Have ``write(tmp)`` fill a temporary file beside ``path``, sync it, then rename it to ``path``.

    A reader never sees half a file, and a failure or a kill leaves ``path`` as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary name keeps the suffix: writers such as numpy.save append theirs otherwise.
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=f"{TEMP_MARK}{path.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def remove_leftover_temporaries(folder: str | os.PathLike) -> int:
    """Delete what ``atomic_write`` left in ``folder`` when a process was killed mid-write; returns how many."""
    leftovers = sorted(Path(folder).glob(f".*{TEMP_MARK}*"))
    for path in leftovers:
        path.unlink()
    return len(leftovers)


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 hex digest of a file's bytes."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
