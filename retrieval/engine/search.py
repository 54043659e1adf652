"""Ranking over a published view: exact kernel scoring, or FAISS candidates re-ranked exactly.

Image distance is the minimum (or the mean over query windows of the minimum) of the
Euclidean distances between window descriptors. Up to `exact_limit` images the kernel
scores every image (that is both exact and, measured, the faster way). Above it, each
query window's `per_patch` nearest database windows in the FAISS window index name
candidate images, the layout index adds the `layout_k` images nearest to the query's
windows laid end to end (`ann.py`), and the kernel scores those over all their window
pairs.

`rank_many` adds what goes beyond one comparison: several descriptions of one query (its
rotations; an image's distance is the smallest), query expansion (the top hits' own
window sets become queries too) and database-side augmentation (an image is scored with
its stored nearest neighbours, `retrieval/engine/neighbours.py`). Both combine distances with
alpha-QE weights, so a window-set distance needs no averaged descriptor.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import kernel
from .ann import WINDOW_BITS
from ..config import EXACT_LIMIT, QE_ALPHA
from .neighbours import Neighbours, qe_weight
from .snapshot import View

NPROBE = 16  # IVF lists per query window: recall 0.955 against 0.85 for 8 on hard data (benchmarks/results/scale.md)
LAYOUT_K = 128  # candidates from the layout index (benchmarks/results/scale.md)
# With FAISS candidates, re-ranking needs the distances of more images than the k shown.
RERANK_POOL = 100


@dataclass(frozen=True)
class Candidates:
    """How candidates are proposed above `exact_limit` images (None: the defaults):
    `per_patch` nearest windows per query window (max(4k, 64)) in `nprobe` IVF lists
    (NPROBE), and `layout_k` images from the layout index (LAYOUT_K; 0 leaves it out)."""

    exact_limit: int = EXACT_LIMIT
    per_patch: int | None = None
    nprobe: int | None = None
    layout_k: int | None = None


@dataclass
class Ranking:
    """Images sorted by distance (manifest ids), with the deciding pair of windows."""

    ids: np.ndarray  # int64 manifest image ids
    distances: np.ndarray  # float32
    query_patch: np.ndarray  # int32, window index within the query
    db_patch: np.ndarray  # int32, window index within the database image
    query: np.ndarray | None = None  # int32, which of rank_many's queries decided (None: the one query)


def rank(
    query: np.ndarray,
    view: View,
    k: int | None,
    aggregate: str = "mean-min",
    candidates: Candidates = Candidates(),
    layout_rows: np.ndarray | None = None,
) -> Ranking:
    """Rank the view's images for one query ([nq, d] unit vectors); k=None ranks every image.
    `layout_rows` are the database window positions of the query's windows (default: all,
    in order)."""
    c = candidates
    ann = view.ann if k is not None and view.images > c.exact_limit and view.state.ann else None
    pool = None
    if ann is not None:
        ann.nprobe = c.nprobe or NPROBE
        _, found = ann.search(query, c.per_patch or max(4 * k, 64))
        pool = found[found >= 0] >> WINDOW_BITS
        rows = np.arange(view.patches) if layout_rows is None else layout_rows
        layout = view.layout if c.layout_k != 0 and len(query) == len(rows) else None
        if layout is not None:
            # A query at fewer levels fills only its windows' places: the zeros elsewhere
            # make the inner product the sum over the windows it has.
            laid = np.zeros((view.patches, query.shape[1]), np.float32)
            laid[rows] = query
            _, near = layout.search(laid.reshape(1, -1), c.layout_k or LAYOUT_K)
            pool = np.concatenate([pool, near[near >= 0]])
        pool = np.unique(pool)
    ids, dist, qp, dp = _distances(query, view, pool, aggregate)
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


def rank_many(
    queries: list[np.ndarray],
    view: View,
    k: int | None,
    aggregate: str = "mean-min",
    candidates: Candidates = Candidates(),
    *,
    qe: int = 0,
    qe_alpha: float = QE_ALPHA,
    expand_rows: np.ndarray | None = None,
    neighbours: Neighbours | None = None,
    dba: int = 0,
) -> Ranking:
    """Rank for one query described several ways (e.g. its rotations), re-ranked with neighbours.

    An image's first distance is the smallest over `queries` ([nq_i, d] unit vectors
    each); `Ranking.query` says which decided. With `dba` > 0 each image's distance is
    averaged with those of its `dba` nearest neighbours in `neighbours` (weights
    alpha-QE of their distance to it). With `qe` > 0 the `qe` best images' own windows
    (their rows `expand_rows`, default all: the database places of the query's windows,
    which the layout index needs too) are scored as queries too, and the final
    distance is the weighted mean of the query's and theirs (weight 1 for the query,
    sim**qe_alpha for a hit at distance d, sim = 1 - d**2 / 2). With neither and one
    query this is `rank`.
    """
    if not queries:
        raise ValueError("rank_many needs at least one query")
    if dba and neighbours is None:
        raise ValueError("dba > 0 needs the neighbours of the database images")
    if not qe and not dba:
        parts = [rank(q, view, k, aggregate, candidates, expand_rows) for q in queries]
        if len(parts) == 1:
            return parts[0]
        # Each query's top k holds every image of the merged top k (a kept image is
        # beaten by fewer than k images under its deciding query), so merging is exact.
        ids = np.concatenate([p.ids for p in parts])
        dist = np.concatenate([p.distances for p in parts])
        which = np.concatenate([np.full(len(p.ids), i, np.int32) for i, p in enumerate(parts)])
        qp = np.concatenate([p.query_patch for p in parts])
        dp = np.concatenate([p.db_patch for p in parts])
        best = np.lexsort((which, dist, ids))
        best = best[np.r_[True, ids[best][1:] != ids[best][:-1]]] if len(best) else best
        order = best[top_k(dist[best], ids[best], k)]
        return Ranking(ids[order], dist[order], qp[order], dp[order], which[order])

    exact = k is None or view.images <= candidates.exact_limit or not view.state.ann
    depth = None if exact else max(k, RERANK_POOL)
    pool = None
    if not exact:
        pool = np.unique(np.concatenate([
            rank(q, view, depth, aggregate, candidates, expand_rows).ids for q in queries
        ]))
        if dba:
            pool = neighbours.widen(pool, dba)
    ids, d0, qp, dp, which = _scored(queries, view, pool, aggregate, neighbours, dba, qe_alpha)
    hits = top_k(d0, ids, qe) if qe else np.empty(0, np.int64)
    hit_d = d0[hits]
    expanded = [view.windows(int(i), expand_rows) for i in ids[hits]]
    if expanded and not exact:
        # The hits' own candidates are what lets expansion reach images the query missed.
        more = [rank(h, view, depth, aggregate, candidates, expand_rows).ids for h in expanded]
        wider = np.unique(np.concatenate([pool, *more]))
        if dba:
            wider = neighbours.widen(wider, dba)
        if len(wider) > len(pool):
            pool = wider
            ids, d0, qp, dp, which = _scored(queries, view, pool, aggregate, neighbours, dba, qe_alpha)
    total, weight = d0.astype(np.float64), 1.0
    for h, w in zip(expanded, qe_weight(hit_d, qe_alpha).tolist()):
        if w > 0:
            hd = _distances(h, view, pool, aggregate)[1]
            if dba:
                hd = neighbours.augment(ids, hd, dba, qe_alpha)
            total += w * hd
            weight += w
    dist = (total / weight).astype(np.float32)
    order = top_k(dist, ids, k)
    return Ranking(ids[order], dist[order], qp[order], dp[order], which[order])


def _scored(queries, view: View, pool, aggregate, neighbours, dba: int, alpha: float):
    """_first, then database-side augmentation when asked."""
    ids, dist, qp, dp, which = _first(queries, view, pool, aggregate)
    if dba and len(ids):
        dist = neighbours.augment(ids, dist, dba, alpha)
    return ids, dist, qp, dp, which


def _first(queries, view: View, pool, aggregate):
    """Distances of the pool (None: every live image) to the nearest of several queries."""
    scored = [_distances(q, view, pool, aggregate) for q in queries]
    ids = scored[0][0]
    dist = np.stack([s[1] for s in scored])
    which = np.argmin(dist, axis=0).astype(np.int32)  # ties: the earliest query (rotation 0 first)
    col = np.arange(len(ids))
    pick = lambda j: np.stack([s[j] for s in scored])[which, col]  # noqa: E731
    return ids, dist[which, col], pick(2), pick(3), which


def _distances(query: np.ndarray, view: View, pool: np.ndarray | None, aggregate: str):
    """(ids, dist, query_patch, db_patch) of the pool (None: every live image), in view order."""
    if pool is None:
        parts = [_score(query, view, i, view.live_rows(i), aggregate) for i in range(len(view.segments))]
    else:
        segment, row = view.locate(pool)
        parts = [_score(query, view, i, np.sort(row[segment == i]), aggregate) for i in np.unique(segment).tolist()]
    if not parts:
        empty = np.empty(0, np.int64)
        return empty, empty.astype(np.float32), empty.astype(np.int32), empty.astype(np.int32)
    return tuple(np.concatenate(p) for p in zip(*parts))
