"""One search-options value (`retrieval.SearchOptions`): checked once, with the same verdict
through the Python API, the command line and the server; FAISS parameters per call (threads
searching one index with different nprobe); one result per query, in input order."""
from __future__ import annotations

import importlib.util
import json
import re
import threading
from pathlib import Path

import faiss
import numpy as np
import pytest

from conftest import ROOT, make_scene, run_cli
from retrieval import ExtractorConfig, Index, InputSpec, QueryResult, RuntimeConfig, SearchConfig, SearchOptions
from retrieval.config import LAYOUT_K, NPROBE, NPROBE_MIN, PER_PATCH_MIN, ConfigError, SearchOptionError
from retrieval.engine.ann import VectorIndex
from retrieval.engine.index import IndexUsageError
from retrieval.engine import ann, search
from retrieval.engine.search import candidate_images, rank, shortlisted
from retrieval.extraction.features import describe
from retrieval.extraction.patches import level_names

CONFIG = ExtractorConfig(backbone="resnet18", weights="none", input_spec=InputSpec(size=(64, 64)))
SEARCH = SearchConfig(levels=(1, 2), pca_dim=16)


@pytest.fixture(scope="module")
def ivf_index(tmp_path_factory):
    """12 scenes searched through an 8-list IVF structure (exact_limit=0 forces it)."""
    root = tmp_path_factory.mktemp("options")
    images = root / "images"
    images.mkdir()
    paths = []
    for i in range(12):
        make_scene(200 + i).save(images / f"s{i:02d}.jpg", quality=90)
        paths.append(str(images / f"s{i:02d}.jpg"))
    with Index.create(root / "idx", CONFIG, SEARCH, store=root / "s.sqlite", index_type="IVF8,Flat",
                      runtime=RuntimeConfig(batch_size=16)) as idx:
        idx.add(paths, progress=False)
    return root / "idx", paths


@pytest.mark.parametrize("field, value, allowed", [
    ("k", 0, "a whole number >= 1"),
    ("k", 2.5, "a whole number >= 1"),
    ("k", True, "a whole number >= 1"),
    ("nprobe", 0, "a whole number >= 1"),
    ("per_patch", 0, "a whole number >= 1"),
    ("layout_k", -1, "a whole number >= 0"),
    ("shortlist", -1, "a whole number >= 0"),
    ("exact_limit", -1, "a whole number >= 0"),
    ("qe", -1, "a whole number >= 0"),
    ("dba", -2, "a whole number >= 0"),
    ("qe_alpha", -1.0, "a number >= 0"),
    ("qe_alpha", float("nan"), "a number >= 0"),
    ("aggregate", "max", "one of min, mean-min"),
    ("query_levels", (1, 7), "a non-empty list of levels from 1,2,3,4"),
    ("query_levels", (), "a non-empty list of levels from 1,2,3,4"),
    ("query_rotations", (0, 45), 'a non-empty list of distinct values from 0,90,180,270, or "auto"'),
    ("query_rotations", (90, 90), 'a non-empty list of distinct values from 0,90,180,270, or "auto"'),
    ("query_rotations", (), 'a non-empty list of distinct values from 0,90,180,270, or "auto"'),
])
def test_each_field_is_checked_in_the_constructor(field, value, allowed):
    with pytest.raises(SearchOptionError) as caught:
        SearchOptions(**{field: value})
    err = caught.value
    assert isinstance(err, ConfigError) and (err.field, err.allowed) == (field, allowed)
    assert str(err).startswith(f"{field} must be {allowed}")


def test_defaults_are_held_and_values_normalised():
    options = SearchOptions(nprobe=None, layout_k=None, query_levels=[2, 1], query_rotations=[90, 0], qe_alpha=2)
    # nprobe None stays None: the structure's own default (`VectorIndex.default_nprobe`)
    assert (options.nprobe, options.layout_k, options.k) == (None, LAYOUT_K, 10)
    assert options.query_levels == (1, 2) and options.query_rotations == (90, 0) and options.qe_alpha == 2.0
    assert SearchOptions().rotations == (0,) and options.rotations == (90, 0)
    assert SearchOptions(k=None).k is None and SearchOptions(k=np.int64(3)).k == 3
    with pytest.raises(AttributeError):
        options.k = 3  # frozen: one value, shared safely by threads and shards
    with pytest.raises(SearchOptionError, match="nprobe"):
        options.replace(nprobe=0)
    resolved = SearchOptions().for_index(SearchConfig(levels=(1, 2), query_levels=(2,), aggregate="min"))
    assert (resolved.query_levels, resolved.aggregate) == ((2,), "min")


def test_the_same_bad_value_gets_the_same_verdict_everywhere(ivf_index):
    """nprobe=0 (which the API once turned silently into 16) and k=0: refused by the value,
    by Index.search, by `retrieval query` (exit 2, the flag named) and by the server (400)."""
    index, paths = ivf_index
    verdicts = {"nprobe": "must be a whole number >= 1 (got 0)", "k": "must be a whole number >= 1 (got 0)"}
    with Index.open(index) as idx:
        for field, verdict in verdicts.items():
            with pytest.raises(SearchOptionError, match=f"^{re.escape(field + ' ' + verdict)}$"):
                SearchOptions(**{field: 0})
            with pytest.raises(IndexUsageError, match=f"^{re.escape(field + ' ' + verdict)}$"):
                idx.search(paths[:1], **{field: 0})
    for flag, verdict in (("--nprobe", verdicts["nprobe"]), ("-k", verdicts["k"])):
        out = run_cli("query", str(index), paths[0], flag, "0", "--json", "--quiet")
        assert out.returncode == 2 and f"{flag} {verdict}" in out.stderr and out.stdout == "", out.stderr
    pytest.importorskip("fastapi")
    pytest.importorskip("multipart")
    from fastapi.testclient import TestClient

    from retrieval.serving.server import create_app

    with TestClient(create_app(index), base_url="http://127.0.0.1") as client:
        for field, verdict in verdicts.items():
            r = client.post("/api/query", files={"image": ("q.jpg", open(paths[0], "rb").read(), "image/jpeg")},
                            data={field: "0"})
            assert r.status_code == 400 and r.json()["detail"] == f"{field} {verdict}", r.text
        # A good nprobe is taken (the server builds the same value).
        r = client.post(f"/api/query/{_id(client, paths[3])}", data={"nprobe": "2", "k": "3"})
        assert r.status_code == 200 and len(r.json()["results"][0]["hits"]) == 3


def _id(client, path):
    return client.get("/api/lookup", params={"path": path}).json()["id"]


def test_options_value_and_keywords_are_the_same_search(ivf_index):
    index, paths = ivf_index
    options = SearchOptions(k=3, exact_limit=0, nprobe=2, per_patch=4)
    with Index.open(index) as idx:
        by_value = idx.search(paths[:3], options=options)
        by_keywords = idx.search(paths[:3], k=3, exact_limit=0, nprobe=2, per_patch=4)
        assert [[(h.id, h.distance) for h in r.hits] for r in by_value] == \
               [[(h.id, h.distance) for h in r.hits] for r in by_keywords]
        with pytest.raises(TypeError, match="not both"):
            idx.search(paths[:1], 3, options=options)
        with pytest.raises(TypeError, match="not both"):
            idx.search(paths[:1], options=options, nprobe=4)
        with pytest.raises(TypeError):
            idx.search(paths[:1], k=3, nprob=4)  # a misspelt option is no silent default


def test_threads_with_different_nprobe_get_the_sequential_answers(ivf_index):
    """nprobe travels with each FAISS call: two threads ranking on one index's view with
    nprobe 1 and 8 get exactly what each gets alone, and the shared structure is untouched."""
    index, paths = ivf_index
    with Index.open(index) as idx:
        view = idx.view()
        feats = list(describe(paths, idx.extractor, idx.store, level_names((1, 2)), progress=False))
        queries = [view.whitening.transform(np.concatenate([f.descriptors[n] for n in level_names((1, 2))]))
                   for f in sorted(feats, key=lambda f: f.path)]
    ivf = faiss.extract_index_ivf(view.ann.index)
    stored = ivf.nprobe
    narrow = SearchOptions(k=3, exact_limit=0, nprobe=1, per_patch=2, layout_k=0)
    wide = narrow.replace(nprobe=8)
    alone = {o.nprobe: [_answer(q, view, o) for q in queries] for o in (narrow, wide)}
    # The two settings do answer differently, so a leak of one into the other shows.
    assert alone[1] != alone[8]
    got: dict[int, list] = {1: [], 8: []}
    start = threading.Barrier(2)

    def work(options: SearchOptions) -> None:
        start.wait()
        for _ in range(30):
            got[options.nprobe].append([_answer(q, view, options) for q in queries])

    threads = [threading.Thread(target=work, args=(o,)) for o in (narrow, wide)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(answer == alone[1] for answer in got[1]) and len(got[1]) == 30
    assert all(answer == alone[8] for answer in got[8]) and len(got[8]) == 30
    assert ivf.nprobe == stored


def _answer(query, view, options):
    """What nprobe decides: the candidate images and the ranking over them."""
    r = rank(query, view, options)
    return candidate_images(query, view, options).tolist(), r.ids.tolist(), r.distances.tolist()


def test_one_result_per_query_in_input_order(ivf_index, tmp_path):
    index, paths = ivf_index
    missing = str(tmp_path / "missing.jpg")
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    queries = [paths[0], missing, (paths[1], (0.0, 0.0, 80.0, 60.0)), paths[0], str(text), paths[2]]
    skipped: list[dict] = []
    with Index.open(index) as idx:
        results = idx.search(queries, k=2, skipped=skipped)
        alone = [idx.search([q], k=2)[0] for q in (paths[0], queries[2], paths[2])]
    assert all(isinstance(r, QueryResult) for r in results) and len(results) == len(queries)
    assert [r.query for r in results] == [paths[0], missing, paths[1], paths[0], str(text), paths[2]]
    assert [r.error is None for r in results] == [True, False, True, True, False, True]
    assert results[1].hits == [] and results[1].error == "file not found"
    assert results[4].hits == [] and "not an image" in results[4].error
    answered = [results[0], results[2], results[5]]
    assert [[(h.id, h.distance) for h in r.hits] for r in answered] == \
           [[(h.id, h.distance) for h in r.hits] for r in alone]
    assert results[3].hits == results[0].hits  # a repeated query is answered again
    assert skipped == [{"path": missing, "reason": "file not found"},
                       {"path": str(text), "reason": results[4].error}]
    assert results[1].to_dict() == {"query": missing, "hits": [], "error": "file not found"}
    assert set(results[0].to_dict()) == {"query", "hits"}  # the SPEC query JSON, unchanged
    # The command line keeps reporting unreadable queries in `skipped` only (exit 3).
    out = run_cli("query", str(index), paths[0], missing, paths[2], "-k", "2", "--json", "--quiet")
    report = json.loads(out.stdout)
    assert out.returncode == 3 and f"skipped {missing}: file not found" in out.stderr
    assert [r["query"] for r in report["results"]] == [paths[0], paths[2]]
    assert report["skipped"] == [{"path": missing, "reason": "file not found"}]


def test_sharded_search_aligns_results_and_takes_the_options_value(ivf_index, tmp_path):
    from retrieval.engine.sharded import split_index

    index, paths = ivf_index
    missing = str(tmp_path / "missing.jpg")
    options = SearchOptions(k=4)
    with split_index(index, tmp_path / "shards", 2) as shards, Index.open(index) as whole:
        got = shards.search([paths[5], missing, paths[7]], options=options)
        want = whole.search([paths[5], paths[7]], options=options)
        with pytest.raises(IndexUsageError, match="nprobe must be"):
            shards.search(paths[:1], nprobe=0)
    assert [r.error for r in got] == [None, "file not found", None] and got[1].hits == []
    top = lambda r: [(h.path, round(h.distance, 5), h.query_box, h.db_box) for h in r.hits]  # noqa: E731
    assert [top(r) for r in (got[0], got[2])] == [top(r) for r in want]


@pytest.mark.parametrize("k, per_patch, asked", [(10, None, 40), (5, None, 32), (50, None, 200), (10, 7, 7)])
def test_faiss_is_asked_for_the_default_or_given_windows_per_query_window(ivf_index, monkeypatch, k, per_patch, asked):
    """Without per_patch, each query window asks FAISS for its max(4k, 32) nearest windows
    (PER_PATCH_MIN, lowered from 64: benchmarks/results/concurrency.md); a given value wins."""
    index, paths = ivf_index
    asks: list[int] = []
    original = VectorIndex.search

    def recording(self, queries, n, nprobe=None):
        if faiss.try_extract_index_ivf(self.index) is not None:  # the window index, not the layout's
            asks.append(n)
        return original(self, queries, n, nprobe)

    monkeypatch.setattr(VectorIndex, "search", recording)
    with Index.open(index) as idx:
        idx.search(paths[:2], k=k, exact_limit=0, per_patch=per_patch, rerank=False)
    assert asks == [asked]
    assert PER_PATCH_MIN == 32


def test_the_shortlist_keeps_the_images_nearest_by_faiss_evidence():
    """Three query windows, their two nearest windows each (ids: image * 64 + window). A
    window that did not find an image counts at the farthest it found (its floor); the
    estimate follows the image distance: the mean over windows, or the smallest."""
    w = lambda image, window=0: image * 64 + window  # noqa: E731
    found = np.array([[w(1), w(2)],     # window 0: image 1 at 0.98, image 2 at 0.60
                      [w(3), w(2, 1)],  # window 1: image 3 at 0.90, image 2 at 0.80
                      [w(2, 2), -1]])   # window 2: image 2 at 0.70, nothing more
    sims = np.array([[0.98, 0.60], [0.90, 0.80], [0.70, -np.inf]], np.float32)
    d = lambda s: np.sqrt(2 - 2 * s)  # noqa: E731
    # floors: window 0 0.60, window 1 0.80, window 2 0.70
    mean = {1: d(0.98) + d(0.80) + d(0.70), 2: d(0.60) + d(0.80) + d(0.70), 3: d(0.60) + d(0.90) + d(0.70)}
    assert sorted(mean, key=mean.get) == [1, 3, 2]
    assert shortlisted(sims, found, 2, "mean-min").tolist() == [1, 3]
    assert shortlisted(sims, found, 1, "min").tolist() == [1]  # 0.98 is the single nearest pair
    assert shortlisted(sims, found, 3, "mean-min").tolist() == [1, 2, 3]  # no more than kept: all, sorted
    assert shortlisted(sims, found, None, "mean-min").tolist() == [1, 2, 3]
    # A window that found nothing puts every image at the farthest (sim -1) for it.
    nothing = np.full((1, 2), -1)
    assert shortlisted(np.vstack([sims, [[-np.inf, -np.inf]]]), np.vstack([found, nothing]), 2, "mean-min").tolist() \
        == [1, 3]


@pytest.mark.parametrize("shortlist, scored", [(None, 12), (0, 12), (3, 3), (1, 1)])
def test_the_kernel_scores_the_shortlist_of_the_nominated_images(ivf_index, monkeypatch, shortlist, scored):
    """Every window asked for (8 of 8 lists, 60 windows) nominates all 12 images; the
    kernel scores `shortlist` of them (default max(20k, 200): all 12; 0: all), and a
    query that is an indexed image still finds itself first, at distance near 0."""
    index, paths = ivf_index
    pools: list[int] = []
    original = search.pool_distances

    def counted(queries, view, pool_list, aggregate):
        pools.extend(len(p) for p in pool_list)
        return original(queries, view, pool_list, aggregate)

    monkeypatch.setattr(search, "pool_distances", counted)
    with Index.open(index) as idx:
        results = idx.search(paths[:4], k=3, exact_limit=0, nprobe=8, per_patch=60, shortlist=shortlist, rerank=False)
    assert pools == [scored] * 4
    # (near 0: the stored windows are float16)
    assert [r.hits[0].path for r in results] == paths[:4] and all(r.hits[0].distance < 0.02 for r in results)


def test_a_bad_shortlist_is_refused_by_the_command_line_naming_the_flag(ivf_index):
    index, paths = ivf_index
    out = run_cli("query", str(index), paths[0], "--shortlist", "-1", "--json", "--quiet")
    assert out.returncode == 2 and "--shortlist must be a whole number >= 0 (got -1)" in out.stderr and out.stdout == ""
    out = run_cli("query", str(index), paths[0], "--shortlist", "2", "--exact-limit", "0", "-k", "2", "--json", "--quiet")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["results"][0]["hits"][0]["path"] == paths[0]


@pytest.mark.parametrize("windows, lists, probes", [
    (60, 8, NPROBE),                      # the test index: short lists
    (3_000_000, 4096, NPROBE),            # 100,000 images: lists of 730 windows
    (30_000_000, 8192, 16),               # 1,000,000 images: lists of 3,700, one list in 512
    (20_000_000, 8192, 21),               # between: enough lists for NPROBE_WINDOWS
    (30_000_000, 2048, NPROBE_MIN),       # 1,000,000 images in the earlier structure: 8, as it had
])
def test_the_default_nprobe_follows_the_length_of_the_lists(windows, lists, probes):
    """32 lists while 32 hold at most NPROBE_WINDOWS windows, then fewer, never below 8
    nor one list in 512; a structure without lists has none."""
    ivf = VectorIndex(8, f"IVF{lists},Flat")
    assert ivf.is_trained is False
    ivf.index.ntotal = windows  # the list count and the windows are all the rule reads
    assert ivf.default_nprobe == probes
    assert VectorIndex(8, "HNSW8").default_nprobe is None


@pytest.mark.parametrize("rows", [2000 * 32, 2000 * 32 + 7])  # whole code blocks, and a last one part full
def test_a_flat_fast_scan_structure_searches_its_codes_in_parts_made_or_loaded(tmp_path, rows, monkeypatch):
    """The layout index's kind of structure (flat fast-scan PQ) is searched in one part
    per thread, also once read back from its file, with the distances of the whole
    structure and, among them, its ids (ties may come in another order); after an add,
    the parts hold the new codes too."""
    from retrieval.engine import split_scan

    monkeypatch.setattr(split_scan, "MIN_BLOCKS_PER_PART", 16)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, 16)).astype(np.float32)
    ids = rng.permutation(10 * rows)[:rows].astype(np.int64)  # ids unlike the rows' order
    made = VectorIndex(16, "PQ8x4fs")
    made.train(x[:4000])
    made.add(x, ids)
    made.save(tmp_path / "pq.faiss")
    loaded = VectorIndex.load(tmp_path / "pq.faiss", "PQ8x4fs")
    queries = rng.standard_normal((9, 16)).astype(np.float32)
    whole = loaded.index.search(queries, 50)
    monkeypatch.setattr(ann, "default_threads", lambda: 3)
    for structure in (made, loaded):
        structure.prepare()
        assert isinstance(structure._on_cpu, split_scan.SplitScan) and len(structure._on_cpu.parts) == 3
        assert sum(part.ntotal for _, part in structure._on_cpu.parts) == rows
        for n in (1, 9):
            dist, found = structure.search(queries[:n], 50)
            np.testing.assert_array_equal(dist, whole[0][:n])
            for row, (d, f) in enumerate(zip(dist, found)):
                for value in np.unique(d[d > d[-1]]):  # the same ids at each distance above the last
                    assert set(f[d == value]) == set(whole[1][row][whole[0][row] == value])
    extra = rng.standard_normal((64, 16)).astype(np.float32)
    loaded.add(extra, np.arange(64) + 10 * rows)
    dist, _ = loaded.search(queries, 50)
    np.testing.assert_array_equal(dist, loaded.index.search(queries, 50)[0])
    assert sum(part.ntotal for _, part in loaded._on_cpu.parts) == rows + 64


_FORKED: dict = {}  # what a forked child finds in its copy of the parent's memory


def _search_the_forked_structure(queries):
    return _FORKED["structure"].search(queries, 5)


def _search_in_a_forked_child(structure, queries):
    import multiprocessing

    _FORKED["structure"] = structure
    try:
        with multiprocessing.get_context("fork").Pool(1) as pool:
            return pool.apply_async(_search_the_forked_structure, (queries,)).get(timeout=30)
    finally:
        _FORKED.clear()


def _splittable_structure(monkeypatch, seed: int):
    """A flat fast-scan structure of 64 code blocks that splits into up to 4 parts."""
    from retrieval.engine import split_scan

    monkeypatch.setattr(split_scan, "MIN_BLOCKS_PER_PART", 16)
    x = np.random.default_rng(seed).standard_normal((64 * 32, 16)).astype(np.float32)
    structure = VectorIndex(16, "PQ8x4fs")
    structure.train(x)
    structure.add(x, np.arange(len(x)))
    return structure, x


def test_a_structure_searched_in_parts_still_searches_in_a_forked_child(monkeypatch):
    """The threads that scan the parts are not inherited by a forked process: a child
    that searches makes its own (the parent's would never answer)."""
    from retrieval.engine import split_scan

    structure, x = _splittable_structure(monkeypatch, seed=1)
    monkeypatch.setattr(ann, "default_threads", lambda: 2)
    expected = structure.search(x[:3], 5)  # the parent's scan threads now exist
    assert isinstance(structure._on_cpu, split_scan.SplitScan)
    found = _search_in_a_forked_child(structure, x[:3])
    np.testing.assert_array_equal(found[0], expected[0])


def test_the_parts_follow_the_process_threads_not_the_calling_threads_own(monkeypatch):
    """A thread that set its own OpenMP threads to 1 (as threadpoolctl's BLAS limit does
    once FAISS is loaded, through FAISS's OpenMP OpenBLAS) and searches first still makes
    one part per thread of the process: the parts are shared by every thread."""
    from retrieval.engine import split_scan

    threads = split_scan.default_threads()
    if threads < 2:
        pytest.skip(f"FAISS has {threads} OpenMP thread here; the split needs 2")
    structure, _ = _splittable_structure(monkeypatch, seed=2)
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        structure.prepare()
    finally:
        faiss.omp_set_num_threads(before)
    assert isinstance(structure._on_cpu, split_scan.SplitScan)
    assert len(structure._on_cpu.parts) == min(threads, 4)


def test_a_search_without_nprobe_probes_the_structure_default(ivf_index, monkeypatch):
    """Index.search with no nprobe hands FAISS the structure's default; a given one wins."""
    index, paths = ivf_index
    seen: list[int] = []
    original = faiss.SearchParametersIVF

    def recording(*args, **kwargs):
        seen.append(kwargs.get("nprobe"))
        return original(*args, **kwargs)

    monkeypatch.setattr(faiss, "SearchParametersIVF", recording)
    with Index.open(index) as idx:
        idx.search(paths[:1], k=3, exact_limit=0)
        idx.search(paths[:1], k=3, exact_limit=0, nprobe=3)
        default = idx.view().ann.default_nprobe
    assert seen == [default, 3] and default == NPROBE


def test_query_profile_reports_each_settings_pool_stages_and_recall(ivf_index, tmp_path):
    """benchmarks/query_profile.py on the IVF index: every window asked for (8 of 8 lists,
    60 windows each) scores all 12 images and finds the exact top 3; one list and one
    window per query window scores fewer; the engine's functions are unwrapped after."""
    index, paths = ivf_index
    spec = importlib.util.spec_from_file_location("query_profile", ROOT / "benchmarks" / "query_profile.py")
    profile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile)
    out = tmp_path / "profile.json"
    searched = VectorIndex.search
    assert profile.main([str(index), str(Path(paths[0]).parent), "-k", "3", "--groups", "4",
                         "--grid", "8:60:0,1:1:0", "--json", str(out)]) == 0
    wide, narrow = json.loads(out.read_text())["rows"]
    assert (wide["pool_mean"], wide["recall@3"], wide["per_patch"]) == (12, 1.0, 60)
    assert narrow["pool_mean"] < 12 and 0 <= narrow["recall@3"] <= 1 and 0 <= wide["N-S"] <= 4
    assert set(wide["stages_ms"]) == set(profile.STAGES) and wide["stages_ms"]["kernel"] > 0
    assert VectorIndex.search is searched


def test_a_structure_with_its_list_centroids_in_a_graph_searches_through_the_index(ivf_index, tmp_path):
    """`--index-type IVF<n>_HNSW<m>,...` (the setting documented for a service at
    1,000,000 images): trained with the IVF list count alone, searched with nprobe per
    call, read back from its file; probing every list it ranks as exact scoring does."""
    import shutil

    root, paths = ivf_index
    copy = tmp_path / "idx"
    shutil.copytree(root, copy)
    with Index.open(copy) as idx:
        idx.set_index_type("IVF8_HNSW4,Flat")
        assert idx.info()["index_type"] == "IVF8_HNSW4,Flat"
    with Index.open(copy) as idx:
        assert idx.info()["structure"]["search"] == "candidates"
        every_list = idx.search(paths, k=3, exact_limit=0, nprobe=8, per_patch=60, shortlist=0)
        exact = idx.search(paths, k=3, exact_limit=10_000)
        assert [[h.id for h in r.hits] for r in every_list] == [[h.id for h in r.hits] for r in exact]
        assert all(r.hits[0].path == p for r, p in zip(idx.search(paths, k=1, exact_limit=0, nprobe=1), paths))
