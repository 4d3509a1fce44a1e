"""Open a report.html in headless Chromium, save a screenshot and check it is not blank.

Usage: python scripts/screenshot_report.py outputs/latest/report.html [out.png]
Exit 0 and prints JSON {"screenshot", "std", "non_white"} when the page rendered content.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--window-size=1280,2400",
]


def find_chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


def screenshot(html: Path, png: Path, timeout: float = 120) -> dict:
    """Render ``html`` to ``png``; return pixel statistics of the screenshot."""
    browser = find_chromium()
    if browser is None:
        raise FileNotFoundError("no chromium found (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={png}",
                        html.resolve().as_uri()], check=True, capture_output=True, timeout=timeout)
    pixels = np.asarray(Image.open(png).convert("L"), dtype=float)
    return {"screenshot": str(png), "std": float(pixels.std()), "non_white": float((pixels < 250).mean())}


def main(argv: list[str]) -> int:
    html = Path(argv[0])
    png = Path(argv[1]) if len(argv) > 1 else html.with_suffix(".png")
    stats = screenshot(html, png)
    print(json.dumps(stats))
    return 0 if stats["std"] > 10 and stats["non_white"] > 0.02 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
