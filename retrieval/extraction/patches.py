"""Sub-patch windows (Azizpour et al., spatial search) and the 12-crop jitter.

A *region set* is a named list of windows in relative coordinates [x0, y0, x1, y1] in
0..1, each optionally mirrored. The feature store keys descriptors by region-set name, so
level 1 extracted once is reused by every later run that asks for level 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

JITTER = "jitter12"


@dataclass(frozen=True)
class RegionSet:
    """Windows in relative coordinates, shape [n, 4] (x0, y0, x1, y1), and mirror flags."""

    name: str
    boxes: np.ndarray
    flips: np.ndarray

    def __len__(self) -> int:
        return len(self.boxes)


def level_boxes(level: int) -> np.ndarray:
    """The l x l windows of level l, each 2/(l+1) of the side, outer ones on the borders.

    Consecutive windows start 1/(l+1) apart, so neighbours overlap by half. Row-major:
    window (row j, column i) is at index j * l + i.
    """
    if level < 1:
        raise ValueError(f"level must be >= 1 (got {level})")
    if level == 1:
        return np.array([[0.0, 0.0, 1.0, 1.0]], dtype=np.float64)
    starts = np.arange(level) / (level + 1)
    side = 2.0 / (level + 1)
    ys, xs = np.meshgrid(starts, starts, indexing="ij")
    x0, y0 = xs.ravel(), ys.ravel()
    return np.stack([x0, y0, x0 + side, y0 + side], axis=1)


@lru_cache(maxsize=None)
def level_regions(level: int) -> RegionSet:
    boxes = level_boxes(level)
    return RegionSet(f"level{level}", boxes, np.zeros(len(boxes), dtype=bool))


@lru_cache(maxsize=None)
def jitter_regions() -> RegionSet:
    """The 12 samples of Razavian et al.: 4 corners, centre, whole image, and their mirrors.

    Corner and centre crops cover 0.75 of each side (the 224-of-~300 crops of the papers).
    """
    s = 0.75
    boxes = np.array(
        [
            [0, 0, s, s],
            [1 - s, 0, 1, s],
            [0, 1 - s, s, 1],
            [1 - s, 1 - s, 1, 1],
            [(1 - s) / 2, (1 - s) / 2, (1 + s) / 2, (1 + s) / 2],
            [0, 0, 1, 1],
        ],
        dtype=np.float64,
    )
    return RegionSet(
        JITTER,
        np.concatenate([boxes, boxes]),
        np.repeat(np.array([False, True]), len(boxes)),
    )


def region_set(name: str) -> RegionSet:
    """Look a region set up by its store name: `level1`..`level4` or `jitter12`."""
    if name == JITTER:
        return jitter_regions()
    if name.startswith("level") and name[5:].isdigit():
        return level_regions(int(name[5:]))
    raise ValueError(f"unknown region set {name!r}")


def level_names(levels: tuple[int, ...] | list[int]) -> list[str]:
    return [f"level{level}" for level in levels]


def pixel_boxes(rel_boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Relative boxes to pixel boxes of a width x height image (float, x0 y0 x1 y1)."""
    scale = np.array([width, height, width, height], dtype=np.float64)
    return np.asarray(rel_boxes, dtype=np.float64) * scale


def unrotate_boxes(boxes: np.ndarray, rotation: int, width: int, height: int) -> np.ndarray:
    """Pixel boxes of an image turned `rotation` degrees counter-clockwise (now width x
    height) as boxes of the image before the turn."""
    x0, y0, x1, y1 = (np.asarray(boxes, np.float64).reshape(-1, 4)[:, i] for i in range(4))
    if rotation == 90:  # (x, y) went to (y, W0 - x), W0 = height
        return np.stack([height - y1, x0, height - y0, x1], axis=1)
    if rotation == 180:
        return np.stack([width - x1, height - y1, width - x0, height - y0], axis=1)
    if rotation == 270:  # (x, y) went to (H0 - y, x), H0 = width
        return np.stack([y0, width - x1, y1, width - x0], axis=1)
    return np.stack([x0, y0, x1, y1], axis=1)
