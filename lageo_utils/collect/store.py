"""The collectors' output folder: ``images/`` and ``manifest.csv``, safe to kill at any moment.

Images are renamed into place only when complete; the manifest and the state logs are CSV files
appended one synced row at a time. Opening a folder repairs what a kill can leave behind: a torn
last CSV line, ``*.part`` files, and rows whose image is missing or not the recorded size.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from datetime import UTC, datetime
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from lageo_utils.collect.http import CollectError, Retryable
from lageo_utils.files import atomic_write, remove_leftover_temporaries

log = logging.getLogger(__name__)

IMAGES_DIR = "images"
MANIFEST_NAME = "manifest.csv"


class CsvLog:
    """An append-only CSV table whose rows are synced to disk one by one.

    On open, a partly written last line (a kill mid-write) is cut off, unless ``read_only``.
    """

    def __init__(self, path: str | os.PathLike, columns: list[str], *, read_only: bool = False):
        self.path = Path(path)
        self.columns = list(columns)
        self.read_only = read_only
        self.rows: list[dict[str, str]] = self._load()
        self._fh = None

    def _load(self) -> list[dict[str, str]]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            data = data[:cut]
            if not self.read_only:
                log.warning("%s: removed a partly written last line", self.path)
                os.truncate(self.path, cut)
        if not data:
            return []
        reader = csv.DictReader(io.StringIO(data.decode("utf-8"), newline=""))
        if reader.fieldnames != self.columns:
            raise CollectError(
                f"{self.path}: its columns {reader.fieldnames} are not this collector's {self.columns}; "
                "use another --out folder"
            )
        return list(reader)

    def append(self, row: dict) -> None:
        """Append one row (missing columns left empty) and sync it to disk."""
        if self.read_only:
            raise RuntimeError(f"{self.path} is open read-only")
        if self._fh is None:
            new = not self.path.exists() or self.path.stat().st_size == 0
            self._fh = open(self.path, "a", newline="", encoding="utf-8")  # held open while appending
            if new:
                csv.writer(self._fh).writerow(self.columns)
        values = {c: "" if row.get(c) is None else row.get(c) for c in self.columns}
        csv.DictWriter(self._fh, self.columns).writerow(values)
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.rows.append({c: str(v) for c, v in values.items()})

    def rewrite(self, rows: list[dict[str, str]]) -> None:
        """Replace the whole table atomically (temp file, then rename)."""
        self.close()
        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="", encoding="utf-8") as fh:
                writer = csv.DictWriter(fh, self.columns)
                writer.writeheader()
                writer.writerows(rows)

        atomic_write(self.path, write)
        self.rows = list(rows)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class ImageFolder:
    """``DIR/images`` and ``DIR/manifest.csv`` (``columns`` must include ``image_path`` and ``file_size_bytes``)."""

    def __init__(self, out_dir: str | os.PathLike, columns: list[str], *, read_only: bool = False):
        self.root = Path(out_dir)
        self.images = self.root / IMAGES_DIR
        self.read_only = read_only
        if not read_only:
            self.images.mkdir(parents=True, exist_ok=True)
        self.manifest = CsvLog(self.root / MANIFEST_NAME, columns, read_only=read_only)
        self.repairs = {"partial_files_removed": 0, "rows_dropped": []}
        if not read_only:
            self._repair()

    def _repair(self) -> None:
        self.repairs["partial_files_removed"] += remove_leftover_temporaries(self.images)
        for part in sorted(self.images.glob("*.part")):  # what collectors before atomic_write left
            part.unlink()
            self.repairs["partial_files_removed"] += 1
        good, seen = [], set()
        for row in self.manifest.rows:
            path = self.root / row["image_path"]
            problem = None
            if row["image_path"] in seen:
                problem = "listed twice"
            elif not path.is_file():
                problem = "file missing"
            elif str(path.stat().st_size) != row["file_size_bytes"]:
                problem = f"size {path.stat().st_size} bytes, recorded {row['file_size_bytes']}"
                path.unlink()
            if problem:
                self.repairs["rows_dropped"].append(f"{row['image_path']}: {problem}")
                log.warning("%s: %s; it will be downloaded again", row["image_path"], problem)
            else:
                good.append(row)
                seen.add(row["image_path"])
        if len(good) != len(self.manifest.rows):
            self.manifest.rewrite(good)

    def path_for(self, name: str) -> Path:
        return self.images / name

    def add(self, name: str, row: dict) -> dict:
        """Record a complete image ``images/<name>`` in the manifest (after it was renamed into place)."""
        path = self.path_for(name)
        full = {
            **row,
            "image_path": f"{IMAGES_DIR}/{name}",
            "file_size_bytes": path.stat().st_size,
            "downloaded_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        self.manifest.append(full)
        return full

    def close(self) -> None:
        self.manifest.close()


def image_problem(path: Path) -> str | None:
    """Why the file is not a complete image (None when it decodes fully).

    Pillow directly rather than ``lageo_utils.images``, which imports torch: seconds of start-up
    for a downloader that never needs it.
    """
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with Image.open(path) as img:
            img.load()  # full decode: a truncated body fails here (truncated images are not accepted)
    except FileNotFoundError:
        return "file not found"
    except UnidentifiedImageError:
        return "not an image (unrecognised format)"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return f"corrupt or truncated ({exc})"
    return None


def check_image(path: Path) -> None:
    """Raise ``Retryable`` unless the file decodes completely as an image."""
    problem = image_problem(path)
    if problem:
        raise Retryable(f"the image body does not decode: {problem}")


def is_complete_image(path: Path) -> bool:
    """True when the file exists and decodes completely."""
    return image_problem(path) is None
