"""Ranking over a published view: exact kernel scoring, or FAISS candidates re-ranked exactly.

Image distance is the minimum (or the mean over query windows of the minimum) of the
Euclidean distances between window descriptors. Up to `exact_limit` images the kernel
scores every image (that is both exact and, measured, the faster way). Above it, each
query window's `per_patch` nearest database windows in the FAISS window index name
candidate images (the `shortlist` of them nearest by FAISS's own inner products), the
layout index adds the `layout_k` images nearest to the query's windows laid end to end
(`ann.py`), and the kernel scores those over all their window pairs.

Every function takes the search's `SearchOptions` (`retrieval/config.py`), with its
aggregate resolved for the index (`SearchOptions.for_index`; None means mean-min).

- `rank`: one description of a query ([nq, d] unit vectors) against the view;
  `rank_many` several at once (one FAISS batch search for all their candidates).
- `rank_descriptions`: several descriptions of one query (its rotations); an image's
  distance is the smallest over them.
- `rank_reranked`: the same, then query expansion (the top hits' own window sets become
  queries too) and database-side augmentation (an image is scored with its stored
  nearest neighbours, `retrieval/engine/neighbours.py`). Both combine distances with
  alpha-QE weights, so a window-set distance needs no averaged descriptor.
- `rank_query`: whichever of the two the options ask for; `rank_queries` for many
  queries at once.
- `plan_expansion` / `finish_reranking`: `rank_reranked` in two steps on distances
  found elsewhere (every shard): the first says whose windows expand the query, the
  caller scores the pool against them, the second combines.
- `merge_rankings`: the k nearest over several rankings (rotations, shards).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from . import kernel
from .ann import WINDOW_BITS
from ..config import DEFAULT_AGGREGATE, PER_PATCH_MIN, RERANK_DBA, SHORTLIST_MIN, SHORTLIST_PER_K, SearchOptions
from .neighbours import Neighbours, qe_weight
from .snapshot import View

# With FAISS candidates, re-ranking needs the distances of more images than the k shown:
# the query's RERANK_POOL nearest, and each expanding hit's HIT_POOL nearest (an image the
# query missed reaches the top k only if it is among a hit's nearest few; at 100,000 images
# a depth of 20 gave the same lists and distances as 100, at a third of the cost:
# benchmarks/results/reranking.md).
RERANK_POOL = 100
HIT_POOL = 20
# Adaptive query expansion uses at most this many hits (those within the margin of the best).
ADAPTIVE_QE = 10
# A plain distance at most this says the image is the query itself (its exact duplicate):
# the same photo described again lies within 0.006 (fp16 storage), the nearest other photo
# 0.33 away at least on UKBench and 0.45 on the edited copies (benchmarks/results/reranking.md,
# "The query's own image"). Re-ranking averages such an image with its neighbours and 3.7 %
# of UKBench's queries lost first place to them, so it keeps its plain distance there.
EXACT_DUPLICATE = 0.05


@dataclass
class Ranking:
    """Images sorted by distance (manifest ids), with the deciding pair of windows."""

    ids: np.ndarray  # int64 manifest image ids
    distances: np.ndarray  # float32
    query_patch: np.ndarray  # int32, window index within the query
    db_patch: np.ndarray  # int32, window index within the database image
    query: np.ndarray | None = None  # int32, which description of the query decided (None: the one)
    # Where `distances` are re-ranked (weighted means, docs/reranking.md): the same images'
    # plain distances, which the windows above decided. None: `distances` are the plain ones.
    plain: np.ndarray | None = None

    def take(self, positions: np.ndarray) -> "Ranking":
        """The images at `positions`, in that order."""
        pick = lambda a: None if a is None else a[positions]  # noqa: E731
        return Ranking(self.ids[positions], self.distances[positions], self.query_patch[positions],
                       self.db_patch[positions], pick(self.query), pick(self.plain))


def _aggregate(options: SearchOptions) -> str:
    return options.aggregate or DEFAULT_AGGREGATE


def uses_candidates(view: View, options: SearchOptions) -> bool:
    """Whether FAISS proposes the images to score (else the kernel scores every image)."""
    return options.k is not None and view.images > options.exact_limit and bool(view.state.ann)


def rank(query: np.ndarray, view: View, options: SearchOptions = SearchOptions(),
         layout_rows: np.ndarray | None = None) -> Ranking:
    """The `options.k` nearest images (None: every image) to one query description
    ([nq, d] unit vectors). `layout_rows` are the database window positions of the
    query's windows (default: all, in order), for the layout index."""
    return rank_many([query], view, options, layout_rows)[0]


def rank_many(queries: list[np.ndarray], view: View, options: SearchOptions = SearchOptions(),
              layout_rows: np.ndarray | None = None) -> list[Ranking]:
    """`rank` of each query description, their FAISS candidates found in one batch
    search (FAISS spreads a batch over its threads; one window set at a time leaves
    them idle). Each ranking is the one `rank` gives the description alone."""
    if uses_candidates(view, options):
        scored = pool_distances(queries, view, candidate_pools(queries, view, options, layout_rows),
                                _aggregate(options))
    else:
        scored = [image_distances(query, view, None, _aggregate(options)) for query in queries]
    return [Ranking(ids, dist, qp, dp).take(top_k(dist, ids, options.k)) for ids, dist, qp, dp in scored]


def pool_distances(queries: list[np.ndarray], view: View, pools: list[np.ndarray], aggregate: str) -> list[tuple]:
    """`image_distances` of each query description over its own pool (sorted unique ids),
    all of them in one kernel call per segment: one call per query left one of the two
    cores idle on the pools of a few hundred images that candidates give."""
    # Drops what this view does not hold; a pool shared by several window sets (re-ranking's
    # expanding hits) is located once.
    seen: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for pool in pools:
        if id(pool) not in seen:
            seen[id(pool)] = view.locate(pool)
    located = [seen[id(pool)] for pool in pools]
    owner = np.repeat(np.arange(len(queries)), [len(s) for s, _ in located])
    segment = np.concatenate([s for s, _ in located])
    row = np.concatenate([r for _, r in located])
    order = np.lexsort((row, segment, owner))  # per query: by segment, then row (view order)
    owner, segment, row = owner[order], segment[order], row[order]
    ids = np.empty(len(row), np.int64)
    dist = np.empty(len(row), np.float32)
    qp, dp = np.empty(len(row), np.int32), np.empty(len(row), np.int32)
    stacked = np.concatenate(queries)
    query_offsets = np.cumsum([0] + [len(q) for q in queries]).astype(np.int64)
    for s in np.unique(segment).tolist():
        here = np.flatnonzero(segment == s)
        runs = np.searchsorted(owner[here], np.arange(len(queries) + 1)).astype(np.int64)
        seg = view.segments[s]
        dist[here], qp[here], dp[here] = kernel.patch_distances_each(
            stacked, query_offsets, seg.vectors, view.offsets(s), row[here], runs, aggregate)
        ids[here] = seg.ids[row[here]]
    bounds = np.searchsorted(owner, np.arange(len(queries) + 1)).tolist()
    return [(ids[a:b], dist[a:b], qp[a:b], dp[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def candidate_images(query: np.ndarray, view: View, options: SearchOptions,
                     layout_rows: np.ndarray | None = None) -> np.ndarray:
    """Sorted ids of the images FAISS proposes for one query description."""
    return candidate_pools([query], view, options, layout_rows)[0]


def candidate_pools(queries: list[np.ndarray], view: View, options: SearchOptions,
                    layout_rows: np.ndarray | None = None) -> list[np.ndarray]:
    """Per query description, the sorted ids of the images FAISS proposes: of the owners
    of each query window's `per_patch` nearest windows, the `shortlist` nearest by that
    evidence (`shortlisted`), and the layout index's `layout_k`. All descriptions'
    windows go to FAISS in one search (and their layouts in another)."""
    # nprobe goes with this call only: the FAISS structure is shared by every thread.
    sims, found = view.ann.search(np.concatenate(queries), windows_per_window(options), nprobe=options.nprobe)
    bounds = np.cumsum([0] + [len(q) for q in queries])
    keep, aggregate = shortlist_size(options), _aggregate(options)
    pools = [shortlisted(sims[a:b], found[a:b], keep, aggregate) for a, b in zip(bounds[:-1], bounds[1:])]
    rows = np.arange(view.patches) if layout_rows is None else layout_rows
    laid_out = [i for i, q in enumerate(queries) if len(q) == len(rows)]
    layout = view.layout if options.layout_k != 0 and laid_out else None
    if layout is not None:
        # A query at fewer levels fills only its windows' places: the zeros elsewhere
        # make the inner product the sum over the windows it has.
        laid = np.zeros((len(laid_out), view.patches, queries[0].shape[1]), np.float32)
        laid[:, rows] = np.stack([queries[i] for i in laid_out])
        _, near = layout.search(laid.reshape(len(laid_out), -1), options.layout_k)
        for i, found_near in zip(laid_out, near):
            pools[i] = np.concatenate([pools[i], found_near[found_near >= 0]])
    return [np.unique(pool) for pool in pools]


def shortlist_size(options: SearchOptions) -> int | None:
    """How many of the window index's images the kernel scores: `shortlist`, or by
    default max(SHORTLIST_PER_K * k, SHORTLIST_MIN); None for all of them."""
    if options.shortlist is not None:
        return options.shortlist or None
    return max(SHORTLIST_PER_K * options.k, SHORTLIST_MIN)


def shortlisted(sims: np.ndarray, found: np.ndarray, keep: int | None, aggregate: str) -> np.ndarray:
    """The images owning the windows `found` ([query windows, depth] window ids, -1 for
    none; `sims` their FAISS inner products) or, when they are more than `keep`, the
    `keep` nearest by that evidence: the query's image distance with each query window at
    its nearest found window of the image, or, where it found none of the image, at the
    farthest window it found at all (an unfound window is no nearer than that, so an
    image is never estimated farther than its evidence says). At 1,000,000 images and
    k = 10 this has the kernel score 330 images instead of 1,320 at the same recall@10
    within 0.002 (benchmarks/results/concurrency.md, "The shortlist")."""
    ok = found >= 0
    owners, slot = np.unique(found[ok] >> WINDOW_BITS, return_inverse=True)
    if keep is None or len(owners) <= keep:
        return owners
    floor = np.where(ok, sims, np.inf).min(axis=1)
    floor[~ok.any(axis=1)] = -1.0  # a window that found nothing: as far as a unit vector can be
    best = np.repeat(floor[None, :], len(owners), axis=0)
    window = np.broadcast_to(np.arange(len(found))[:, None], found.shape)[ok]
    np.maximum.at(best, (slot, window), sims[ok])
    distance = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * best))
    estimate = distance.min(axis=1) if aggregate == "min" else distance.mean(axis=1)
    return owners[np.argsort(estimate, kind="stable")[:keep]]


def windows_per_window(options: SearchOptions) -> int:
    """How many nearest database windows each query window asks FAISS for: `per_patch`,
    or by default max(4k, PER_PATCH_MIN) (`retrieval/config.py` says why)."""
    return options.per_patch or max(4 * options.k, PER_PATCH_MIN)


def top_k(dist: np.ndarray, ids: np.ndarray, k: int | None) -> np.ndarray:
    """Positions of the k smallest distances (all if k is None), ties broken by image id."""
    if k is not None and k < len(dist):
        top = np.argpartition(dist, k - 1)[:k]
        return top[np.lexsort((ids[top], dist[top]))]
    return np.lexsort((ids, dist))


def merge_rankings(parts: list[Ranking], k: int | None) -> Ranking:
    """The k nearest images over several rankings, each image at its smallest distance
    (ties: the earliest part). `Ranking.query` is carried over where the parts have it.

    Exact when each part holds its own top k: an image of the merged top k is beaten by
    fewer than k images in the part that gives its distance, so that part kept it."""
    if len(parts) == 1:
        return parts[0].take(top_k(parts[0].distances, parts[0].ids, k))
    ids = np.concatenate([p.ids for p in parts])
    dist = np.concatenate([p.distances for p in parts])
    part = np.concatenate([np.full(len(p.ids), i, np.int32) for i, p in enumerate(parts)])
    labelled = all(p.query is not None for p in parts)
    reranked = all(p.plain is not None for p in parts)
    merged = Ranking(ids, dist, np.concatenate([p.query_patch for p in parts]),
                     np.concatenate([p.db_patch for p in parts]),
                     np.concatenate([p.query for p in parts]) if labelled else None,
                     np.concatenate([p.plain for p in parts]) if reranked else None)
    best = np.lexsort((part, dist, ids))
    best = best[np.r_[True, ids[best][1:] != ids[best][:-1]]] if len(best) else best
    return merged.take(best[top_k(dist[best], ids[best], k)])


def rank_descriptions(queries: list[np.ndarray], view: View, options: SearchOptions,
                      layout_rows: np.ndarray | None = None) -> Ranking:
    """The `options.k` nearest images to a query described several ways (e.g. its
    rotations): an image's distance is the smallest over `queries`, and `Ranking.query`
    says which description decided."""
    if not queries:
        raise ValueError("rank_descriptions needs at least one description of the query")
    return _nearest_description(rank_many(queries, view, options, layout_rows), options.k)


def _nearest_description(parts: list[Ranking], k: int | None) -> Ranking:
    """The rankings of one query's descriptions merged, each labelled with its description."""
    if len(parts) == 1:
        return parts[0]
    for i, r in enumerate(parts):
        r.query = np.full(len(r.ids), i, np.int32)
    return merge_rankings(parts, k)


def rank_query(queries: list[np.ndarray], view: View, options: SearchOptions, *,
               expand_rows: np.ndarray | None = None, neighbours: Neighbours | None = None) -> Ranking:
    """One query, described once or several ways: `rank_reranked` when the options ask
    for re-ranking (fixed or adaptive), else `rank_descriptions`."""
    return rank_queries([queries], view, options, expand_rows=expand_rows, neighbours=neighbours)[0]


def rank_queries(described: list[list[np.ndarray]], view: View, options: SearchOptions, *,
                 expand_rows: np.ndarray | None = None, neighbours: Neighbours | None = None) -> list[Ranking]:
    """`rank_query` of each query (its list of descriptions), in order. Without
    re-ranking, every description of every query is ranked in one `rank_many` batch."""
    if options.reranks:
        return [rank_reranked(d, view, options, expand_rows=expand_rows, neighbours=neighbours) for d in described]
    if not all(described):
        raise ValueError("rank_queries needs at least one description of each query")
    flat = rank_many([q for d in described for q in d], view, options, expand_rows)
    ends = np.cumsum([len(d) for d in described]).tolist()
    return [_nearest_description(flat[end - len(d):end], options.k) for d, end in zip(described, ends)]


def rank_reranked(queries: list[np.ndarray], view: View, options: SearchOptions, *,
                  expand_rows: np.ndarray | None = None, neighbours: Neighbours | None = None) -> Ranking:
    """The `options.k` nearest images to a query described several ways, re-ranked.

    An image's first distance is the smallest over `queries` ([nq_i, d] unit vectors
    each); `Ranking.query` says which decided. Database-side augmentation averages each
    image's distance with those of its nearest neighbours in `neighbours` (weights
    alpha-QE of their distance to it). Query expansion scores the best images' own
    windows (their rows `expand_rows`, default all: the database places of the query's
    windows, which the layout index needs too) as queries too, and the final distance is
    the weighted mean of the query's and theirs (weight 1 for the query, sim**qe_alpha
    for a hit at distance d, sim = 1 - d**2 / 2).

    How many: with `qe` / `dba` > 0, that many (fixed). Otherwise, with `options.rerank`:
    the hits within `rerank_margin` of the best hit's distance (at most ADAPTIVE_QE; a
    small group of near copies does not expand the query with strangers, a large one is
    used whole), and each image's RERANK_DBA nearest stored neighbours (None for
    `neighbours`: no augmentation).
    """
    if not queries:
        raise ValueError("rank_reranked needs at least one description of the query")
    dba = augmentation_depth(options, neighbours)

    def scored_in(pool: np.ndarray | None) -> Ranking:
        return augment_scored(nearest_description_distances(queries, view, pool, _aggregate(options)), options,
                              neighbours)

    pool = rerank_pool(queries, view, options, expand_rows)
    if pool is not None:
        pool = _widened(pool, neighbours, dba)
    plan = plan_expansion(scored_in(pool), options)
    expanded = [view.windows(int(i), expand_rows) for i in plan.hits]
    if expanded and pool is not None:
        # The hits' own nearest images are what lets expansion reach images the query missed.
        more = _hits_nearest(plan.hits, expanded, view, options, expand_rows, neighbours)
        wider = _widened(np.unique(np.concatenate([pool, more])), neighbours, dba)
        if len(wider) > len(pool):
            pool = wider
            plan = replace(plan, scored=scored_in(pool))
    return finish_reranking(plan.scored, plan.weights, _pool_distances_to(expanded, view, pool, options), options,
                            neighbours)


def rerank_pool(descriptions: list[np.ndarray], view: View, options: SearchOptions,
                rows: np.ndarray | None, depth: int = RERANK_POOL) -> np.ndarray | None:
    """The images re-ranking scores for a query described several ways, before widening
    with their neighbours: None (every image) where the kernel scores every image, else
    each description's `depth` nearest (at least k), deep enough that re-ranking can
    lift images from below the top k.

    FAISS is asked for as many windows per query window as the plain search asks for
    (`windows_per_window(options)`), not for the default's 4 x depth: the pool's deeper
    images need not be the exact nearest, and at 400 windows per window the kernel
    scored ten times the plain search's images for every description (re-ranking took
    70x a plain search at 100,000 images)."""
    if not uses_candidates(view, options):
        return None
    deeper = options.replace(k=max(options.k, depth), per_patch=windows_per_window(options))
    return np.unique(np.concatenate([r.ids for r in rank_many(descriptions, view, deeper, rows)]))


def _hits_nearest(hits: np.ndarray, expanded: list[np.ndarray], view: View, options: SearchOptions,
                  rows: np.ndarray | None, neighbours: Neighbours | None) -> np.ndarray:
    """The nearest images of the expanding hits (and the hits): a hit's stored neighbour
    list where it has one, else its HIT_POOL nearest through FAISS and the kernel. With
    current lists this asks FAISS and the kernel nothing for the hits: finding their
    nearest took 40 % of a re-ranked query at 100,000 images, and the lists hold what it
    finds (benchmarks/results/reranking.md)."""
    listed = neighbours.rows(hits)[1] if neighbours is not None else np.zeros(len(hits), bool)
    parts = [neighbours.widen(hits[listed], neighbours.k)] if listed.any() else []
    unlisted = [windows for windows, known in zip(expanded, listed.tolist()) if not known]
    if unlisted:
        parts.append(rerank_pool(unlisted, view, options, rows, depth=HIT_POOL))
    return np.unique(np.concatenate(parts))


@dataclass(frozen=True)
class Expansion:
    """Re-ranking's first step: the pool's images at their (augmented) distance to the
    query, and the hits whose windows expand the query with their alpha-QE weights
    (only hits of weight > 0: the others would add nothing)."""

    scored: Ranking  # unsorted, pool order
    hits: np.ndarray  # int64 image ids
    weights: np.ndarray  # float64, one per hit


def plan_expansion(scored: Ranking, options: SearchOptions) -> Expansion:
    """Re-ranking's first step on `scored`, the pool's images at their distance to the
    query, already augmented as the options ask (`augment_scored`), unsorted."""
    hits = _expansion_hits(scored, options)
    weights = qe_weight(scored.distances[hits], options.qe_alpha)
    used = weights > 0
    return Expansion(scored, scored.ids[hits][used], weights[used])


def augment_scored(scored: Ranking, options: SearchOptions, neighbours: Neighbours | None) -> Ranking:
    """`scored` with each image's distance averaged with its neighbours' as the options
    ask (database-side augmentation; unchanged without it)."""
    augment = _augmentation(options, neighbours)
    plain = scored.distances if scored.plain is None else scored.plain
    return replace(scored, distances=augment(scored.ids, scored.distances), plain=plain)


def finish_reranking(scored: Ranking, weights: np.ndarray, hit_distances: list[np.ndarray], options: SearchOptions,
                     neighbours: Neighbours | None) -> Ranking:
    """Re-ranking's second step: the k nearest of `scored`'s images (a plan's) at the
    weighted mean of their distance to the query (weight 1) and to each expansion hit's
    windows (`hit_distances[j]`: their distances, in `scored` order, to hit j's windows;
    weight `weights[j]`), each augmented as the options ask.

    Over shards the pool is not widened by the expanded hits' own candidates, so beyond
    exact mode it can miss images `rank_reranked` reaches."""
    augment = _augmentation(options, neighbours)
    total, weight = scored.distances.astype(np.float64), 1.0
    for d, w in zip(hit_distances, weights.tolist()):
        total += w * augment(scored.ids, d)
        weight += w
    return _final(scored, (total / weight).astype(np.float32), options.k)


def rank_expanded(queries: list[np.ndarray], view: View, options: SearchOptions, expanded: list[np.ndarray],
                  hit_distances: np.ndarray) -> Ranking:
    """Query expansion's ranking of every image of `view`, the expanded hits found
    elsewhere (e.g. over several shards: their windows `expanded` and their distances to
    the query `hit_distances`): `rank_reranked`'s last step without database-side
    augmentation, every image scored exactly."""
    scored = nearest_description_distances(queries, view, None, _aggregate(options))
    weights = qe_weight(hit_distances, options.qe_alpha)
    used = weights > 0
    windows = [w for w, u in zip(expanded, used.tolist()) if u]
    # No neighbours: expansion alone, as over shards without lists.
    return finish_reranking(scored, weights[used], _pool_distances_to(windows, view, None, options), options, None)


def _final(scored: Ranking, dist: np.ndarray, k: int | None) -> Ranking:
    """The k nearest of `scored`'s images at their re-ranked distances `dist`, each keeping
    its plain distance. The query's exact duplicates (plain distance <= EXACT_DUPLICATE)
    keep their plain distance, and no other image is re-ranked nearer than that bound: no
    neighbour's evidence makes another image nearer than the query itself."""
    plain = scored.distances if scored.plain is None else scored.plain
    dist = np.where(plain <= EXACT_DUPLICATE, plain, np.maximum(dist, EXACT_DUPLICATE)).astype(np.float32)
    final = Ranking(scored.ids, dist, scored.query_patch, scored.db_patch, scored.query, plain)
    return final.take(top_k(dist, scored.ids, k))


@dataclass(frozen=True)
class _Augment:
    """Database-side augmentation as asked: each image averaged with its `k` nearest
    neighbours (0: none)."""

    neighbours: Neighbours | None
    k: int
    alpha: float

    def __call__(self, ids: np.ndarray, dist: np.ndarray) -> np.ndarray:
        if not self.k or not len(ids):
            return dist
        return self.neighbours.augment(ids, dist, self.k, self.alpha)


def _augmentation(options: SearchOptions, neighbours: Neighbours | None) -> _Augment:
    """Database-side augmentation as `options` ask: `dba` neighbours, or with `rerank`
    RERANK_DBA (at most as many as are kept); none without neighbours."""
    if options.dba:
        if neighbours is None:
            raise ValueError("database-side augmentation needs the neighbours of the database images")
        return _Augment(neighbours, options.dba, options.qe_alpha)
    if options.rerank and neighbours is not None:
        return _Augment(neighbours, min(RERANK_DBA, neighbours.k), options.qe_alpha)
    return _Augment(neighbours, 0, options.qe_alpha)


def augmentation_depth(options: SearchOptions, neighbours: Neighbours | None) -> int:
    """How many neighbours augment each image under `options` (0: none): also how far a
    candidate pool is widened with them."""
    return _augmentation(options, neighbours).k


def _expansion_hits(scored: Ranking, options: SearchOptions) -> np.ndarray:
    """Positions of the hits whose windows expand the query: the `qe` best, or adaptively
    those within `rerank_margin` of the best (at most ADAPTIVE_QE)."""
    if options.qe:
        return top_k(scored.distances, scored.ids, options.qe)
    if not options.rerank or not len(scored.ids):
        return np.empty(0, np.int64)
    best = top_k(scored.distances, scored.ids, ADAPTIVE_QE)
    return best[scored.distances[best] <= scored.distances[best[0]] + options.rerank_margin]


def _widened(pool: np.ndarray, neighbours: Neighbours | None, dba: int) -> np.ndarray:
    """The pool and, with database-side augmentation, the neighbours of its images."""
    return neighbours.widen(pool, dba) if dba else pool


def _pool_distances_to(window_sets: list[np.ndarray], view: View, pool: np.ndarray | None,
                       options: SearchOptions) -> list[np.ndarray]:
    """The pool's images' distances (view order, as `image_distances` gives them) to each window set."""
    return [d for _, d, _, _ in _distances_in(window_sets, view, pool, _aggregate(options))]


def _distances_in(window_sets: list[np.ndarray], view: View, pool: np.ndarray | None, aggregate: str) -> list[tuple]:
    """`image_distances` of each window set over one pool (None: every live image). With a
    pool, all the sets go to the kernel in one call per segment (`pool_distances`): one
    call per set kept a core idle while re-ranking scored the expanding hits' pools."""
    if pool is None or not window_sets:
        return [image_distances(w, view, pool, aggregate) for w in window_sets]
    return pool_distances(window_sets, view, [pool] * len(window_sets), aggregate)


def nearest_description_distances(queries: list[np.ndarray], view: View, pool: np.ndarray | None,
                                  aggregate: str) -> Ranking:
    """Each image of the pool (None: every live image) at its distance to the nearest of
    several descriptions of a query, with the deciding windows and description (in view
    order, unsorted)."""
    scored = _distances_in(queries, view, pool, aggregate)
    ids = scored[0][0]
    dist = np.stack([s[1] for s in scored])
    which = np.argmin(dist, axis=0).astype(np.int32)  # ties: the earliest description (rotation 0 first)
    col = np.arange(len(ids))
    pick = lambda j: np.stack([s[j] for s in scored])[which, col]  # noqa: E731
    return Ranking(ids, dist[which, col], pick(2), pick(3), which)


def image_distances(query: np.ndarray, view: View, pool: np.ndarray | None, aggregate: str):
    """(ids, distances, query window, db window) of the pool's images (None: every live
    image) to one query description, in view order (unsorted)."""
    if pool is None:
        parts = [_segment_distances(query, view, i, view.live_rows(i), aggregate) for i in range(len(view.segments))]
    else:
        segment, row = view.locate(pool)
        parts = [_segment_distances(query, view, i, np.sort(row[segment == i]), aggregate)
                 for i in np.unique(segment).tolist()]
    if not parts:
        empty = np.empty(0, np.int64)
        return empty, empty.astype(np.float32), empty.astype(np.int32), empty.astype(np.int32)
    return tuple(np.concatenate(p) for p in zip(*parts))


def _segment_distances(query: np.ndarray, view: View, segment: int, rows: np.ndarray | None, aggregate: str):
    """(ids, distances, query window, db window) of one segment's images at `rows` (None: all)."""
    seg = view.segments[segment]
    dist, qp, dp = kernel.patch_distances(query, seg.vectors, view.offsets(segment), rows, aggregate)
    ids = seg.ids if rows is None else seg.ids[rows]
    return ids, dist, qp, dp
