"""Window descriptors from network outputs: a whole map pooled into a vector (avg, max,
GeM), the cells of a map under a window (`roi`), and the `pyramid` mode's windows pooled
with fractional cells from the maps of an image's inputs at two sizes (which inputs a
window needs: `pyramid_plan`; worked out once per region sets: `pyramid_layout`).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np

from .. import config as _config
from .patches import RegionSet

GEM_P = 3.0


def pool_map(feat: np.ndarray, how: str) -> np.ndarray:
    """Pool one feature map [C, h, w] into a vector; a vector [C] passes through."""
    if feat.ndim == 1:
        return feat.astype(np.float32)
    flat = feat.reshape(feat.shape[0], -1)
    if how == "avg":
        return flat.mean(axis=1)
    if how == "max":
        return flat.max(axis=1)
    return _gem_root(np.mean(_gem_power(flat), axis=1))


def _gem_power(x: np.ndarray) -> np.ndarray:
    """GeM's first step, max(x, 1e-6) ** GEM_P, by multiplication for the default p = 3:
    the generic power is the bulk of pyramid's GeM pooling (7x avg's cost with `**`)."""
    x = np.maximum(x, np.float32(1e-6))
    if GEM_P != 3.0:
        return x ** GEM_P
    cube = np.multiply(x, x)
    return np.multiply(cube, x, out=cube)  # in place: one temporary of the map's size, not two


def _gem_root(x: np.ndarray) -> np.ndarray:
    """GeM's last step, x ** (1 / GEM_P)."""
    return np.cbrt(x) if GEM_P == 3.0 else x ** (1.0 / GEM_P)


def roi_pool(fmap: np.ndarray, box, how: str) -> np.ndarray:
    """Pool the cells of a [C, h, w] map that a relative box covers (at least one cell)."""
    _, h, w = fmap.shape
    x0, y0, x1, y1 = box
    c0 = min(w - 1, int(np.floor(x0 * w + 1e-6)))
    r0 = min(h - 1, int(np.floor(y0 * h + 1e-6)))
    c1 = max(c0 + 1, int(np.ceil(x1 * w - 1e-6)))
    r1 = max(r0 + 1, int(np.ceil(y1 * h - 1e-6)))
    return pool_map(fmap[:, r0:r1, c0:c1], how)


def pyramid_scales_of(box) -> tuple[int, ...]:
    """pyramid mode: the inputs a window is pooled from, 0 being the input at the network's
    size and 1 the larger one. (0,) when the window covers at least PYRAMID_WHOLE of the
    image side (geometric mean of its relative width and height: level 1), whose pooling
    from the network's size is crop's own descriptor; (0, 1) for every smaller window,
    whose two poolings are averaged (`pyramid_pool`). Depends on the box alone, so a
    window's descriptor is the same whichever other windows are extracted with it."""
    x0, y0, x1, y1 = (float(v) for v in box)
    side = np.sqrt(max(x1 - x0, 1e-9) * max(y1 - y0, 1e-9))
    return (0,) if side >= _config.PYRAMID_WHOLE - 1e-9 else (0, 1)


def pyramid_plan(regions) -> tuple[list[tuple[int, bool]], list[list[tuple[int, ...]]]]:
    """pyramid mode: the network inputs an image needs, as (scale index, mirrored) in
    ascending order, and for every region set the inputs each of its windows is pooled
    from (indices into the first list, in the order of `pyramid_scales_of`)."""
    layout = pyramid_layout(regions)
    return list(layout.needs), [list(per_set) for per_set in layout.where]  # copies: the layout is shared


def pyramid_layout(regions: Sequence[RegionSet]) -> "_PyramidLayout":
    return _pyramid_layout(_regions_key(regions))


def _regions_key(regions: Sequence[RegionSet]) -> tuple:
    """What a pyramid layout depends on: the windows and their mirror flags (not the
    names: a region set cut to some of its windows keeps its name)."""
    return tuple((np.asarray(rs.boxes, np.float64).tobytes(), np.asarray(rs.flips, bool).tobytes()) for rs in regions)


@dataclass(frozen=True)
class _PyramidLayout:
    """Everything about an image's pyramid that depends on its region sets alone, worked
    out once per region sets rather than per image (the Python loops over windows cost
    an eighth of the pyramid's CPU beside the network; benchmarks/results/describe.md)."""

    needs: tuple  # network inputs, (scale index, mirrored), ascending
    where: tuple  # per region set, per window: the inputs it is pooled from
    boxes: np.ndarray  # [n, 4] every window, mirrored ones as boxes of the mirrored input
    columns: tuple  # per depth k: ((input, window rows, their boxes), ...) for the k-th input of windows
    ends: np.ndarray  # where each region set's windows end


@lru_cache(maxsize=64)
def _pyramid_layout(key: tuple) -> _PyramidLayout:
    regions = [(np.frombuffer(b, np.float64).reshape(-1, 4), np.frombuffer(f, bool)) for b, f in key]
    windows = [[(pyramid_scales_of(box), bool(flip)) for box, flip in zip(boxes, flips)] for boxes, flips in regions]
    needs = sorted({(scale, flip) for per_set in windows for scales, flip in per_set for scale in scales})
    slot = {need: i for i, need in enumerate(needs)}
    where = [[tuple(slot[(scale, flip)] for scale in scales) for scales, flip in per_set] for per_set in windows]
    slots = [s for per_set in where for s in per_set]
    boxes = np.concatenate([b for b, _ in regions]) if regions else np.zeros((0, 4))
    flips = np.concatenate([f for _, f in regions]) if regions else np.zeros(0, bool)
    boxes[flips] = boxes[flips][:, [2, 1, 0, 3]] * [-1, 1, -1, 1] + [1, 0, 1, 0]
    depth = max((len(s) for s in slots), default=1)
    columns = []
    for k in range(depth):
        column = np.array([s[k] if k < len(s) else -1 for s in slots], dtype=np.int64)
        members = [np.flatnonzero(column == i) for i in np.unique(column[column >= 0])]
        columns.append(tuple((int(column[m[0]]), m, _boxes_key(boxes[m])) for m in members))
    ends = np.cumsum([len(per_set) for per_set in where])
    boxes.flags.writeable = ends.flags.writeable = False
    return _PyramidLayout(tuple(needs), tuple(tuple(w) for w in where), boxes, tuple(columns), ends)


def pyramid_pool(regions: Sequence[RegionSet], maps: list[np.ndarray], how: str,
                 average: str) -> dict[str, np.ndarray]:
    """pyramid mode: the [n, C] descriptors of every region set's windows, by name, from
    the maps of the image's inputs (in the order of `pyramid_plan`). A window pooled from
    two maps gets the average of the two L2-normalised poolings, each weighing by the
    cells of its map (a window spans the same share of every map, so this counts each
    cell the window covers once), at the norm of the first (the network's size) so that
    every level keeps the scale of level 1 for the whitening. Averaged beat the larger map
    alone, and cell-weighted beat the plain mean (SqueezeNet's UKBench N-S 3.893 -> 3.915
    against crop's 3.922, MobileNetV2 unchanged; benchmarks/results/describe.md). Every
    window a map gives is pooled in one product: per region set, GeM's power of the same
    map was computed again for each level. `average` "mean": the plain mean of the two
    (config.PYRAMID_AVERAGES; indexes built before the weighting keep it)."""
    layout = pyramid_layout(regions)
    n = len(layout.boxes)
    channels = maps[0].shape[0] if n else 0
    vecs = np.zeros((len(layout.columns), n, channels), np.float32)
    cells = np.zeros((len(layout.columns), n, 1), np.float32)
    for k, column in enumerate(layout.columns):
        for slot, members, boxes in column:
            vecs[k, members] = _area_pool_many(maps[slot], boxes, how)
            cells[k, members] = maps[slot].shape[1] * maps[slot].shape[2] if average == "cells" else 1.0
    if len(layout.columns) > 1:
        norms = np.linalg.norm(vecs, axis=2, keepdims=True)
        unit = vecs / np.maximum(norms, 1e-12)
        vecs = (norms[0] * (cells * unit).sum(axis=0) / cells.sum(axis=0))[None].astype(np.float32, copy=False)
    return {rs.name: part for rs, part in zip(regions, np.split(vecs[0], layout.ends[:-1]))}


def _cell_weights(n: int, lo: float, hi: float) -> np.ndarray:
    """How much of each of n equal cells over [0, 1] the interval [lo, hi] covers,
    normalised to sum 1 (the nearest cell when the interval is empty)."""
    edges = np.arange(n + 1) / n
    w = np.clip(np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo), 0.0, None)
    if w.sum() <= 0:
        w = np.zeros(n)
        w[min(n - 1, max(0, int((lo + hi) / 2 * n)))] = 1.0
    return w / w.sum()


@lru_cache(maxsize=256)
def _window_weights(h: int, w: int, boxes: tuple) -> np.ndarray:
    """[h * w, n] cell weights of n relative boxes over an h x w map (cached: every image
    of a collection asks for the same few)."""
    weights = np.stack(
        [np.outer(_cell_weights(h, y0, y1), _cell_weights(w, x0, x1)).ravel() for x0, y0, x1, y1 in boxes], axis=1
    ).astype(np.float32)
    weights.flags.writeable = False
    return weights


def _boxes_key(boxes: np.ndarray) -> tuple:
    return tuple(tuple(float(v) for v in box) for box in boxes)


def _area_pool_many(fmap: np.ndarray, boxes: np.ndarray | tuple, how: str) -> np.ndarray:
    """`_area_pool` of many boxes of one map, [n, C]: avg and GeM as one matrix product.
    `boxes` as an array, or as `_boxes_key` gives them (what the weights are cached by)."""
    if how == "max":
        return np.stack([_area_pool(fmap, box, how) for box in boxes]).astype(np.float32)
    c, h, w = fmap.shape
    weights = _window_weights(h, w, boxes if isinstance(boxes, tuple) else _boxes_key(boxes))
    flat = fmap.reshape(c, h * w).astype(np.float32, copy=False)
    if how == "avg":
        return (flat @ weights).T
    return _gem_root((_gem_power(flat) @ weights).T)


def _area_pool(fmap: np.ndarray, box, how: str) -> np.ndarray:
    """Pool a [C, h, w] map over a relative box with fractional cells: each cell weighs by
    the part of it the box covers (avg and GeM); max takes the cells the box covers at
    least half of along each axis (the most covered one when none is)."""
    _, h, w = fmap.shape
    x0, y0, x1, y1 = (float(v) for v in box)
    wy, wx = _cell_weights(h, y0, y1), _cell_weights(w, x0, x1)
    if how == "max":
        rows = wy * h * (y1 - y0) >= 0.5 - 1e-6 if y1 > y0 else wy > 0
        cols = wx * w * (x1 - x0) >= 0.5 - 1e-6 if x1 > x0 else wx > 0
        rows = rows if rows.any() else wy == wy.max()
        cols = cols if cols.any() else wx == wx.max()
        return fmap[:, rows][:, :, cols].reshape(fmap.shape[0], -1).max(axis=1)
    if how == "avg":
        return np.einsum("chw,h,w->c", fmap, wy, wx, optimize=True).astype(np.float32)
    return _gem_root(np.einsum("chw,h,w->c", _gem_power(fmap), wy, wx, optimize=True)).astype(np.float32)
