"""Database-side augmentation over shards: the shard's side of neighbour lists that span
every shard, and of re-ranking with them (`ShardedIndex` drives both, sharded.py).

A shard's `neighbours.npz` holds the lists of its own images. After `retrieval dba
SHARDED_DIR` their entries name images of any shard (manifest ids are global: `split`
keeps the source's), and the meta's `ACROSS` names the shards they span, so lists a shard
computed on its own (its writer does at `split`) are never taken for them.

- Lists: each shard's images' windows (at the query levels) are ranked against every
  shard (`nearest`: the kernel over every image up to the exact limit, FAISS candidates
  above) and `merge_lists` keeps the k nearest over the shards, the image itself left
  out: the unsharded index's lists when every shard searches exactly.
- Ranking: per query each shard proposes its pool (`search.rerank_pool`; None: every image, in
  exact mode), the driver widens it with the neighbours of its images, every shard scores
  its part of it, and the driver augments and expands on the merged distances
  (`search.plan_expansion`, `search.finish_reranking`): the unsharded index's hits in exact mode.
"""
from __future__ import annotations

import numpy as np

from ..config import SearchOptions
from .neighbour_lists import NeighbourSettings
from .neighbours import Neighbours
from .search import Ranking, merge_rankings, rank_many
from .snapshot import View

# Meta key of lists that span shards: the shards' id ranges, as shards.json has them.
ACROSS = "across_shards"


def nearest(view: View, window_sets: list[np.ndarray], settings: NeighbourSettings) -> list[Ranking]:
    """Per window set (an image's windows at `settings.rows`), the k + 1 nearest images of
    this shard (one more than a list holds: the image itself may be among them)."""
    options = SearchOptions(k=settings.k + 1, aggregate=settings.aggregate, exact_limit=settings.exact_limit)
    return rank_many(window_sets, view, options, settings.rows)


def merge_lists(ids: np.ndarray, found: list[list[Ranking]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The lists (neighbours int64 [m, k], -1 = none; distances float32) of images `ids`
    from their nearest images in each shard (`found[shard][image]`), ties broken by
    image id as `search.top_k` and the writer's lists break them."""
    near = np.full((len(ids), k), -1, np.int64)
    dist = np.full((len(ids), k), np.inf, np.float32)
    for j, image_id in enumerate(ids.tolist()):
        merged = merge_rankings([shard[j] for shard in found], None)
        other = merged.ids != image_id
        n = min(k, int(other.sum()))
        near[j, :n], dist[j, :n] = merged.ids[other][:n], merged.distances[other][:n]
    return near, dist


def lists_across(shards: list[Neighbours | None], span: list, k: int, where: str) -> Neighbours:
    """The lists of every shard as one (shards in id order), each spanning `span`;
    ValueError saying to run `retrieval dba` on `where` when one is missing, was computed
    by its shard alone, or holds fewer than k."""
    fix = f"compute them with `retrieval dba {where} -k {max(k, 10)}`"
    for n in shards:
        if n is None or n.meta.get(ACROSS) != span:
            raise ValueError(f"re-ranking over shards needs neighbour lists computed across every shard of "
                             f"{where}; {fix}")
        if n.k < k:
            raise ValueError(f"re-ranking (--dba {k}) needs {k} neighbours per image, {where} holds {n.k}; {fix}")
    k_all = min(n.k for n in shards)
    return Neighbours(np.concatenate([n.ids for n in shards]),
                      np.concatenate([n.neighbours[:, :k_all] for n in shards]),
                      np.concatenate([n.distances[:, :k_all] for n in shards]), shards[0].meta)


def concatenate(parts: list[Ranking]) -> Ranking:
    """The shards' unsorted rankings end to end (shard order)."""
    return Ranking(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("ids", "distances", "query_patch",
                                                                                "db_patch", "query")))
