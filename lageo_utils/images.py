"""Reading images safely: every mode converted to RGB, every failure named, memory bounded."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image, ImageFile, UnidentifiedImageError
from torch.utils.data import Dataset

# Pillow's decompression-bomb guard stays on (Image.MAX_IMAGE_PIXELS, ~89 Mpx by default):
# a larger image raises DecompressionBombError and is reported, never decoded.
ImageFile.LOAD_TRUNCATED_IMAGES = False
DRAFT_SIZE = (1024, 1024)  # JPEGs are decoded at reduced scale when far larger than the model input


class ImageReadError(Exception):
    """An image could not be read; ``reason`` is a short, reportable explanation."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image as RGB, decoding big JPEGs at reduced scale; raise ImageReadError on failure."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageReadError(path, "empty file (0 bytes)")
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft("RGB", DRAFT_SIZE)  # DCT-domain downscale: bounded memory, faster decode
            img.load()
            return _to_rgb(img)
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except Image.DecompressionBombError as exc:
        raise ImageReadError(path, f"too large, refused by Pillow's decompression-bomb guard ({exc})") from None
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(path, f"corrupt or truncated image ({exc})") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img.copy()
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))  # flatten alpha onto white
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")  # L, I, F, CMYK, YCbCr, P without alpha


class ImageDataset(Dataset):
    """Images by path for a DataLoader: ``(tensor, index)``, or ``(None, index, reason)`` when unreadable.

    Use ``collate_skip_failures`` as the loader's ``collate_fn`` so failures are reported, not fatal.
    """

    def __init__(self, paths: list[str], transform, root: str | os.PathLike | None = None):
        self.paths = list(paths)
        self.transform = transform
        self.root = Path(root) if root is not None else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.root / self.paths[index] if self.root is not None else Path(self.paths[index])
        try:
            return self.transform(open_rgb(path)), index, None
        except ImageReadError as exc:
            return None, index, exc.reason


def collate_skip_failures(batch):
    """Stack readable images; return ``(images or None, indices, failures)`` with failures as (index, reason)."""
    good = [(x, i) for x, i, _ in batch if x is not None]
    failures = [(i, reason) for x, i, reason in batch if x is None]
    images = torch.stack([x for x, _ in good]) if good else None
    indices = torch.tensor([i for _, i in good], dtype=torch.long)
    return images, indices, failures
