"""Reading images and input lists, with a reason for everything that cannot be read."""
from __future__ import annotations

import contextlib
import math
import os
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}

# Pillow's own default (about 89 Mpx) warns; twice that raises. We refuse anything above it
# outright so that one crafted file cannot take the machine's memory.
MAX_PIXELS = 89_478_485


class ImageError(Exception):
    """An input that cannot be used; `str(err)` is the reason shown to the user."""


# EXIF orientations that turn the image a quarter: its upright width is its stored height.
_QUARTER_TURNS = {5, 6, 7, 8}
ORIENTATION_TAG = 0x0112
# Formats Pillow can decode at 1/2, 1/4, 1/8 scale (MPO: the multi-picture JPEG of many
# cameras and phones, first picture).
_DCT_SCALED = ("JPEG", "MPO")


def load_rgb(path: str | Path, max_side: int | None = None) -> Image.Image:
    """Decode `path` into an RGB image, upright per its EXIF orientation.

    Grayscale, palette, CMYK, RGBA (composited on white) and 16-bit images are
    converted. With `max_side`, an image whose long side is above it is decoded smaller,
    its long side from `max_side` to under twice that: a JPEG at the DCT scale (1/2, 1/4
    or 1/8) that gets there, so the full image is never held; another format reduced by a
    whole factor once decoded. Raises ImageError with a reason for anything unusable.
    """
    with _opened(path) as img:
        if max_side is not None and max(img.size) > max_side:
            img.draft(img.mode, (img.width * max_side // max(img.size), img.height * max_side // max(img.size)))
        img.load()
        if max_side is not None and max(img.size) >= 2 * max_side:
            img = img.reduce(max(img.size) // max_side)
        return _upright_rgb(img)


def load_rgb_at_least(path: str | Path, need: tuple[float, float] | None) -> tuple[Image.Image, tuple[int, int]]:
    """`load_rgb`, but a JPEG is decoded at the smallest of its DCT scales (1/2, 1/4, 1/8)
    that keeps the upright image at least `need` = (width, height) pixels; returns the image
    and its full upright size (what the windows' pixel coordinates refer to).

    A 12 Mpx photo whose windows need 560 px is decoded at 1/4 scale, about 10x less work
    than decoding every pixel and then averaging them away in the resize. `None`: full size.
    """
    with _opened(path) as img:
        turned = _turned(img)
        full = (img.height, img.width) if turned else img.size
        if need is not None and img.format in _DCT_SCALED:
            w, h = math.ceil(need[0]), math.ceil(need[1])
            img.draft(img.mode, (h, w) if turned else (w, h))
        img.load()
        return _upright_rgb(img), full


def _upright_rgb(img: Image.Image) -> Image.Image:
    """A decoded image turned upright per its EXIF orientation, in RGB. Turned in place:
    `exif_transpose` otherwise copies every pixel of an image that needs no turn."""
    ImageOps.exif_transpose(img, in_place=True)
    return _to_rgb(img)


def upright_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of the image at `path` as `load_rgb` turns it upright, read from its
    header alone (nothing decoded). Raises ImageError as `load_rgb` does for what it can see."""
    with _opened(path) as img:
        return (img.height, img.width) if _turned(img) else img.size


def _turned(img: Image.Image) -> bool:
    """Whether the image's EXIF orientation turns it a quarter (swapping width and height)."""
    return img.getexif().get(ORIENTATION_TAG) in _QUARTER_TURNS


@contextlib.contextmanager
def _opened(path: str | Path) -> Iterator[Image.Image]:
    """The image at `path` opened (its header read), every failure an ImageError with a reason."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageError("file not found")
    except OSError as err:
        raise ImageError(f"cannot stat: {err.strerror or err}")
    if size == 0:
        raise ImageError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise ImageError(
                        f"decompression bomb: {img.width}x{img.height} exceeds {MAX_PIXELS} pixels"
                    )
                yield img
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"decompression bomb: {err}")
    except Image.UnidentifiedImageError:
        raise ImageError("not an image (unrecognised format)")
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        msg = str(err) or type(err).__name__
        if "truncated" in msg.lower() or isinstance(err, EOFError):
            raise ImageError(f"truncated image: {msg}")
        raise ImageError(f"cannot decode: {msg}")


# Pixels rescaled at a time by _stretch_to_uint8: bounds its float64 working block to 2 MB
# whatever the image size (the whole-image version needed over 1 GB of temporaries for a
# 9000 x 9000 16-bit PNG that is 175 KB on disk).
_STRETCH_BLOCK_PIXELS = 1 << 18


def _stretch_to_uint8(img: Image.Image) -> Image.Image:
    """A single-band 16/32-bit or float image, its [min, max] mapped linearly onto 0..255
    (truncated), as an "L" image; a constant image becomes black."""
    lo, hi = img.getextrema()
    out = np.zeros((img.height, img.width), dtype=np.uint8)
    if hi > lo:
        rows = max(1, _STRETCH_BLOCK_PIXELS // img.width)
        for top in range(0, img.height, rows):
            bottom = min(top + rows, img.height)
            block = np.asarray(img.crop((0, top, img.width, bottom)), dtype=np.float64)
            # In place, and in the order (x - lo) / (hi - lo) * 255, so that the values are
            # those of the whole-image formula, without its temporaries.
            np.subtract(block, lo, out=block)
            np.divide(block, hi - lo, out=block)
            np.multiply(block, 255.0, out=block)
            out[top:bottom] = block  # float -> uint8 truncates, as astype(np.uint8) does
    return Image.fromarray(out)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _stretch_to_uint8(img).convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")


def expand_inputs(inputs: Iterable[str]) -> list[str]:
    """Expand INPUT arguments: files, folders (recursive, image suffixes) and @list.txt.

    Paths are returned absolute and in a stable order. A path given explicitly is kept
    even if it is missing or has an odd suffix, so that it is reported as skipped.
    """
    out: list[str] = []
    for item in inputs:
        if item.startswith("@"):
            listing = Path(item[1:])
            if not listing.is_file():
                raise FileNotFoundError(f"list file not found: {listing}")
            base = listing.resolve().parent
            for line in listing.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    p = Path(line)
                    out.append(str(p if p.is_absolute() else (base / p).resolve()))
        elif os.path.isdir(item):
            for root, dirs, files in os.walk(item):
                dirs.sort()
                for name in sorted(files):
                    if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                        out.append(str(Path(root, name).resolve()))
        else:
            out.append(str(Path(item).resolve()))
    seen: set[str] = set()
    return [p for p in out if not (p in seen or seen.add(p))]
