"""Re-ranking with the neighbours (query expansion, database-side augmentation) and
rotation-robust queries, on small generated collections whose expected order is known."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import SELF_DISTANCE, make_scene, run_cli
from retrieval import ExtractorConfig, Index, InputSpec, RuntimeConfig, SearchConfig, SearchOptions
from retrieval.extraction.features import describe
from retrieval.cli.args import parse_rotations
from retrieval.engine.index import IndexUsageError
from retrieval.engine.neighbours import Neighbours
from retrieval.extraction.patches import level_names, unrotate_boxes
from retrieval.engine.search import rank

CONFIG = ExtractorConfig(backbone="resnet18", weights="none", input_spec=InputSpec(size=(64, 64)))
SEARCH = SearchConfig(levels=(1, 2), pca_dim=16)
LEVELS = level_names((1, 2))


def _chain(root, seed: int):
    """Query A; indexed: B (A's left half beside C's right half), C, six distractors.

    A and C share no pixel: B, the query's best hit, is their only link."""
    scene_a, scene_c = make_scene(seed), make_scene(seed + 1)
    query = root / "a.png"
    scene_a.save(query)
    linked = scene_a.copy()
    linked.paste(scene_c.crop((80, 0, 160, 120)), (80, 0))
    paths = {"B": root / "b.png", "C": root / "c.png"}
    linked.save(paths["B"])
    scene_c.save(paths["C"])
    for i in range(6):
        paths[f"D{i}"] = root / f"d{i}.png"
        make_scene(seed + 10 + i).save(paths[f"D{i}"])
    with Index.create(root / "idx", CONFIG, SEARCH, store=root / "s.sqlite", runtime=RuntimeConfig(batch_size=16)) as idx:
        idx.add([str(p) for p in paths.values()], progress=False)
    return root / "idx", str(query), {str(p): name for name, p in paths.items()}


@pytest.fixture(scope="module")
def qe_chain(tmp_path_factory):
    return _chain(tmp_path_factory.mktemp("qe"), 500)


@pytest.fixture(scope="module")
def dba_chain(tmp_path_factory):
    return _chain(tmp_path_factory.mktemp("dba"), 400)


def _order(idx, query, names, **kw):
    return [names[h.path] for h in idx.search([query], k=None, **kw)[0].hits]


def test_off_reproduces_the_plain_ranking_exactly(qe_chain):
    index, query, _ = qe_chain
    with Index.open(index) as idx:
        view = idx.view()
        f = next(describe([query], idx.extractor, idx.store, LEVELS, progress=False))
        # What search was before re-ranking existed: one whitened query through `rank`.
        plain = rank(view.whitening.transform(np.concatenate([f.descriptors[n] for n in LEVELS])), view,
                     SearchOptions(k=None))
        for kw in ({"rerank": False}, {"qe": 0, "dba": 0, "rerank": False},
                   {"query_rotations": (0,), "rerank": False}):
            hits = idx.search([query], k=None, **kw)[0].hits
            assert [h.id for h in hits] == plain.ids.tolist()
            assert [h.distance for h in hits] == plain.distances.tolist()
            assert all(h.rotation == (0 if kw.get("query_rotations") else None) for h in hits)
            assert all(h.rerank_distance is None for h in hits)
        reranked = idx.search([query], k=None, rerank=True)[0].hits
        # Ordered by the re-ranked distance; `distance` stays each image's plain one.
        assert all(h.rerank_distance is not None for h in reranked)
        assert [h.rerank_distance for h in reranked] == sorted(h.rerank_distance for h in reranked)
        plain_of = dict(zip(plain.ids.tolist(), plain.distances.tolist()))
        assert all(h.distance == plain_of[h.id] for h in reranked)
    out = run_cli("query", str(index), query, "-k", "20", "--json", "--quiet", "--no-rerank")
    assert out.returncode == 0, out.stderr
    hits = json.loads(out.stdout)["results"][0]["hits"]
    assert [h["distance"] for h in hits] == pytest.approx(plain.distances.tolist())
    assert all("rerank_distance" not in h for h in hits)
    out = run_cli("query", str(index), query, "-k", "3", "--quiet", "--rerank")
    lines = out.stdout.splitlines()[1:]  # the query, then one line per hit: re-ranked distance first
    assert out.returncode == 0 and len(lines) == 3 and all(" re-ranked, " in line for line in lines)


def _hits(result):
    return [(h.id, h.distance, h.rerank_distance) for h in result.hits]


def test_reranking_is_on_by_default_where_the_writer_keeps_lists(qe_chain, tmp_path, monkeypatch):
    """Eight whitened images with the lists the writer keeps: the default search is the
    adaptive one; fixed counts stay fixed; above RERANK_AUTO_LIMIT images, or without
    lists, the default is the plain ranking. `info` and the CLI say the same."""
    index, query, _ = qe_chain
    with Index.open(index) as idx:
        assert idx.info()["reranking"]["by_default"] is True
        default = idx.search([query], k=None)[0]
        assert default.hits[0].rerank_distance is not None
        assert _hits(default) == _hits(idx.search([query], k=None, rerank=True)[0])
        assert _hits(idx.search([query], k=None, qe=1)[0]) == _hits(idx.search([query], k=None, qe=1, rerank=False)[0])
        plain = _hits(idx.search([query], k=None, rerank=False)[0])
        monkeypatch.setattr("retrieval.config.RERANK_AUTO_LIMIT", 7)
        assert _hits(idx.search([query], k=None)[0]) == plain
        assert idx.info()["reranking"]["by_default"] is False
        monkeypatch.undo()
    out = run_cli("query", str(index), query, "-k", "3", "--json", "--quiet")
    assert out.returncode == 0 and all("rerank_distance" in h for h in json.loads(out.stdout)["results"][0]["hits"])
    # The same collection without its lists (as an index written before the writer kept them).
    bare = tmp_path / "bare"
    shutil.copytree(index, bare)
    (bare / "neighbours.npz").unlink()
    with Index.open(bare) as idx:
        assert idx.info()["reranking"]["by_default"] is False
        assert _hits(idx.search([query], k=None)[0]) == plain


def test_the_default_is_decided_from_the_collection():
    default = SearchOptions()
    assert default.rerank is None and not default.reranks  # undecided counts as off
    decide = default.with_default_rerank
    assert decide(2000, True, True).rerank is True
    assert decide(2001, True, True).rerank is False
    assert decide(10, False, True).rerank is False and decide(10, True, False).rerank is False
    assert SearchOptions(qe=5).with_default_rerank(10, True, True).rerank is False  # a fixed count asked
    assert SearchOptions(rerank=False).with_default_rerank(10, True, True).rerank is False
    assert SearchOptions(rerank=True).with_default_rerank(10 ** 6, False, False).rerank is True


@pytest.mark.parametrize("options", [{}, {"rerank": True, "rerank_margin": 0.5}, {"qe": 3}, {"dba": 3},
                                     {"qe": 3, "dba": 3}])
def test_no_reranking_moves_a_query_s_exact_duplicate_from_first_place(tmp_path_factory, options):
    """Random weights make every window alike, so re-ranking averages each image with all
    the others; without the rule that an exact duplicate keeps its plain distance, 2 of
    these 8 images lost first place to a neighbour (3.7 % of UKBench's self-queries did)."""
    root = tmp_path_factory.mktemp("alike")
    paths = []
    for i in range(8):
        paths.append(str(root / f"s{i}.jpg"))
        make_scene(100 + i).save(paths[-1], quality=90)
    with Index.create(root / "idx", CONFIG, SEARCH, store=root / "s.sqlite", runtime=RuntimeConfig(batch_size=8)) as idx:
        idx.add(paths, progress=False)
        results = idx.search(paths, k=3, **options)
    for path, result in zip(paths, results):
        top = result.hits[0]
        assert top.path == path and top.distance < SELF_DISTANCE
        assert top.rerank_distance == top.distance  # its plain distance: nothing is nearer than itself
        assert all(h.rerank_distance > SELF_DISTANCE for h in result.hits[1:])


@pytest.mark.parametrize("margin", [0.0, 0.1, 0.5, 10.0])
def test_adaptive_reranking_keeps_an_exact_duplicate_first(qe_chain, margin):
    index, _, names = qe_chain
    with Index.open(index) as idx:
        for path in names:  # every indexed image is its own exact duplicate
            hits = idx.search([path], k=3, rerank=True, rerank_margin=margin)[0].hits
            assert hits[0].path == path and hits[0].rerank_distance is not None


def test_adaptive_margin_chooses_how_many_hits_expand_the_query(qe_chain):
    """The chain A -> B -> C: C shares nothing with A. A margin taking in B (A's best hit)
    reaches C as query expansion with one hit does; a margin of 0 keeps only B."""
    index, query, names = qe_chain
    with Index.open(index) as idx:
        fixed = _order(idx, query, names, qe=1)
        wide = _order(idx, query, names, rerank=True, rerank_margin=0.0)
    assert fixed[:2] == ["B", "C"] and wide[:2] == ["B", "C"]


def test_query_expansion_reaches_the_far_end_of_a_chain(qe_chain):
    index, query, names = qe_chain
    with Index.open(index) as idx:
        plain = _order(idx, query, names, rerank=False)
        expanded = _order(idx, query, names, qe=1)
        hits = idx.search([query], k=3, qe=1)[0].hits
    assert plain[0] == "B" and plain.index("C") > 1  # a distractor beats C without expansion
    assert expanded[:2] == ["B", "C"]
    assert [names[h.path] for h in hits] == expanded[:3]  # k cuts the same ranking
    assert all(a.rerank_distance <= b.rerank_distance for a, b in zip(hits, hits[1:]))


def test_database_side_augmentation_lifts_the_neighbour_and_follows_add_and_remove(dba_chain, tmp_path):
    index, query, names = dba_chain
    with Index.open(index) as idx:
        assert idx.info()["neighbours"]["k"] == 10  # kept by the writer since the first add
        meta = idx.build_neighbours(2)
        assert meta["k"] == 2 and meta["images"] == 8
        assert idx.info()["neighbours"]["up_to_date"] is True
        plain = _order(idx, query, names, rerank=False)
        augmented = _order(idx, query, names, dba=1, qe_alpha=1)
        with pytest.raises(IndexUsageError, match="--dba 3"):
            idx.search([query], k=3, dba=3)
        # B removed: C loses its only link; the lists no longer name it.
        b = next(p for p, n in names.items() if n == "B")
        idx.remove([b])
        after = _order(idx, query, names, dba=1, qe_alpha=1)
        extra = tmp_path / "new.png"
        make_scene(777).save(extra)
        idx.add([str(extra)], progress=False)
        names[str(extra)] = "new"
        with_new = _order(idx, query, names, dba=1, qe_alpha=1)
        info = idx.info()["neighbours"]
    assert info["up_to_date"] is True and info["k"] == 2 and info["images"] == 8
    assert plain[0] == "B" and plain[-1] == "C"
    assert augmented[:2] == ["B", "C"]
    assert "B" not in after and after.index("C") > 1
    assert sorted(with_new) == sorted(after + ["new"])


def test_an_image_found_only_when_the_query_is_turned(qe_chain, tmp_path):
    index, _, names = qe_chain
    source = next(p for p, n in names.items() if n == "D0")
    query = tmp_path / "turned.png"
    Image.open(source).transpose(Image.Transpose.ROTATE_90).save(query)  # 120 x 160 now
    with Index.open(index) as idx:
        upright = idx.search([str(query)], k=3)[0].hits
        turned = idx.search([str(query)], k=3, query_rotations=(0, 90, 180, 270))[0].hits
        again = idx.search([str(query)], k=3)[0].hits
    assert upright[0].distance > 0.3 and upright[0].rotation is None
    top = turned[0]
    assert top.path == source and top.distance < SELF_DISTANCE
    assert top.rotation == 270  # turning the query back undoes the 90
    # The deciding windows are the same pixels: the hit's box, turned with the query.
    assert np.allclose(unrotate_boxes(np.array([top.db_box]), 270, 160, 120)[0], top.query_box, atol=0.2)
    assert all(0 <= v <= 160 for v in top.query_box) and top.query_box[2] <= 120
    # Upright and turned descriptors are stored under different keys: nothing leaked.
    assert [(h.path, h.distance) for h in again] == [(h.path, h.distance) for h in upright]


def test_rotations_with_a_crop_map_boxes_into_the_original_pixels(qe_chain, tmp_path):
    index, _, names = qe_chain
    source = next(p for p, n in names.items() if n == "D1")
    query = tmp_path / "turned.png"
    Image.open(source).transpose(Image.Transpose.ROTATE_270).save(query)  # 120 x 160
    crop = (10.0, 20.0, 110.0, 150.0)
    with Index.open(index) as idx:
        hits = idx.search([(str(query), crop)], k=2, query_rotations=(0, 90))[0].hits
    assert hits[0].path == source and hits[0].rotation == 90
    x0, y0, x1, y1 = hits[0].query_box
    assert crop[0] - 0.1 <= x0 < x1 <= crop[2] + 0.1 and crop[1] - 0.1 <= y0 < y1 <= crop[3] + 0.1


def test_auto_rotation_picks_the_turn_that_undoes_the_query_s(qe_chain, tmp_path):
    index, _, names = qe_chain
    sources = [p for p, n in names.items() if n in ("D2", "D3")]
    cases = []
    for source, (turn, undo) in zip(sources * 2, [(Image.Transpose.ROTATE_90, 270), (Image.Transpose.ROTATE_180, 180),
                                                   (Image.Transpose.ROTATE_270, 90), (None, 0)]):
        query = tmp_path / f"{undo}-{len(cases)}.png"
        (Image.open(source) if turn is None else Image.open(source).transpose(turn)).save(query)
        cases.append((str(query), source, undo))
    with Index.open(index) as idx:
        auto = idx.search([q for q, _, _ in cases], k=3, query_rotations="auto")
        for (query, source, undo), result in zip(cases, auto):
            assert [h.rotation for h in result.hits] == [undo] * 3
            assert result.hits[0].path == source
            explicit = idx.search([query], k=3, query_rotations=(undo,))[0].hits
            assert [h.to_dict() for h in result.hits] == [h.to_dict() for h in explicit]
        with pytest.raises(IndexUsageError):
            idx.search([cases[0][0]], k=2, query_rotations="sometimes")
    assert SearchOptions(query_rotations="auto").rotations == (0,)
    assert parse_rotations("auto") == "auto"  # the CLI flag and the serve field parse it so


def test_bad_options_are_usage_errors(qe_chain):
    index, query, _ = qe_chain
    with Index.open(index) as idx:
        for kw in ({"query_rotations": (45,)}, {"query_rotations": (0, 0)}, {"query_rotations": ()},
                   {"qe": -1}, {"qe_alpha": -1.0}):
            with pytest.raises(IndexUsageError):
                idx.search([query], k=2, **kw)


def test_cli_flags_and_the_dba_command(qe_chain, tmp_path):
    index, query, _ = qe_chain
    before = sorted(p.name for p in index.iterdir())
    for flags, needle in ((["--qe", "-1"], "--qe"), (["--query-rotations", "0,45"], "--query-rotations"),
                          (["--dba", "x"], "--dba"), (["--qe-alpha", "-2"], "--qe-alpha"),
                          (["--dba", "11"], "retrieval dba")):  # the writer keeps 10
        out = run_cli("query", str(index), query, "--json", "--quiet", *flags)
        assert out.returncode == 2 and needle in out.stderr and out.stdout == "", (flags, out.stderr)
    assert sorted(p.name for p in index.iterdir()) == before  # a refused command wrote nothing
    out = run_cli("dba", str(index), "-k", "0", "--json")
    assert out.returncode == 2 and "-k" in out.stderr
    out = run_cli("dba", str(index), "-k", "2", "--json", "--quiet")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["k"] == 2
    out = run_cli("query", str(index), query, "-k", "3", "--json", "--quiet",
                  "--qe", "2", "--dba", "2", "--query-rotations", "0,180")
    assert out.returncode == 0, out.stderr
    hits = json.loads(out.stdout)["results"][0]["hits"]
    assert len(hits) == 3 and all(h["rotation"] in (0, 180) for h in hits)
    plain = json.loads(run_cli("query", str(index), query, "-k", "3", "--json", "--quiet").stdout)
    assert all("rotation" not in h for h in plain["results"][0]["hits"])


def test_candidate_search_gives_the_exact_answer_when_it_sees_everything(qe_chain, tmp_path):
    """Above the exact limit the options work on a candidate pool; with a structure that
    nominates every image the pool is the collection, so the answers must be the same."""
    index, query, _ = qe_chain
    copy = tmp_path / "idx"
    shutil.copytree(index, copy)
    turned = tmp_path / "turned.png"
    Image.open(query).transpose(Image.Transpose.ROTATE_180).save(turned)
    with Index.open(copy) as idx:
        idx.build_neighbours(2)
        options = ({"qe": 2}, {"dba": 2}, {"qe": 2, "dba": 2, "query_rotations": (0, 180)}, {"query_rotations": (90, 180)})
        exact = [idx.search([str(turned)], k=4, **kw)[0].hits for kw in options]
        idx.set_index_type("IVF1,Flat")
        assert idx.info()["structure"]["search"] == "candidates"
        pooled = [idx.search([str(turned)], k=4, exact_limit=0, per_patch=100, **kw)[0].hits for kw in options]
    for a, b in zip(exact, pooled):
        assert [(h.path, h.rotation) for h in a] == [(h.path, h.rotation) for h in b]
        assert np.allclose([h.distance for h in a], [h.distance for h in b], atol=1e-6)


def test_reranking_asks_faiss_no_deeper_than_the_plain_search(qe_chain, tmp_path, monkeypatch):
    """Re-ranking's pools (the query's, each expanding hit's) come from FAISS searches of
    the plain search's depth in windows: per_patch growing with the pool's depth made the
    kernel score ten times the plain search's images per description."""
    from retrieval.engine import ann
    from retrieval.engine.search import windows_per_window

    index, query, _ = qe_chain
    copy = tmp_path / "idx"
    shutil.copytree(index, copy)
    asked: list[int] = []
    search = ann.VectorIndex.search

    def spy(self, queries, k, nprobe=None):
        asked.append(k)
        return search(self, queries, k, nprobe)

    with Index.open(copy) as idx:
        idx.set_index_type("IVF1,Flat")
        Neighbours.remove(copy)  # no lists: the hits' pools come from FAISS too
        plain = idx.search([query], k=4, exact_limit=0)[0].hits
        monkeypatch.setattr(ann.VectorIndex, "search", spy)
        reranked = idx.search([query], k=4, exact_limit=0, qe=2)[0].hits
    assert reranked and plain and reranked[0].path == plain[0].path
    depth = windows_per_window(SearchOptions(k=4))
    assert len(asked) >= 2 and set(asked) == {depth}, asked


@pytest.mark.parametrize("lists", [True, False], ids=["stored lists", "no lists"])
def test_expanding_hits_add_their_nearest_to_the_pool_and_are_scored_together(qe_chain, tmp_path, monkeypatch,
                                                                              lists):
    """The query's pool is its RERANK_POOL nearest. Each expanding hit adds its stored
    neighbour list when the index has lists (no FAISS search or kernel call for it), else
    only its HIT_POOL nearest (at 100,000 images 20 gave the lists of 100 at a third of the
    cost). The hits' distances over the pool come from one batched kernel call per segment
    (`pool_distances`), the same as one call per hit."""
    from retrieval.engine import search as search_module

    index, query, _ = qe_chain
    copy = tmp_path / "idx"
    shutil.copytree(index, copy)
    depths: list[tuple[int, int]] = []
    batched: list[tuple[int, int, bool]] = []  # (window sets, pool size, one shared pool)
    rank_many, pool_distances = search_module.rank_many, search_module.pool_distances

    def spy_rank_many(descriptions, view, options, *args, **kwargs):
        depths.append((len(descriptions), options.k))
        return rank_many(descriptions, view, options, *args, **kwargs)

    def spy_pool_distances(queries, view, pools, aggregate):
        batched.append((len(queries), len(pools[0]), all(p is pools[0] for p in pools)))
        return pool_distances(queries, view, pools, aggregate)

    with Index.open(copy) as idx:
        idx.set_index_type("IVF1,Flat")  # the writer keeps the lists of so small an index
        if not lists:
            Neighbours.remove(copy)
        monkeypatch.setattr(search_module, "rank_many", spy_rank_many)
        monkeypatch.setattr(search_module, "pool_distances", spy_pool_distances)
        reranked = idx.search([query], k=4, exact_limit=0, qe=3)[0].hits
        monkeypatch.undo()
        monkeypatch.setattr(search_module, "_distances_in", lambda sets, view, pool, aggregate: [
            search_module.image_distances(w, view, pool, aggregate) for w in sets])
        one_by_one = idx.search([query], k=4, exact_limit=0, qe=3)[0].hits
    assert depths[0] == (1, search_module.RERANK_POOL)  # the query's own pool
    # The 3 expanding hits' nearest: from their lists, or from FAISS and the kernel together.
    assert depths[1:] == ([] if lists else [(3, search_module.HIT_POOL)])
    hits_over_the_pool = batched[-1]  # the last kernel call: every hit over the one final pool, together
    assert hits_over_the_pool[0] == 3 and hits_over_the_pool[2], batched
    assert [(h.path, h.distance) for h in reranked] == [(h.path, h.distance) for h in one_by_one]


def test_reranking_averages_each_image_with_its_five_nearest_kept_neighbours(tmp_path):
    """`rerank` fills in the counts not given: expansion by the hits within the margin,
    augmentation by RERANK_DBA (5) kept neighbours, or fewer where fewer are kept."""
    from retrieval.config import RERANK_DBA
    from retrieval.engine.search import augmentation_depth

    lists = Neighbours(np.arange(4), np.zeros((4, 10), np.int64), np.zeros((4, 10), np.float32), {})
    assert RERANK_DBA == 5 and augmentation_depth(SearchOptions(rerank=True), lists) == 5
    short = Neighbours(np.arange(4), np.zeros((4, 3), np.int64), np.zeros((4, 3), np.float32), {})
    assert augmentation_depth(SearchOptions(rerank=True), short) == 3  # `retrieval dba -k 3` kept 3
    assert augmentation_depth(SearchOptions(rerank=True, dba=2), lists) == 2  # a count given wins
    assert augmentation_depth(SearchOptions(rerank=False), lists) == 0
    assert augmentation_depth(SearchOptions(rerank=True), None) == 0  # no lists: expansion alone
    index, query, _ = _chain(tmp_path, 600)
    with Index.open(index) as idx:
        assert idx.info()["neighbours"]["k"] == 10  # kept by the writer
        reranked = idx.search([query], k=None, rerank=True)[0].hits
        same = idx.search([query], k=None, rerank=True, dba=5)[0].hits
    assert [(h.id, h.rerank_distance) for h in reranked] == [(h.id, h.rerank_distance) for h in same]
