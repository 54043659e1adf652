"""Merging the rankings of one query described several ways (its rotations):
`rank_descriptions` against one separate `rank` per description.

An image's distance is its smallest over the descriptions, the deciding description (and
its pair of windows) is the one that reached it, the earliest on ties, and the top k of
the merge is the top k of those minima, ties by image id. The expected answer is computed
here from one full `rank` per description, independently of how the merge does it.
"""
from __future__ import annotations

import numpy as np
import pytest

from retrieval import ExtractorConfig, Index, InputSpec, RuntimeConfig, SearchConfig, SearchOptions
from retrieval.engine import search

from conftest import make_scene


def _rank(query, view, k, aggregate="mean-min"):
    return search.rank(query, view, SearchOptions(k=k, aggregate=aggregate))


def _merged(queries, view, k, aggregate="mean-min"):
    return search.rank_descriptions(queries, view, SearchOptions(k=k, aggregate=aggregate))


CONFIG = ExtractorConfig(backbone="resnet18", weights="none", input_spec=InputSpec(size=(64, 64)))
SEARCH = SearchConfig(levels=(1, 2), pca_dim=16)


@pytest.fixture(scope="module")
def view(tmp_path_factory):
    """13 live images in two segments and a tombstone (the merge must see only live ones)."""
    base = tmp_path_factory.mktemp("merge")
    (base / "imgs").mkdir()
    paths = []
    for i in range(14):
        paths.append(str(base / "imgs" / f"m{i:02d}.jpg"))
        make_scene(500 + i, size=(96, 72)).save(paths[-1])
    with Index.create(base / "idx", CONFIG, SEARCH, store=base / "s.sqlite",
                      runtime=RuntimeConfig(device="cpu", batch_size=16)) as idx:
        idx.add(paths[:10], progress=False)
        idx.add(paths[10:], progress=False)
        idx.remove(paths[3:4])
        view = idx.view()
        assert view.images == 13 and len(view.segments) == 2 and len(view.dead) == 1
        yield view


def _expected(queries, view, k, aggregate):
    """(ids, distances, deciding query, query patch, db patch) from one full rank per query."""
    best: dict[int, tuple] = {}
    for q, query in enumerate(queries):
        r = _rank(query, view, None, aggregate)
        assert len(r.ids) == view.images
        for i, d, qp, dp in zip(r.ids.tolist(), r.distances.tolist(), r.query_patch.tolist(), r.db_patch.tolist()):
            if i not in best or d < best[i][0]:  # strictly smaller: ties stay with the earlier query
                best[i] = (d, q, qp, dp)
    order = sorted(best, key=lambda i: (best[i][0], i))[:k]
    return [(i, *best[i]) for i in order]


@pytest.mark.parametrize("aggregate", ["min", "mean-min"])
def test_merge_is_the_minimum_over_the_separate_ranks(view, aggregate):
    rng = np.random.default_rng(7)
    live = np.unique(np.concatenate([s.ids for s in view.segments]))
    live = live[~np.isin(live, view.dead)]
    a, b = int(live[2]), int(live[9])
    noise = rng.normal(size=(5, view.whitening.output_dim)).astype(np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    # Two images' own windows, random windows, and the first query again: every image
    # ties between queries 0 and 3, and query 3 must never be the one that decided.
    queries = [view.windows(a), view.windows(b), noise, view.windows(a)]
    for k in (1, 4, 12, 13, 50, None):
        merged = _merged(queries, view, k, aggregate)
        want = _expected(queries, view, k, aggregate)
        got = list(zip(merged.ids.tolist(), merged.distances.tolist(), merged.query.tolist(),
                       merged.query_patch.tolist(), merged.db_patch.tolist()))
        assert got == want, f"k={k}"
    full = _merged(queries, view, None, aggregate)
    decided = dict(zip(full.ids.tolist(), full.query.tolist()))
    # Not a degenerate case: each image is decided by its own windows, and 3 never decides.
    assert decided[a] == 0 and decided[b] == 1 and 3 not in decided.values()
    assert len(set(decided.values())) >= 2


def test_one_query_is_rank(view):
    query = view.windows(int(view.segments[0].ids[0]))
    for k in (3, None):
        one, plain = _merged([query], view, k), _rank(query, view, k)
        np.testing.assert_array_equal(one.ids, plain.ids)
        np.testing.assert_array_equal(one.distances, plain.distances)
