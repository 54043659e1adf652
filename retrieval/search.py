"""Ranking over a published view: exact kernel scoring, or FAISS candidates re-ranked exactly.

Image distance is the minimum (or the mean over query windows of the minimum) of the
Euclidean distances between window descriptors. Up to `exact_limit` images the kernel
scores every image (that is both exact and, measured, the faster way). Above it, each
query window's `per_patch` nearest database windows in the FAISS structure name
candidate images, and the kernel scores those over all their window pairs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import kernel
from .ann import WINDOW_BITS
from .config import EXACT_LIMIT
from .snapshot import View

NPROBE = 16  # IVF lists per query window: recall 0.955 against 0.85 for 8 on hard data (RESULTS.md section 8)


@dataclass
class Ranking:
    """Images sorted by distance (manifest ids), with the deciding pair of windows."""

    ids: np.ndarray  # int64 manifest image ids
    distances: np.ndarray  # float32
    query_patch: np.ndarray  # int32, window index within the query
    db_patch: np.ndarray  # int32, window index within the database image


def rank(
    query: np.ndarray,
    view: View,
    k: int | None,
    aggregate: str = "mean-min",
    exact_limit: int = EXACT_LIMIT,
    per_patch: int | None = None,
    nprobe: int | None = None,
) -> Ranking:
    """Rank the view's images for one query ([nq, d] unit vectors); k=None ranks every image."""
    ann = view.ann if k is not None and view.images > exact_limit and view.state.ann else None
    if ann is None:
        parts = [_score(query, view, i, view.live_rows(i), aggregate) for i in range(len(view.segments))]
    else:
        ann.nprobe = nprobe or NPROBE
        _, found = ann.search(query, per_patch or max(4 * k, 64))
        segment, row = view.locate(np.unique(found[found >= 0] >> WINDOW_BITS))
        parts = [
            _score(query, view, i, np.sort(row[segment == i]), aggregate)
            for i in np.unique(segment).tolist()
        ]
    if not parts:
        empty = np.empty(0, np.int64)
        return Ranking(empty, empty.astype(np.float32), empty.astype(np.int32), empty.astype(np.int32))
    ids, dist, qp, dp = (np.concatenate(p) for p in zip(*parts))
    order = top_k(dist, ids, k)
    return Ranking(ids[order], dist[order], qp[order], dp[order])


def _score(query, view: View, segment: int, rows: np.ndarray | None, aggregate: str):
    seg = view.segments[segment]
    dist, qp, dp = kernel.patch_distances(query, seg.vectors, view.offsets(segment), rows, aggregate)
    ids = seg.ids if rows is None else seg.ids[rows]
    return ids, dist, qp, dp


def top_k(dist: np.ndarray, ids: np.ndarray, k: int | None) -> np.ndarray:
    """Positions of the k smallest distances (all if k is None), ties broken by image id."""
    if k is not None and k < len(dist):
        top = np.argpartition(dist, k - 1)[:k]
        return top[np.lexsort((ids[top], dist[top]))]
    return np.lexsort((ids, dist))
