"""Reading images and input lists, with a reason for everything that cannot be read."""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}

# Pillow's own default (about 89 Mpx) warns; twice that raises. We refuse anything above it
# outright so that one crafted file cannot take the machine's memory.
MAX_PIXELS = 89_478_485
ORIENTATION_TAG = 0x0112
_QUARTER_TURNS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
# Formats Pillow can decode at 1/2, 1/4, 1/8 scale (MPO: the multi-picture JPEG of many
# cameras and phones, first picture).
_DCT_SCALED = ("JPEG", "MPO")


class ImageError(Exception):
    """An input that cannot be used; `str(err)` is the reason shown to the user."""


def load_rgb(path: str | Path) -> Image.Image:
    """Decode `path` fully into an RGB image, upright per its EXIF orientation.

    Grayscale, palette, CMYK, RGBA (composited on white) and 16-bit images are
    converted. Raises ImageError with a reason for anything unusable.
    """
    return load_rgb_at_least(path, None)[0]


def load_rgb_at_least(path: str | Path, need: tuple[float, float] | None) -> tuple[Image.Image, tuple[int, int]]:
    """`load_rgb`, but a JPEG is decoded at the smallest of its DCT scales (1/2, 1/4, 1/8)
    that keeps the upright image at least `need` = (width, height) pixels; returns the image
    and its full upright size (what the windows' pixel coordinates refer to).

    A 12 Mpx photo whose windows need 560 px is decoded at 1/4 scale, about 10x less work
    than decoding every pixel and then averaging them away in the resize. `None`: full size.
    """
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
                turned = img.getexif().get(ORIENTATION_TAG) in _QUARTER_TURNS
                full = (img.height, img.width) if turned else img.size
                if need is not None and img.format in _DCT_SCALED:
                    w, h = need
                    img.draft(img.mode, (math.ceil(h), math.ceil(w)) if turned else (math.ceil(w), math.ceil(h)))
                img.load()
                img = ImageOps.exif_transpose(img)
                return _to_rgb(img), full
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
