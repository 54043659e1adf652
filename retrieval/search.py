"""Ranking: FAISS proposes candidate images, the native kernel scores them exactly.

Image distance is the minimum (or the mean over query windows of the minimum) of the
Euclidean distances between window descriptors. FAISS only narrows the field: each
query window's nearest database windows name candidate images, which the kernel then
scores over all their window pairs. Below `exact_limit` images every image is scored.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import kernel
from .ann import VectorIndex

EXACT_LIMIT = 20_000


@dataclass
class Ranking:
    """Images sorted by distance: positions into the database, with the deciding windows."""

    images: np.ndarray  # int64 row numbers of database images
    distances: np.ndarray  # float32
    query_patch: np.ndarray  # int32, window index within the query
    db_patch: np.ndarray  # int32, window index within the database image


def rank(
    query: np.ndarray,
    vectors: np.ndarray,
    patches_per_image: int,
    ann: VectorIndex | None,
    k: int | None,
    aggregate: str = "min",
    exact_limit: int = EXACT_LIMIT,
    per_patch: int | None = None,
) -> Ranking:
    """Rank the database for one query ([nq, d] unit vectors); k=None ranks every image.

    Above `exact_limit` images (and when k is given), only the images owning one of the
    `per_patch` nearest database windows of some query window are scored.
    """
    n_images = len(vectors) // patches_per_image if patches_per_image else 0
    offsets = np.arange(n_images + 1, dtype=np.int64) * patches_per_image
    if n_images == 0:
        empty = np.empty(0, dtype=np.int64)
        return Ranking(empty, empty.astype(np.float32), empty.astype(np.int32), empty.astype(np.int32))
    candidates = None
    if k is not None and n_images > exact_limit and ann is not None:
        candidates = candidate_images(query, ann, patches_per_image, per_patch or max(4 * k, 64))
    dist, qp, dp = kernel.patch_distances(query, vectors, offsets, candidates, aggregate)
    ids = np.arange(n_images, dtype=np.int64) if candidates is None else candidates
    order = top_k(dist, ids, k)
    return Ranking(ids[order], dist[order], qp[order], dp[order])


def candidate_images(query: np.ndarray, ann: VectorIndex, patches_per_image: int, per_patch: int) -> np.ndarray:
    """Sorted row numbers of the images owning any of the `per_patch` nearest windows of
    any query window (the windows of image i are rows i*P .. (i+1)*P-1)."""
    _, ids = ann.search(query, per_patch)
    ids = ids[ids >= 0]
    return np.unique(ids // patches_per_image).astype(np.int64)


def top_k(dist: np.ndarray, ids: np.ndarray, k: int | None) -> np.ndarray:
    """Positions of the k smallest distances (all if k is None), ties broken by image id."""
    if k is not None and k < len(dist):
        top = np.argpartition(dist, k - 1)[:k]
        return top[np.lexsort((ids[top], dist[top]))]
    return np.lexsort((ids, dist))
