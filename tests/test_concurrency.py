"""One `Index` shared by many threads (issue 24): concurrent searches get exactly the
sequential answers, searches beside a writer thread answer from published states, and
the `SearchBatcher` gives each caller its own result."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, make_scene
from retrieval import (ExtractorConfig, Index, InputSpec, QueryResult, RuntimeConfig, SearchBatcher, SearchConfig,
                       SearchOptions)
from retrieval.engine import batcher as batcher_module
from retrieval.engine.index import IndexUsageError

CONFIG = ExtractorConfig(backbone="resnet18", weights="none", input_spec=InputSpec(size=(64, 64)))
SEARCH = SearchConfig(levels=(1, 2), pca_dim=16)
# Exact scoring of every image, re-ranked as by default (16 whitened images with lists), and
# FAISS candidates (IVF, exact_limit 0) scored by the kernel, in the plain ranking.
EXACT = SearchOptions(k=5)
FAISS = SearchOptions(k=5, exact_limit=0, nprobe=2, per_patch=3, rerank=False)
DEFAULT_POOLS = SearchOptions(k=5, exact_limit=0, rerank=False)  # FAISS candidates with the default pool settings


def _scenes(folder, seeds) -> list[str]:
    folder.mkdir(exist_ok=True)
    paths = []
    for s in seeds:
        make_scene(s, size=(96, 72)).save(folder / f"s{s:03d}.jpg", quality=90)
        paths.append(str(folder / f"s{s:03d}.jpg"))
    return paths


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """16 scenes behind an 8-list IVF structure; 50 more scenes described in its store."""
    root = tmp_path_factory.mktemp("shared")
    paths = _scenes(root / "images", range(16))
    with Index.create(root / "idx", CONFIG, SEARCH, store=root / "s.sqlite", index_type="IVF8,Flat",
                      runtime=RuntimeConfig(batch_size=32)) as idx:
        idx.add(paths, progress=False)
    return root, paths


def _key(result):
    return result.query, result.error, [(h.id, h.distance, h.rerank_distance, h.query_box, h.db_box) for h in result.hits]


def test_eight_threads_get_exactly_the_sequential_answers(shared):
    """8 threads x 50 searches on one Index opened in the main thread (half straight,
    half through a SearchBatcher; exact, narrow FAISS and default FAISS options) return
    the sequential results."""
    root, paths = shared
    mix = (EXACT, FAISS, DEFAULT_POOLS)
    with Index.open(root / "idx") as idx:
        plan = [(paths[(t * 7 + i) % len(paths)], mix[(t + i) % 3]) for t in range(8) for i in range(50)]
        expected = {(q, o): _key(idx.search([q], options=o)[0]) for q in paths for o in mix}
        # The two options answer differently, so a mix-up between callers would show.
        assert any(expected[(q, EXACT)] != expected[(q, FAISS)] for q in paths)
        got: dict[int, list] = {t: [] for t in range(8)}
        errors: list[BaseException] = []
        start = threading.Barrier(8)
        with SearchBatcher(idx, wait_s=0.005) as batcher:
            def work(t: int) -> None:
                start.wait()
                try:
                    for i in range(50):
                        q, o = plan[t * 50 + i]
                        result = batcher.search(q, options=o) if i % 2 else idx.search([q], options=o)[0]
                        got[t].append(_key(result))
                except BaseException as err:  # noqa: BLE001 - reported below
                    errors.append(err)

            threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert max(batcher.batches) > 1  # concurrent queries were answered together
        assert not errors, errors
        for t in range(8):
            assert got[t] == [expected[step] for step in plan[t * 50:(t + 1) * 50]]


def test_searches_beside_a_writer_thread_answer_from_published_states(shared, tmp_path):
    """Threads search while another thread of the process adds 50 images and removes 10:
    no error, and every answer (all images: k above the collection, exact scoring or
    exhaustive FAISS candidates) is the image set of one published state."""
    root, paths = shared
    more = _scenes(tmp_path / "more", range(100, 150))
    index_dir = tmp_path / "idx"
    with Index.create(index_dir, CONFIG, SEARCH, store=root / "s.sqlite", index_type="IVF8,Flat",
                      runtime=RuntimeConfig(batch_size=32)) as idx:
        idx.add(paths, progress=False)
        before = {e.id for e in idx.manifest.entries()}
    everything = [SearchOptions(k=1000), SearchOptions(k=1000, exact_limit=0, nprobe=8, per_patch=1000)]
    with Index.open(index_dir) as idx:
        idx.search(paths[:1])  # the view in place before the writer starts
        done = threading.Event()
        seen: list[frozenset] = []
        errors: list[BaseException] = []

        def write() -> None:
            try:
                idx.add(more, progress=False)
                idx.remove(more[:10])
            except BaseException as err:  # noqa: BLE001 - reported below
                errors.append(err)
            finally:
                done.set()

        def read(t: int) -> None:
            try:
                i = 0
                while not done.is_set() or i < 4:
                    result = idx.search([paths[(t + i) % len(paths)]], options=everything[(t + i) % 2])[0]
                    seen.append(frozenset(h.id for h in result.hits))
                    i += 1
            except BaseException as err:  # noqa: BLE001 - reported below
                errors.append(err)

        threads = [threading.Thread(target=write)] + [threading.Thread(target=read, args=(t,)) for t in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        ids = {e.path: e.id for e in idx.manifest.entries()}
    added = {i for p, i in ids.items() if p in more[10:]}
    removed = set(range(max(before) + 1, max(before) + 11))
    published = {frozenset(before), frozenset(before | added | removed), frozenset(before | added)}
    assert set(seen) <= published, [sorted(s - before) for s in set(seen) - published]
    assert frozenset(before | added) in seen  # the readers saw the writer's last state


def test_batcher_gives_each_caller_its_own_result_also_beside_an_unreadable_query(shared, tmp_path):
    """Six callers in one batch (five images, one unreadable file): each gets what a search
    of its query alone gives, the unreadable one its reason; a bad option fails only the
    callers that asked for it."""
    root, paths = shared
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    queries = [paths[3], paths[0], str(broken), paths[3], (paths[5], (10.0, 10.0, 80.0, 60.0)), paths[9]]
    options = [EXACT, FAISS, EXACT, FAISS, EXACT, SearchOptions(k=2)]
    with Index.open(root / "idx") as idx:
        alone = [_key(idx.search([q], options=o)[0]) for q, o in zip(queries, options)]
        assert alone[2][1] and not alone[2][2]  # the unreadable query: a reason, no hits
        # max_batch = the callers, and a long wait: the six are answered as one batch.
        with SearchBatcher(idx, wait_s=60, max_batch=len(queries)) as batcher:
            futures = [batcher.submit(q, o) for q, o in zip(queries, options)]
            assert [_key(f.result(timeout=120)) for f in futures] == alone
            assert list(batcher.batches) == [len(queries)]
        with SearchBatcher(idx, wait_s=60, max_batch=2) as batcher:
            bad, good = batcher.submit(paths[1], SearchOptions(dba=50)), batcher.submit(paths[1], EXACT)
            with pytest.raises(IndexUsageError, match="retrieval dba"):
                bad.result(timeout=120)
            assert _key(good.result(timeout=120)) == _key(idx.search([paths[1]], options=EXACT)[0])
        with pytest.raises(RuntimeError, match="closed"):
            batcher.submit(paths[1])


class _SlowIndex:
    """A stand-in index whose every search takes `seconds`, plus `per_query` seconds per
    query asked: what the batcher sees."""

    def __init__(self, seconds: float, per_query: float = 0.0) -> None:
        self.seconds, self.per_query = seconds, per_query

    def search(self, queries, *, options):
        time.sleep(self.seconds + self.per_query * len(queries))
        return [QueryResult(query=str(q), hits=[]) for q in queries]


def _callers(batcher: SearchBatcher, starts: list[float], pauses: list[float], queries: int = 3) -> list[int]:
    """Closed-loop callers of `batcher`, caller c starting after starts[c] seconds and
    asking again pauses[c] seconds after each answer; the sizes of the batches."""

    def client(c: int) -> None:
        time.sleep(starts[c])
        for i in range(queries):
            batcher.search(f"q{c}-{i}.jpg")
            time.sleep(pauses[c])

    threads = [threading.Thread(target=client, args=(c,)) for c in range(len(starts))]
    with batcher:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    return list(batcher.batches)


def test_callers_of_an_answered_batch_join_the_queries_that_waited_during_it():
    """Eight closed-loop callers, four of them starting while the first batch runs: the
    next batch waits `wait_s` for the first four to ask again and takes all eight, where
    answering the four that waited at once split the callers into two half batches for
    good."""
    batcher = SearchBatcher(_SlowIndex(0.3), wait_s=0.1, max_batch=8)
    assert _callers(batcher, [0.0] * 4 + [0.15] * 4, [0.0] * 8) == [4, 8, 8, 4]
    # The first batch (nothing known yet) and the last (four callers gone) waited out
    # wait_s; the full ones left as soon as all eight callers were in.
    assert batcher.waited_out == 2


def test_a_lone_caller_waits_for_nobody_after_its_first_query():
    """One caller asking again and again: once a batch has shown that nobody else asks,
    its queries are answered at once instead of each waiting `wait_s` for company that
    never comes (the old batcher waited out all five)."""
    with SearchBatcher(_SlowIndex(0.0), wait_s=0.2, max_batch=8) as batcher:
        answers = [batcher.search(f"q{i}.jpg").query for i in range(5)]
    assert answers == [f"q{i}.jpg" for i in range(5)]
    assert list(batcher.batches) == [1] * 5
    assert batcher.waited_out == 1  # the first query only


def test_callers_slower_to_ask_again_than_wait_s_are_waited_for_a_share_of_the_batch_time():
    """Eight closed-loop callers coming back 20 to 195 ms after their answer (as HTTP
    clients do through a server's event loop, one response and one request at a time):
    waiting only `wait_s` (100 ms) splits them into small batches; waiting up to
    `wait_fraction` of a batch's time (here all of its 350 ms) gathers all eight again.
    (wait_s also gathers the first batch however slowly the threads start under load.)"""
    pauses = [0.02 + 0.025 * c for c in range(8)]
    gathered = SearchBatcher(_SlowIndex(0.35), wait_s=0.1, max_batch=8, wait_fraction=1.0)
    assert _callers(gathered, [0.0] * 8, pauses, queries=2) == [8, 8]
    split = _callers(SearchBatcher(_SlowIndex(0.35), wait_s=0.1, max_batch=8, wait_fraction=0.0),
                     [0.0] * 8, pauses, queries=2)
    assert sum(split) == 16 and len(split) > 2  # short batches: the late callers missed theirs


def test_after_a_half_batch_the_wait_is_a_share_of_a_whole_batch():
    """Four callers start, four more while their batch (0.4 s) runs; each caller asks again
    300 ms after its answer. Half of the half batch's own time (200 ms) would miss the
    first four and keep the callers in two half batches taking turns; half of what the
    eight expected queries take (400 ms) brings them together. (wait_s, 100 ms, gathers the
    first four however slowly their threads start under load.)"""
    batcher = SearchBatcher(_SlowIndex(0.0, per_query=0.1), wait_s=0.1, max_batch=8, wait_fraction=0.5)
    assert _callers(batcher, [0.0] * 4 + [0.3] * 4, [0.3] * 8) == [4, 8, 8, 4]


def test_concurrency_benchmark_open_loop_rows_answer_every_arrival(shared, tmp_path):
    """benchmarks/concurrency.py --open-rates: queries arriving at random go to one
    SearchBatcher per wait fraction; every arrival is answered, exactly as alone."""
    root, _ = shared
    out = tmp_path / "open.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "concurrency.py"), str(root / "idx"),
                           str(root / "images"), "--threads", "", "--open-rates", "30", "--wait-fractions", "0,0.1",
                           "--seconds", "1.5", "--recall-queries", "0", "-k", "5", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["mode"], r["offered_qps"], r["wait_fraction"]) for r in rows] == [("open", 30.0, 0.0), ("open", 30.0, 0.1)]
    for r in rows:
        assert r["queries"] > 10 and r["errors"] == [] and r["differ_from_sequential"] == 0, r
        assert r["p50_ms"] <= r["p99_ms"] and r["mean_batch"] >= 1


def test_concurrency_benchmark_refuses_a_bad_rate():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "concurrency.py"), "IDX", "QUERIES",
                           "--open-rates", "fast"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and "--open-rates and --wait-fractions take numbers" in proc.stderr, proc.stderr


def _bursts_then_singles(batcher: SearchBatcher, cycles: int) -> list[float]:
    """Open-loop callers that never ask again: per cycle, 4 queries at once, then one more
    450 ms after their answer (and 450 ms before the next 4); the singles' latencies."""
    latencies = []
    with batcher:
        for c in range(cycles):
            for f in [batcher.submit(f"b{c}-{i}.jpg") for i in range(4)]:
                f.result()
            time.sleep(0.45)
            t = time.perf_counter()
            batcher.search(f"s{c}.jpg")
            latencies.append(time.perf_counter() - t)
            time.sleep(0.45)
    return latencies


def test_callers_that_never_come_back_are_no_longer_waited_for(monkeypatch):
    """After a batch of 4 whose callers never ask again, a lone query would wait up to
    `wait_fraction` of a 4-query batch's time (100 ms here) for them before its own 200 ms
    batch: independent users of a service paid that in latency (benchmarks/results/
    concurrency.md, "Callers that do not come back"). Once batches show that their
    callers do not return, the lone query goes at once."""
    make = lambda: SearchBatcher(_SlowIndex(0.2), wait_s=0.002, max_batch=8, wait_fraction=0.5)  # noqa: E731
    batcher = make()
    singles = _bursts_then_singles(batcher, 5)
    assert batcher.return_share < batcher_module.RETURN_SHARE
    assert singles[0] > 0.25 and max(singles[3:]) < 0.25, singles
    monkeypatch.setattr(batcher_module, "RETURN_WEIGHT", 0.0)  # the old rule: callers always expected back
    assert min(_bursts_then_singles(make(), 3)) > 0.25


def _concurrency_script():
    spec = importlib.util.spec_from_file_location("concurrency_bench", ROOT / "benchmarks" / "concurrency.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_memoized_window_search_gives_the_same_answers_without_searching_again(shared, monkeypatch):
    """benchmarks/concurrency.py --memo-faiss windows (the bound with the window search
    free): once a query's windows were searched, FAISS is not asked again for them, the
    answers stay the same, and leaving restores the real search."""
    from retrieval.engine import ann

    root, paths = shared
    asked = []
    real = ann.VectorIndex.search
    monkeypatch.setattr(ann.VectorIndex, "search",
                        lambda self, queries, k, nprobe=None: asked.append(len(queries)) or real(self, queries, k, nprobe))
    with Index.open(root / "idx") as idx:
        plain = [_key(r) for r in idx.search(paths[:3], options=FAISS)]
        asked.clear()
        with _concurrency_script().memoize_faiss({"windows"}) as memo:
            first = [_key(r) for r in idx.search(paths[:3], options=FAISS)]
            searched = len(asked)
            again = [_key(r) for r in idx.search(paths[:3], options=FAISS)]
        assert searched == 1 and len(asked) == 1 and len(memo) > 0
        assert first == plain and again == plain
        idx.search(paths[:1], options=FAISS)
        assert len(asked) == 2  # the real search is back
