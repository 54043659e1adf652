"""Keeping every image's nearest-image list current as images come and go.

The writer calls `update` after each publish (`retrieval/engine/writer.py`);
`retrieval dba` calls it with no previous lists (from scratch). Its cost follows the
change, not the collection:

- an image with no list yet (new) is searched against the collection (the index's
  query levels and image distance); so is one whose list lost a removed image, in exact
  mode, and with FAISS candidates once it has lost half its entries (`REFILL_BELOW`):
  until then it keeps the rest in order, which are its nearest still (what replaces a
  removed image lies beyond them), and new images fill its empty places as they come;
- every other image keeps its list, merged with its distances to the new images. While
  the kernel scores every image (exact mode) those are all its distances to the new
  images, so the lists equal a from-scratch computation; with FAISS candidates only the
  images a new image found near it (its `REVERSE_DEPTH` x k nearest) are updated, never
  all pairs;
- a re-fitted whitening, or another k, image distance or query levels, starts over.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import EXACT_LIMIT, SearchOptions
from ..extraction.progress import Progress
from . import kernel
from .neighbours import Neighbours
from .search import pool_distances, rank_many, uses_candidates
from .snapshot import View

# This many images' windows go to one kernel call (exact) or one FAISS search (candidates).
QUERY_BATCH = 256
# A new image found by FAISS updates the lists of its REVERSE_DEPTH * k nearest images.
REVERSE_DEPTH = 2
# A list's candidates: each window's LIST_PER_PATCH nearest windows, searched in
# LIST_NPROBE IVF lists, and the layout index's LIST_LAYOUT_K nearest images, not a
# search's max(4k, 32), 16 and 128: a list is computed for every image of the collection,
# so its cost is the first `retrieval duplicates`' cost. These keep every pair within the
# default max distance of the exact lists on real photos above the exact limit (UKBench
# views, crops and other copies; the few mates they miss lie among strangers) and the
# exact lists' first 3 on the synthetic scale sets, at 0.6 of the CPU of 8 / 16 / 32
# (100,000 images in 6:51, benchmarks/results/duplicates.md). The layout index is what
# finds the hard set's near-duplicates: fewer than 32 of its images lose some.
LIST_PER_PATCH = 4
LIST_NPROBE = 8
LIST_LAYOUT_K = 32
# With FAISS candidates a list that lost images to removals is searched again only when
# fewer than this share of its k places still hold one: each search costs 9 ms at
# 1,000,000 images and a removed image sits in about k lists, so searching them all made
# a removal 0.12-0.25 s an image there, 70x a removal without lists
# (benchmarks/results/reranking.md). Half of the default 10 is what re-ranking reads
# (RERANK_DBA = 5), which a shortened list keeps exactly.
REFILL_BELOW = 0.5


@dataclass(frozen=True)
class NeighbourSettings:
    """What the lists hold: `k` nearest other images per image, by `aggregate` distance
    from an image's windows at `query_levels` (its rows `rows`; None: all windows).
    Above `exact_limit` images FAISS proposes the candidates (where the index has it)."""

    k: int
    query_levels: tuple[int, ...]
    aggregate: str
    rows: np.ndarray | None = None
    exact_limit: int = EXACT_LIMIT

    def meta(self, view: View) -> dict:
        return {"k": self.k, "aggregate": self.aggregate, "query_levels": list(self.query_levels),
                "whitening": (view.state.whitening or {}).get("file")}


def is_exact(view: View, settings: NeighbourSettings) -> bool:
    """Whether the lists of `view` are computed exactly (every pair, by the kernel in
    batches: cheap) rather than from FAISS candidates (a candidate search per image,
    benchmarks/results/duplicates.md)."""
    return not uses_candidates(view, SearchOptions(k=settings.k + 1, exact_limit=settings.exact_limit))


def update(view: View, old: Neighbours | None, settings: NeighbourSettings, *, progress: bool = False) -> Neighbours:
    """The lists of every live image of `view`, reusing `old` (None: from scratch)."""
    live = view.live_ids()
    meta = {**settings.meta(view), "images": int(len(live)), "generation": view.state.generation}
    k = settings.k
    if old is not None and (not len(old.ids) or any(old.meta.get(key) != meta[key] for key in ("k", "aggregate", "query_levels", "whitening"))):
        old = None
    near = np.full((len(live), k), -1, np.int64)
    dist = np.full((len(live), k), np.inf, np.float32)
    kept = np.zeros(len(live), bool)
    exact = is_exact(view, settings)
    if old is not None:
        pos, known = old.rows(live)
        kept = _keep(old.neighbours[pos], old.distances[pos], known, live, near, dist, exact)
    fresh = live[~np.isin(live, old.ids)] if old is not None else live
    redo = np.flatnonzero(~kept)
    if exact:
        _exact_lists(view, live, redo, near, dist, settings, progress)
        if len(fresh) and kept.any():
            mine = np.flatnonzero(kept)
            _merge(near, dist, mine, np.broadcast_to(fresh, (len(mine), len(fresh))),
                   _exact_distances(view, live[mine], fresh, settings))
    else:
        proposed = _candidate_lists(view, live, redo, near, dist, settings, progress)
        _reverse_merge(view, live, kept, fresh, proposed, near, dist, settings)
    return Neighbours(live, near, dist, meta)


def _keep(rows_nb: np.ndarray, rows_d: np.ndarray, known: np.ndarray, live: np.ndarray, near: np.ndarray,
          dist: np.ndarray, exact: bool) -> np.ndarray:
    """Copy into `near` / `dist` the old lists that need no search, and say which: every
    list that names no removed image; with FAISS candidates also one that still holds at
    least `REFILL_BELOW` of its k places, its removed images dropped and the rest moved up
    in order (empty places: -1 at distance inf)."""
    listed = rows_nb >= 0
    alive = ~listed | np.isin(rows_nb, live)
    keep = known & alive.all(axis=1)
    near[keep], dist[keep] = rows_nb[keep], rows_d[keep]
    if exact:
        return keep
    shortened = known & ~keep & ((listed & alive).sum(axis=1) >= int(np.ceil(REFILL_BELOW * near.shape[1])))
    if shortened.any():
        # A stable sort of "removed" (1) after "still here" (0) moves the kept entries up
        # in their order; the removed ones, now last, become empty places.
        gone = ~alive[shortened]
        order = np.argsort(gone, axis=1, kind="stable")
        gone = np.take_along_axis(gone, order, axis=1)
        near[shortened] = np.where(gone, -1, np.take_along_axis(rows_nb[shortened], order, axis=1))
        dist[shortened] = np.where(gone, np.inf, np.take_along_axis(rows_d[shortened], order, axis=1))
    return keep | shortened


def _exact_lists(view: View, live: np.ndarray, redo: np.ndarray, near: np.ndarray, dist: np.ndarray,
                 settings: NeighbourSettings, progress: bool) -> None:
    """Rows `redo` of the lists: their k nearest among every live image, scored by the kernel."""
    with Progress(len(redo), "neighbours", enabled=progress) as bar:
        for start in range(0, len(redo), QUERY_BATCH):
            batch = redo[start:start + QUERY_BATCH]
            d = _exact_distances(view, live[batch], live, settings)
            d[np.arange(len(batch)), batch] = np.inf  # not its own neighbour
            near[batch], dist[batch] = -1, np.inf
            _merge(near, dist, batch, np.broadcast_to(live, d.shape), d)
            bar.update(len(batch))


def _exact_distances(view: View, queries: np.ndarray, targets: np.ndarray, settings: NeighbourSettings) -> np.ndarray:
    """float32 [len(queries), len(targets)]: each query image's distance to each target image."""
    out = np.empty((len(queries), len(targets)), np.float32)
    segment, row = view.locate(targets)
    for start in range(0, len(queries), QUERY_BATCH):
        chunk = queries[start:start + QUERY_BATCH]
        windows = [view.windows(int(i), settings.rows) for i in chunk.tolist()]
        offsets = np.cumsum([0] + [len(w) for w in windows]).astype(np.int64)
        stacked = np.concatenate(windows)
        for s in np.unique(segment).tolist():
            here = np.flatnonzero(segment == s)
            out[start:start + len(chunk), here] = kernel.patch_distances_batch(
                stacked, offsets, view.segments[s].vectors, view.offsets(s), row[here], settings.aggregate)
    return out


def list_options(settings: NeighbourSettings) -> SearchOptions:
    """The search that proposes and scores a list's candidates: REVERSE_DEPTH * k nearest
    other images (its own image comes first), from the lists' candidate settings, every
    candidate scored (their small pools were validated without a shortlist)."""
    return SearchOptions(k=REVERSE_DEPTH * settings.k + 1, aggregate=settings.aggregate,
                         exact_limit=settings.exact_limit, per_patch=LIST_PER_PATCH, nprobe=LIST_NPROBE,
                         layout_k=LIST_LAYOUT_K, shortlist=0)


def _candidate_lists(view: View, live: np.ndarray, redo: np.ndarray, near: np.ndarray, dist: np.ndarray,
                     settings: NeighbourSettings, progress: bool) -> dict[int, np.ndarray]:
    """Rows `redo` of the lists from FAISS candidates scored exactly; returns, per image
    searched, the ids of its REVERSE_DEPTH * k nearest (whose lists it may enter)."""
    k = settings.k
    options = list_options(settings)
    proposed = {}
    with Progress(len(redo), "neighbours", enabled=progress) as bar:
        for start in range(0, len(redo), QUERY_BATCH):
            batch = redo[start:start + QUERY_BATCH].tolist()
            # One FAISS search for the whole batch's windows, not one per image.
            rankings = rank_many([view.windows(int(live[j]), settings.rows) for j in batch], view, options, settings.rows)
            for j, r in zip(batch, rankings):
                image_id = int(live[j])
                other = r.ids != image_id
                found, d = r.ids[other][:k], r.distances[other][:k]
                near[j], dist[j] = -1, np.inf
                near[j, :len(found)], dist[j, :len(found)] = found, d
                proposed[image_id] = r.ids[other]
            bar.update(len(batch))
    return proposed


def _reverse_merge(view: View, live: np.ndarray, kept: np.ndarray, fresh: np.ndarray, proposed: dict[int, np.ndarray],
                   near: np.ndarray, dist: np.ndarray, settings: NeighbourSettings) -> None:
    """Merge each new image into the kept lists of the images it found near it."""
    if not kept.any():
        return  # from scratch: every list was searched, none is waiting for new images
    pairs = [(int(y), x) for x in fresh.tolist() for y in proposed.get(x, np.empty(0, np.int64)).tolist()]
    if not pairs:
        return
    by_image: dict[int, list[int]] = {}
    for y, x in pairs:
        by_image.setdefault(y, []).append(x)
    at = np.searchsorted(live, np.array(sorted(by_image), np.int64))
    targets = at[kept[at]]
    for start in range(0, len(targets), QUERY_BATCH):
        batch = targets[start:start + QUERY_BATCH].tolist()
        pools = [np.unique(np.array(by_image[int(live[j])], np.int64)) for j in batch]
        scored = pool_distances([view.windows(int(live[j]), settings.rows) for j in batch], view, pools,
                                settings.aggregate)
        for j, (ids, d, _, _) in zip(batch, scored):
            _merge(near, dist, np.array([j]), ids[None, :], d[None, :])


def _merge(near: np.ndarray, dist: np.ndarray, rows: np.ndarray, ids: np.ndarray, d: np.ndarray) -> None:
    """Rows `rows` of the lists become the k nearest of what they hold and the candidates
    (`ids`, `d`: one row per list row, none already in the list), ties broken by image id
    as `search.top_k` does; places left empty hold -1 at distance inf."""
    k = near.shape[1]
    all_ids = np.concatenate([near[rows], ids], axis=1)
    all_d = np.where(all_ids < 0, np.inf, np.concatenate([dist[rows], d], axis=1)).astype(np.float32)
    order = np.lexsort((all_ids, all_d), axis=-1)[:, :k]
    best_ids, best_d = np.take_along_axis(all_ids, order, axis=1), np.take_along_axis(all_d, order, axis=1)
    near[rows] = np.where(np.isfinite(best_d), best_ids, -1)
    dist[rows] = best_d
