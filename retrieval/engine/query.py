"""Answering queries, for `Index` and `ShardedIndex` alike: describe the query images,
whiten them, have them ranked, and turn each ranking into hits.

The two differ only in where ranking runs (one view here, or every shard and a merge),
which `answer_queries` takes as a function. Everything else is done once, here: the
search options are built and checked (`search_options`), every distinct query item is
described at every asked rotation (with "auto", at the one turn its level-1 window
picks: `choose_turns`), and hits are assembled (images removed since the
searched generation dropped, boxes in pixels of each image, rotations, crop offsets).
There is one `QueryResult` per query given, in the order given: an unreadable query
gets one with no hits and its reason in `error`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from ..config import AUTO_ROTATION, ROTATIONS, SearchOptions
from ..extraction.extractor import Extractor, Skipped
from ..extraction.features import Crop, ImageFeatures, describe
from ..extraction.patches import level_names, level_regions, pixel_boxes, unrotate_boxes
from ..extraction.store import FeatureStore
from .manifest import Entry
from .search import Ranking

QueryItem = tuple[str, "Crop | None"]  # (path, crop box in pixels or None)
# Ranks the described queries (per query: its whitened descriptions, one per rotation)
# with the given options and returns per query its ranking and the manifest entries of
# the ranked images that still exist; any other ranked image is dropped from the hits.
RankAll = Callable[[list[list[np.ndarray]], SearchOptions], list[tuple[Ranking, dict[int, Entry]]]]


@dataclass
class Hit:
    """One ranked image: its manifest `id`, path, size in pixels (as indexed), distance and
    the deciding pair of windows (and, with query rotations, the rotation of the query that
    decided). `distance` is always the plain image distance (the `--aggregate` of window
    distances); a re-ranked search orders the hits by `rerank_distance`
    (docs/reranking.md), None otherwise."""

    rank: int
    path: str
    distance: float
    query_box: list[float]
    db_box: list[float]
    id: int = -1
    rotation: int | None = None  # set when the query was described at several rotations
    rerank_distance: float | None = None
    width: int | None = None
    height: int | None = None

    def to_dict(self) -> dict:
        out = {
            "rank": self.rank,
            "path": self.path,
            "distance": self.distance,
            "query_box": self.query_box,
            "db_box": self.db_box,
        }
        if self.rerank_distance is not None:
            out["rerank_distance"] = self.rerank_distance
        if self.rotation is not None:
            out["rotation"] = self.rotation
        return out


@dataclass
class QueryResult:
    """The hits of one query; `error` says why a query could not be described (it then
    has no hits)."""

    query: str
    hits: list[Hit]
    error: str | None = None
    # How the ranking fell short of what was asked, e.g. re-ranked without neighbour lists.
    note: str | None = None

    def to_dict(self) -> dict:
        out = {"query": self.query, "hits": [h.to_dict() for h in self.hits]}
        if self.error is not None:
            out["error"] = self.error
        if self.note is not None:
            out["note"] = self.note
        return out


class QueryFront(Protocol):
    """What describing queries needs of an index (an `Index`)."""

    extractor: Extractor
    store: FeatureStore
    search_config: Any


class _NotGiven:
    """`k` not given to search(): `options=`, or else the SearchOptions default (10), decides."""

    def __repr__(self) -> str:
        return "10"


K_NOT_GIVEN: Any = _NotGiven()


def search_options(k: Any, options: SearchOptions | None, keywords: dict) -> SearchOptions:
    """The SearchOptions of one `search` call: `options` as given, or built from `k` and
    the keywords (ConfigError naming a bad one; TypeError for an unknown keyword)."""
    if options is None:
        return SearchOptions(**({} if k is K_NOT_GIVEN else {"k": k}), **keywords)
    if not isinstance(options, SearchOptions):
        raise TypeError(f"options must be a SearchOptions (got {type(options).__name__})")
    if k is not K_NOT_GIVEN or keywords:
        given = (["k"] if k is not K_NOT_GIVEN else []) + sorted(keywords)
        raise TypeError(f"search() takes options= or keywords, not both (got options= and {', '.join(given)})")
    return options


def _item(query: str | tuple) -> QueryItem:
    return (query, None) if isinstance(query, str) else (query[0], query[1])


def answer_queries(front: QueryFront, whitening, queries: Sequence[str | tuple[str, Crop | None]],
                   options: SearchOptions, rank_all: RankAll, *, progress: bool = False,
                   skipped: list | None = None) -> list[QueryResult]:
    """One QueryResult per query (a path, or (path, crop box in pixels)), in order.

    `options` are resolved for the index (`SearchOptions.for_index`); `whitening` is the
    one the ranked vectors were made with (None: nothing is indexed, every query has no
    hits). Unreadable queries get a result with no hits and their reason, and are
    appended to `skipped` as {"path", "reason"} (once per distinct query) when given."""
    items = [_item(q) for q in queries]
    if whitening is None:
        return [QueryResult(path, []) for path, _ in items]
    distinct = list(dict.fromkeys(items))
    if options.query_rotations == AUTO_ROTATION:
        turns, failed = choose_turns(front, whitening, distinct, options, rank_all, progress)
    else:
        turns, failed = {item: options.rotations for item in distinct}, {}
    described, unread = _describe(front, turns, options.query_levels, progress)
    failed = {**unread, **failed}
    ready = [item for item in distinct if item in described]
    vectors = [_whitened(whitening, described[item], options.query_levels) for item in ready]
    ranked = rank_all(vectors, options) if ready else []
    db_layout = np.concatenate([level_regions(lv).boxes for lv in front.search_config.levels])
    q_layout = np.concatenate([level_regions(lv).boxes for lv in options.query_levels])
    answered = {
        item: QueryResult(item[0], assemble_hits(ranking, entries, described[item], q_layout, db_layout, options))
        for item, (ranking, entries) in zip(ready, ranked)
    }
    errors = {item: failed.get(item[0], "could not be described") for item in distinct if item not in answered}
    if skipped is not None:
        skipped.extend({"path": item[0], "reason": reason} for item, reason in errors.items())
    return [answered[item] if item in answered else QueryResult(item[0], [], errors[item]) for item in items]


def choose_turns(front: QueryFront, whitening, items: list[QueryItem], options: SearchOptions,
                 rank_all: RankAll, progress: bool) -> tuple[dict[QueryItem, tuple[int]], dict[str, str]]:
    """Per item, the one turn (of 0, 90, 180, 270) its level-1 window is nearest to an
    indexed image at: four single-window descriptions and one level-1 search through the
    same ranking path, in place of four full descriptions. Also the reason per unreadable
    path. Nothing indexed near (no hit): the query as it is."""
    probed, failed = _describe(front, {item: ROTATIONS for item in items}, (1,), progress)
    ready = [item for item in items if item in probed]
    probe = options.replace(query_levels=(1,), k=1, qe=0, dba=0, rerank=False, layout_k=0,
                            query_rotations=ROTATIONS)
    ranked = rank_all([_whitened(whitening, probed[item], (1,)) for item in ready], probe) if ready else []
    turns = {}
    for item, (ranking, _) in zip(ready, ranked):
        won = int(ranking.query[0]) if ranking.query is not None and len(ranking.ids) else 0
        turns[item] = (ROTATIONS[won],)
    return turns, failed


def _whitened(whitening, views: list[ImageFeatures], levels) -> list[np.ndarray]:
    names = level_names(levels)
    return [whitening.transform(np.concatenate([f.descriptors[n] for n in names])) for f in views]


def _describe(front: QueryFront, turns: dict[QueryItem, tuple[int, ...]], levels, progress: bool):
    """Per item, its descriptions at `levels` at each of its rotations (in that order), for
    the items every rotation of which could be described; and the reason per unreadable path."""
    feats = describe(
        [(path, crop, r) for (path, crop), rotations in turns.items() for r in rotations],
        front.extractor, front.store, level_names(levels), progress=progress, desc="query",
        keep=None,  # a store on a read-only or full disk still answers; the query is just not kept
    )
    views: dict[QueryItem, dict[int, ImageFeatures]] = {}
    failed: dict[str, str] = {}
    for f in feats:
        if isinstance(f, Skipped):
            failed.setdefault(f.path, f.reason)
        else:
            views.setdefault((f.path, f.crop), {})[f.rotation] = f
    described = {item: [v[r] for r in turns[item]] for item, v in views.items() if len(v) == len(turns[item])}
    return described, failed


def assemble_hits(ranking: Ranking, entries: dict[int, Entry], views: list[ImageFeatures],
                  q_layout: np.ndarray, db_layout: np.ndarray, options: SearchOptions) -> list[Hit]:
    """The hits of one ranking: images absent from `entries` (removed after the searched
    generation was published) dropped; the deciding windows as boxes in pixels of the
    query as given (turned back from the deciding rotation `views[j]`, moved by the crop
    offset) and of the database image; the rotation when the options asked for rotations
    (or "auto")."""
    which = ranking.query if ranking.query is not None else np.zeros(len(ranking.ids), np.int32)
    keep = np.array([i in entries for i in ranking.ids.tolist()], dtype=bool)
    ids, qp, dp, which = ranking.ids[keep], ranking.query_patch[keep], ranking.db_patch[keep], which[keep]
    plain = ranking.distances if ranking.plain is None else ranking.plain
    dist = plain[keep].tolist()
    reranked = ranking.distances[keep].tolist() if ranking.plain is not None else [None] * len(ids)
    sizes = np.array([[entries[i].width, entries[i].height] * 2 for i in ids.tolist()], np.float64).reshape(-1, 4)
    qboxes = np.zeros((len(ids), 4))
    for j, f in enumerate(views):
        at = which == j
        qboxes[at] = unrotate_boxes(pixel_boxes(q_layout[qp[at]], f.width, f.height), f.rotation, f.width, f.height)
    crop = views[0].crop
    if crop is not None:
        qboxes += np.array([crop[0], crop[1], crop[0], crop[1]])
    dboxes = db_layout[dp] * sizes
    turned = options.query_rotations is not None
    return [
        Hit(pos + 1, entries[i].path, d, qb, dbb, i, views[w].rotation if turned else None, r,
            entries[i].width, entries[i].height)
        for pos, (i, d, qb, dbb, w, r) in enumerate(zip(
            ids.tolist(), dist, np.round(qboxes, 1).tolist(), np.round(dboxes, 1).tolist(), which.tolist(), reranked,
        ))
    ]
