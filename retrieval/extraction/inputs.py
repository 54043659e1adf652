"""An image to describe (`Job`) and its network inputs: decoded at the smallest JPEG
scale its windows allow (`decode_need`), cut into one input per window (`crop`), the
whole image (`roi`), or the whole image squashed to each size its windows need
(`pyramid`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .. import config as _config
from .images import ImageError, load_rgb_at_least
from .patches import RegionSet
from .pooling import pyramid_layout

# PIL's counter-clockwise turns: lossless (pixels are moved, not resampled).
TRANSPOSE = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}


@dataclass(frozen=True)
class Job:
    """One image to describe: `crop` (pixels x0, y0, x1, y1) restricts it to a box first,
    then `rotation` (0, 90, 180 or 270 degrees counter-clockwise) turns what is left."""

    path: str
    regions: tuple[RegionSet, ...]
    crop: tuple[float, float, float, float] | None = None
    tag: object = None
    rotation: int = 0


def prepare_inputs(
    job: Job, size: tuple[int, int], mode: str, roi_size: int | None = None
) -> tuple[tuple[int, int], list[np.ndarray]]:
    """Decode one image and cut its network inputs (uint8 H x W x 3).

    crop: one input per window, in region-set order. roi: the whole image (at the
    network's size, or with its long side at `roi_size`), plus its mirror if any region
    set mirrors; windows are pooled from the feature map later. pyramid: the whole image
    resized to a square at each scale of `pyramid_plan` that a window needs (and mirrored
    where a mirrored window needs it), in the plan's order; the larger size is a square
    of side `roi_size`, or PYRAMID_RATIO times the network's input size.
    """
    img, full = load_rgb_at_least(job.path, decode_need(job, size, mode, roi_size))
    if job.crop is not None:
        x0, y0, x1, y1 = job.crop
        box = (max(0, int(x0)), max(0, int(y0)), min(img.width, int(round(x1))), min(img.height, int(round(y1))))
        if box[2] - box[0] < 1 or box[3] - box[1] < 1:
            raise ImageError(f"crop box {job.crop} is empty for a {img.width}x{img.height} image")
        img = img.crop(box)
        full = img.size
    if job.rotation:
        img = img.transpose(TRANSPOSE[job.rotation])
        full = full[::-1] if job.rotation in (90, 270) else full
    # Windows are cut in the decoded image's pixels (fewer than `full` when a JPEG was
    # decoded at a reduced scale); the size reported is the full one.
    w, h = img.size
    out_h, out_w = size
    if mode == "pyramid":
        big_w = roi_size or round(out_w * _config.PYRAMID_RATIO)
        shapes = [(out_w, out_h), (big_w, max(32, round(out_h * big_w / out_w)))]
        inputs = []
        resized: dict[int, np.ndarray] = {}
        for scale_index, flip in pyramid_layout(job.regions).needs:
            if scale_index not in resized:
                resized[scale_index] = np.asarray(img.resize(shapes[scale_index], Image.BILINEAR))
            arr = resized[scale_index]
            inputs.append(np.ascontiguousarray(arr[:, ::-1]) if flip else arr)
        return full, inputs
    if mode == "roi":
        if roi_size:
            scale = roi_size / max(w, h)
            out_w, out_h = max(32, round(w * scale)), max(32, round(h * scale))
        whole = np.asarray(img.resize((out_w, out_h), Image.BILINEAR))
        inputs = [whole]
        if any(rs.flips.any() for rs in job.regions):
            inputs.append(np.ascontiguousarray(whole[:, ::-1]))
        return full, inputs
    scale = np.array([w, h, w, h], dtype=np.float64)
    inputs = []
    for rs in job.regions:
        for box, flip in zip(rs.boxes * scale, rs.flips):
            piece = img.resize((out_w, out_h), Image.BILINEAR, box=tuple(float(v) for v in box))
            if flip:
                piece = piece.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            inputs.append(np.asarray(piece))
    return full, inputs


def decode_need(
    job: Job, size: tuple[int, int], mode: str, roi_size: int | None = None
) -> tuple[float, float] | None:
    """The smallest upright image (width, height) from which every network input of `job`
    is cut by shrinking, never enlarging: a JPEG decoded at a reduced scale that keeps this
    much gives nearly the descriptors of the full decode. None (decode in full) when the
    job's crop box is in full-resolution pixels or it has no windows."""
    boxes = [rs.boxes for rs in job.regions if len(rs)]
    if job.crop is not None or not boxes:
        return None
    out_h, out_w = size
    if mode == "crop":
        sides = np.concatenate(boxes)
        need = (out_w / float((sides[:, 2] - sides[:, 0]).min()), out_h / float((sides[:, 3] - sides[:, 1]).min()))
    elif mode == "pyramid":
        big = roi_size or round(out_w * _config.PYRAMID_RATIO)
        larger = any(scale == 1 for scale, _ in pyramid_layout(job.regions).needs)
        need = (big, max(32, round(out_h * big / out_w))) if larger else (out_w, out_h)
    else:
        # roi keeps the aspect with --roi-size: its short side is not known before decoding.
        need = (roi_size, roi_size) if roi_size else (out_w, out_h)
    return need[::-1] if job.rotation in (90, 270) else need
