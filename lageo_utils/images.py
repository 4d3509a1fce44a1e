"""Reading images safely: every mode converted to RGB, every failure named, memory bounded.

What happens to a huge image (Pillow's decompression-bomb guard stays on, limit
``Image.MAX_IMAGE_PIXELS``, about 89.5 Mpx by default):

- more than twice the limit: Pillow refuses it when opening; it is reported, never decoded;
- between the limit and twice the limit (e.g. 12000 x 12000 = 144 Mpx): a JPEG is decoded at 1/8
  scale in the DCT domain (1500 x 1500, never materialised at full size); any other format is
  refused and reported;
- within the limit: decoded; JPEGs larger than ``DRAFT_SIZE`` are decoded at a reduced scale, or,
  when the caller gives the size it needs (``min_size``: the model input), JPEGs at least twice
  that size are decoded at the largest DCT reduction that keeps both sides at least that large.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a half-grey picture
DRAFT_SIZE = (1024, 1024)  # JPEGs are decoded at reduced scale when far larger than the model input
MAX_ASPECT_RATIO = 50  # beyond this, resizing the short side to the model input would explode memory
DECODER_SETTINGS = f"pillow-{Image.__version__}-draft{DRAFT_SIZE[0]}x{DRAFT_SIZE[1]}-exif-white-alpha"


class ImageReadError(Exception):
    """An image could not be read; ``reason`` is a short, reportable explanation."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def open_rgb(path: str | os.PathLike, min_size: int | None = None) -> Image.Image:
    """Open an image as upright RGB, decoding big JPEGs at reduced scale; raise ImageReadError on failure.

    ``min_size``: the smallest side the caller needs (the model input, which preprocessing resizes the short
    side to); a JPEG is then decoded at 1/2, 1/4 or 1/8 scale as long as both sides stay at least this large.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except OSError as exc:
        raise ImageReadError(path, f"cannot read file ({exc.strerror or exc})") from None
    if size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below, with a clear reason
            img = Image.open(path)
        with img:
            _decode_within_limit(img, path, min_size)
            ImageOps.exif_transpose(img, in_place=True)  # phone photos: turn upright by their EXIF tag
            return to_rgb(img)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageReadError(path, f"too large, refused by Pillow's decompression-bomb guard ({exc})") from None
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image (unrecognised format)") from None
    except PermissionError:
        raise ImageReadError(path, "permission denied") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageReadError(path, f"corrupt or truncated image ({exc})") from None
    except Exception as exc:  # Pillow's decoders raise many exception types on malformed input
        raise ImageReadError(path, f"could not be decoded ({type(exc).__name__}: {exc})") from None


def _decode_within_limit(img: Image.Image, path: Path, min_size: int | None) -> None:
    width, height = img.size
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        if img.format != "JPEG":
            raise ImageReadError(
                path,
                f"too large: {width}x{height} px exceeds Pillow's decompression-bomb limit of {limit} px "
                f"(Image.MAX_IMAGE_PIXELS); only JPEGs that large are decoded, at 1/8 scale",
            )
        img.draft("RGB", (max(1, width // 8), max(1, height // 8)))
        if img.size[0] * img.size[1] > limit:
            raise ImageReadError(path, f"too large: {width}x{height} px JPEG that cannot be decoded at reduced scale")
    elif img.format == "JPEG":
        # DCT-domain downscale (Pillow picks the largest that keeps both sides >= the size): faster decode
        img.draft("RGB", (min_size, min_size) if min_size else DRAFT_SIZE)
    img.load()


def to_rgb(img: Image.Image) -> Image.Image:
    """An RGB copy of ``img``; transparent pixels (RGBA, LA, PA, palette transparency) become white."""
    if img.mode == "RGB":
        return img.copy()
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")  # L, I, I;16, F, CMYK, YCbCr, LAB, HSV, P without transparency


def decoder_settings(min_size: int | None = None) -> str:
    """How images are decoded, for cache keys: ``DECODER_SETTINGS``, plus the draft size when one is given."""
    return DECODER_SETTINGS if min_size is None else f"{DECODER_SETTINGS}-min{min_size}"


def input_size(transform) -> int | None:
    """The size the short side of an image is resized to by ``transform`` (its first ``Resize``), if any."""
    from torchvision import transforms as T

    for step in getattr(transform, "transforms", [transform]):
        if isinstance(step, T.Resize):
            size = step.size
            return int(size if isinstance(size, int) else max(size))
    return None


def default_num_workers(requested: int | None = None) -> int:
    """Image loader worker processes: ``requested``, or one per core, at most 4 (the one policy of every loader)."""
    return requested if requested is not None else min(4, os.cpu_count() or 1)


class ImageDataset(Dataset):
    """Images by path for a DataLoader: ``(tensor, index, None)``, or ``(None, index, reason)`` when unreadable.

    Use ``collate_skip_failures`` as the loader's ``collate_fn`` so failures are reported, not fatal.
    """

    def __init__(self, paths: list[str], transform, root: str | os.PathLike | None = None,
                 min_size: int | None = None):
        self.paths = list(paths)
        self.transform = transform
        self.root = Path(root) if root is not None else None
        self.min_size = min_size  # see open_rgb

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.root / self.paths[index] if self.root is not None else Path(self.paths[index])
        try:
            img = open_rgb(path, self.min_size)
        except ImageReadError as exc:
            return None, index, exc.reason
        width, height = img.size
        if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
            return None, index, f"extreme aspect ratio ({width}x{height} px), not resized for the model"
        try:
            return self.transform(img), index, None
        except Exception as exc:  # a transform failing on one image must not stop the whole run
            return None, index, f"preprocessing failed ({type(exc).__name__}: {exc})"


def collate_skip_failures(batch):
    """Stack readable images; return ``(images or None, indices, failures)`` with failures as (index, reason)."""
    good = [(x, i) for x, i, _ in batch if x is not None]
    failures = [(i, reason) for x, i, reason in batch if x is None]
    images = torch.stack([x for x, _ in good]) if good else None
    indices = torch.tensor([i for _, i in good], dtype=torch.long)
    return images, indices, failures
