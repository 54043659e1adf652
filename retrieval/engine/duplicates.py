"""`retrieval duplicates`: groups of indexed images that show the same thing.

Built on each image's nearest images (`neighbours.npz`, `retrieval/engine/neighbours.py`),
so no pair of images is compared outside the candidate structures. The window-set
distance is asymmetric: a crop's windows all find themselves in the full image, not the
other way round, so a pair's distance is the smaller of its two directions (either
image's list may hold it).

Grouping rule: leaders. Images are taken in order of how many images lie within
`max_distance` of them (most first, then the smaller mean distance); an image not yet
grouped leads a group of itself and every not-yet-grouped image within `max_distance`
of it. Every member is near the group's first image, so a chain of near pairs
(A near B, B near C, A far from C) never pulls A and C into one group, which single
linkage (connected components) does: measured in benchmarks/results/duplicates.md.

Default `max_distance`: set per index from its own distances (`default_max_distance`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..extraction.patches import level_regions, pixel_boxes
from .manifest import Entry
from .neighbours import Neighbours
from .search import image_distances
from .snapshot import View

# Neighbours per image the groups are found from: a group holds at most K + 1 images
# through its leader's list, plus those whose own lists name the leader.
K = 10
# The default threshold, per index: a share of how far unrelated images are. An image's
# K-th neighbour is, for all but groups of more than K images, something else, and the
# median of those distances is the index's typical "unrelated" distance (whitened window
# sets of unrelated images: about 1.29 on both benchmark sets). The share is fitted on
# the copies and UKBench sets of benchmarks/duplicates_bench.py, whose best F1 lie at
# 0.85-0.89 of it (benchmarks/results/duplicates.md). A quantile of neighbours K/2..K was
# tried first and failed on groups of 8 copies, whose mates fill those columns.
UNRELATED_SHARE = 0.85
RULE = f"per index: {UNRELATED_SHARE:g} x the median distance of every image's {K}-th nearest neighbour"


@dataclass(frozen=True)
class Member:
    """One image of a group and its distance to the group's first image (0 for the first)."""

    id: int
    path: str
    distance: float

    def to_dict(self) -> dict:
        return {"id": self.id, "path": self.path, "distance": round(self.distance, 6)}


@dataclass
class Duplicates:
    """The groups of an index, largest first, as `retrieval duplicates --json` prints them."""

    index: str
    images: int
    groups: list[list[Member]]
    max_distance: float
    rule: str
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "images": self.images,
            "groups": [{"images": [m.to_dict() for m in g]} for g in self.groups],
            "max_distance": round(self.max_distance, 6),
            "max_distance_rule": self.rule,
            "seconds": round(self.seconds, 3),
        }


def pair_distances(neighbours: Neighbours, live: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair (a < b) of live images one of whose lists names the other, with the
    smaller of its two distances: (a, b, distance)."""
    live = np.asarray(live, np.int64)
    rows = np.isin(neighbours.ids, live)
    a = np.repeat(neighbours.ids[rows], neighbours.k)
    b = neighbours.neighbours[rows].ravel()
    d = neighbours.distances[rows].ravel()
    keep = (b >= 0) & (b != a) & np.isin(b, live) & np.isfinite(d)
    a, b, d = a[keep], b[keep], d[keep]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    order = np.lexsort((d, hi, lo))
    lo, hi, d = lo[order], hi[order], d[order]
    first = np.ones(len(lo), bool)
    first[1:] = (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])
    return lo[first], hi[first], d[first]


def default_max_distance(neighbours: Neighbours, live: np.ndarray) -> float:
    """The per-index default (`RULE`): UNRELATED_SHARE x the median distance of the live
    images' K-th neighbour; 0 (no groups) when no image has K neighbours (an index of K
    images or fewer), as nothing then says what unrelated looks like."""
    rows = np.isin(neighbours.ids, np.asarray(live, np.int64))
    last = neighbours.distances[rows, K - 1] if neighbours.k >= K else np.empty(0, np.float32)
    last = last[np.isfinite(last)]
    return float(UNRELATED_SHARE * np.median(last)) if len(last) else 0.0


def leader_groups(a: np.ndarray, b: np.ndarray, d: np.ndarray, max_distance: float,
                  min_size: int = 2) -> list[list[tuple[int, float]]]:
    """The groups (lists of (image id, distance to the first)) of the pairs (a, b, d),
    by the leader rule of this module's docstring; groups under `min_size` are dropped;
    largest first, then by their first image's id."""
    near = d <= max_distance
    src = np.concatenate([a[near], b[near]])
    dst = np.concatenate([b[near], a[near]])
    dist = np.concatenate([d[near], d[near]]).astype(np.float64)
    if not len(src):
        return []
    order = np.lexsort((dst, dist, src))
    src, dst, dist = src[order], dst[order], dist[order]
    nodes, start, degree = np.unique(src, return_index=True, return_counts=True)
    mean = np.add.reduceat(dist, start) / degree
    grouped: set[int] = set()
    groups: list[list[tuple[int, float]]] = []
    for at in np.lexsort((nodes, mean, -degree)).tolist():
        leader = int(nodes[at])
        if leader in grouped:
            continue
        lo, hi = start[at], start[at] + degree[at]
        members = [(leader, 0.0)] + [(int(j), float(x)) for j, x in zip(dst[lo:hi].tolist(), dist[lo:hi].tolist())
                                     if j not in grouped]
        if len(members) < 2:
            continue
        grouped.update(m for m, _ in members)
        if len(members) >= min_size:
            groups.append(members)
    groups.sort(key=lambda g: (-len(g), g[0][0]))
    return groups


def matched_boxes(view: View, levels: Sequence[int], first: Entry, other: Entry) -> tuple[list[float], list[float]]:
    """The closest pair of windows of two indexed images (all their database windows), as
    pixel boxes (x0, y0, x1, y1) of each: what the groups page draws. The kernel's `min`
    distance decides the pair, as it decides a hit's boxes."""
    _, _, qp, dp = image_distances(view.windows(first.id), view, np.array([other.id], np.int64), "min")
    layout = np.concatenate([level_regions(lv).boxes for lv in levels])
    return (np.round(pixel_boxes(layout[qp[0]], first.width, first.height), 1).tolist(),
            np.round(pixel_boxes(layout[dp[0]], other.width, other.height), 1).tolist())
