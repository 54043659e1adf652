"""Issue 11: extraction on a Ray cluster (`--ray`) and the sharded index (`retrieval split`,
`ShardedIndex`), on one local Ray cluster started by this module (ray.init(num_cpus=2)).
The CLI runs join it by address, as a user's commands join a cluster made by `ray start`."""
from __future__ import annotations

import json
import os
import random
import select
import shutil
import signal
import sqlite3
import sys
import threading

import numpy as np
import pytest

from retrieval import ExtractorConfig, Index, InputSpec, RuntimeConfig, SearchConfig
from retrieval.cli import app as cli
from retrieval.engine.sharded import ShardedIndex, split_index

from conftest import TINY_FLAGS, kill_at_pause, make_scene, manifest_count, run_cli

CONFIG = ExtractorConfig(backbone="resnet18", weights="none", input_spec=InputSpec(size=(64, 64)))
SEARCH = SearchConfig(levels=(1, 2), pca_dim=16)

try:
    import ray
    import ray.data  # noqa: F401
except ImportError:
    ray = None
needs_ray = pytest.mark.skipif(ray is None, reason="Ray is not installed (pip install 'retrieval[ray]')")


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module (starting one takes seconds): its address."""
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=512 * 2**20, logging_level="WARNING")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _scenes(folder, n, start=300):
    folder.mkdir(exist_ok=True)
    for i in range(n):
        make_scene(start + i, size=(96, 72)).save(folder / f"s{start + i:04d}.jpg")
    return sorted(str(p) for p in folder.iterdir())


def _descriptors(store) -> dict:
    with sqlite3.connect(store) as conn:
        rows = conn.execute("SELECT digest, region, data, dtype FROM descriptors").fetchall()
    return {(d, r): np.frombuffer(b, dtype=t).astype(np.float32) for d, r, b, t in rows}


def _top(results) -> list:
    return [[(h.id, h.path, h.distance, h.query_box, h.db_box) for h in r.hits] for r in results]


# -- usage errors (no cluster needed) --------------------------------------------------------
def test_ray_flag_without_ray_is_a_usage_error_naming_the_extra(tmp_path, image_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    idx = tmp_path / "idx"
    code = cli.main(["build", str(idx), str(image_dir), *TINY_FLAGS, "--store", str(tmp_path / "s.sqlite"), "--ray"])
    assert code == 2
    assert "pip install 'retrieval[ray]'" in capsys.readouterr().err
    assert not idx.exists() and not (tmp_path / "s.sqlite").exists()


def test_bad_ray_address_and_bad_shard_count_are_usage_errors(tmp_path, image_dir, store_env):
    idx = tmp_path / "idx"
    out = run_cli("build", str(idx), str(image_dir), *TINY_FLAGS, "--ray", "nonsense")
    assert out.returncode == 2 and "--ray takes local, auto or a cluster address" in out.stderr
    assert not idx.exists()
    assert run_cli("build", str(idx), str(image_dir), *TINY_FLAGS).returncode == 0
    out = run_cli("split", str(idx), str(tmp_path / "sh"), "--shards", "7")
    assert out.returncode == 2 and "fewer than --shards 7" in out.stderr and not (tmp_path / "sh").exists()
    commands = cli.build_parser()._subparsers._group_actions[0].choices
    for name in ("build", "add", "query"):
        assert "--ray" in commands[name].format_help()
    from classify import cli as classify_cli

    commands = classify_cli.build_parser()._subparsers._group_actions[0].choices
    assert all("--ray" in commands[name].format_help() for name in ("run", "train", "eval", "predict"))


# -- extraction on Ray ---------------------------------------------------------------------
@needs_ray
def test_ray_build_equals_local_build_and_skips_bad_inputs_alike(tmp_path, cluster):
    folder = tmp_path / "imgs"
    paths = _scenes(folder, 10)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image")
    (folder / "cut.jpg").write_bytes(open(paths[0], "rb").read()[:300])
    runs = {}
    for mode in ("local", "ray"):
        extra = ["--ray", cluster] if mode == "ray" else []
        out = run_cli("build", str(tmp_path / mode), str(folder), *TINY_FLAGS, "--json",
                      "--store", str(tmp_path / f"{mode}.sqlite"), *extra)
        assert out.returncode == 3, out.stderr  # done, some inputs skipped
        runs[mode] = json.loads(out.stdout)
    local, distributed = runs["local"], runs["ray"]
    assert (distributed["added"], distributed["images"]) == (local["added"], local["images"]) == (10, 10)
    assert sorted(map(tuple, (s.values() for s in distributed["skipped"]))) == \
        sorted(map(tuple, (s.values() for s in local["skipped"])))
    assert {os.path.basename(s["path"]) for s in distributed["skipped"]} == {"empty.jpg", "text.jpg", "cut.jpg"}
    # Nothing half-added: only the ten readable images are in the store and the manifest.
    a, b = _descriptors(tmp_path / "local.sqlite"), _descriptors(tmp_path / "ray.sqlite")
    assert a.keys() == b.keys() and len({d for d, _ in b}) == 10
    worst = max(float(np.abs(a[key] - b[key]).max() / np.abs(a[key]).max()) for key in a)
    assert worst <= 1e-6
    with Index.open(tmp_path / "local") as plain, Index.open(tmp_path / "ray") as distributed_index:
        assert _top(distributed_index.search(paths[:4], k=5)) == _top(plain.search(paths[:4], k=5))


@needs_ray
def test_classify_vectors_on_ray_equal_local_ones(tmp_path, cluster):
    """classify's 12-crop jitter (mirrored windows) through the Ray path."""
    from classify.features import image_vectors
    from retrieval import FeatureStore
    from retrieval.extraction.factory import make_extractor

    paths = _scenes(tmp_path / "imgs", 3)
    tables = []
    for name, runtime in (("local", RuntimeConfig(batch_size=16)), ("ray", RuntimeConfig(batch_size=16, ray=cluster))):
        with FeatureStore.open(tmp_path / f"{name}.sqlite") as store:
            tables.append(image_vectors(paths, make_extractor(CONFIG, runtime), store, 12, progress=False))
    assert tables[0].extracted == tables[1].extracted == 3
    for path in paths:
        np.testing.assert_array_equal(tables[0].vectors[path], tables[1].vectors[path])


def _dispatched(monkeypatch) -> list[str]:
    """Record the images each RayExtractor.extract call sends to the cluster."""
    from retrieval.extraction import distributed

    sent: list[str] = []
    original = distributed.RayExtractor.extract

    def spy(self, jobs, **kw):
        jobs = list(jobs)
        sent.extend(job.path for job in jobs)
        return original(self, jobs, **kw)

    monkeypatch.setattr(distributed.RayExtractor, "extract", spy)
    return sent


@needs_ray
def test_ray_build_killed_then_rerun_completes_without_reextracting(tmp_path, cluster, monkeypatch):
    folder = tmp_path / "imgs"
    paths = _scenes(folder, 40)
    idx, store = tmp_path / "idx", tmp_path / "s.sqlite"
    seed = int(os.environ.get("RETRIEVAL_TEST_SEED", "20261203"))
    kill_after = random.Random(seed).randint(1, 8)
    print(f"seed {seed}: killed after image {kill_after} is committed")
    kill_at_pause([sys.executable, "-m", "retrieval.cli", "build", str(idx), str(folder), *TINY_FLAGS,
                   "--store", str(store), "--ray", cluster], "committed", kill_after, tmp_path)
    assert manifest_count(idx) == kill_after
    stored = {d for d, _ in _descriptors(store)}
    assert kill_after <= len(stored) < 40, "the build finished before it was killed"
    sent = _dispatched(monkeypatch)
    with Index.create(idx, CONFIG, SEARCH, store=store, runtime=RuntimeConfig(batch_size=16, ray=cluster)) as index:
        report = index.add(paths, progress=False)
        assert report.images == 40 and index.manifest.count() == 40
        top = index.search(paths[:3], k=1)
    from retrieval.config import file_digest

    assert report.added == 40 - kill_after and report.already_present == kill_after
    assert len(sent) == 40 - len(stored) and not {file_digest(p) for p in sent} & stored
    assert [r.hits[0].path for r in top] == paths[:3]


def _describer_pids() -> list[int]:
    """The extraction actors of this process's Ray job (not those of an earlier driver)."""
    from ray._private import state

    job = ray.get_runtime_context().get_job_id()
    return [a["Pid"] for a in state.actors().values()
            if "_Describer" in str(a.get("ActorClassName")) and a.get("State") == "ALIVE"
            and a.get("JobID") == job and a.get("Pid")]


@needs_ray
def test_worker_killed_mid_build_still_adds_every_image(tmp_path, cluster, monkeypatch):
    """An extraction actor is killed while the add is held right after its kill_after-th
    image is committed (the pause hook, retrieval/engine/pause.py), then the add goes on."""
    from retrieval.engine import pause

    paths = _scenes(tmp_path / "imgs", 48)
    seed = int(os.environ.get("RETRIEVAL_TEST_SEED", "20261203"))
    kill_after = random.Random(seed + 1).randint(1, 8)
    print(f"seed {seed}: a worker killed after image {kill_after} is committed")
    fifo = tmp_path / "pause"
    os.mkfifo(fifo)
    monkeypatch.setattr(pause, "_reached", {})
    monkeypatch.setenv(pause.ENV, f"committed:{kill_after}:{fifo}")
    fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # the reader the hook writes to
    index = Index.create(tmp_path / "idx", CONFIG, SEARCH, store=tmp_path / "s.sqlite",
                         runtime=RuntimeConfig(batch_size=16, ray=cluster))
    killed: list[tuple] = []

    def kill_a_worker() -> None:
        try:
            if select.select([fd], [], [], 240)[0]:  # the add is held at the pause
                line = os.read(fd, 256).decode()
                pids = _describer_pids()
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append((line, manifest_count(index.path)))
        finally:
            os.close(fd)  # lets the add go on

    killer = threading.Thread(target=kill_a_worker)
    killer.start()
    try:
        report = index.add(paths, progress=False)
    finally:
        killer.join()
    with index:
        assert killed == [(f"committed {kill_after} {os.getpid()}\n", kill_after)], "no worker was killed there"
        assert (report.added, report.images, report.skipped) == (48, 48, [])
        assert [r.hits[0].path for r in index.search(paths[::12], k=1)] == paths[::12]


# -- the sharded index -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sharded_pair(tmp_path_factory):
    """An index of 36 images, its 3 shards, and 20 queries (12 indexed images, 8 new ones)."""
    base = tmp_path_factory.mktemp("shards")
    paths = _scenes(base / "imgs", 36)
    queries = paths[::3] + _scenes(base / "queries", 8, start=900)
    with Index.create(base / "idx", CONFIG, SEARCH, store=base / "s.sqlite") as idx:
        idx.add(paths, progress=False)
        idx.remove(paths[5:7])  # tombstones and a hole in the ids must not matter
    split_index(base / "idx", base / "sh", 3).close()
    return base / "idx", base / "sh", queries


def test_three_shards_return_the_unsharded_top_k_in_threads(sharded_pair):
    whole, sharded, queries = sharded_pair
    with Index.open(whole) as idx, ShardedIndex.open(sharded) as shards:
        assert [s["images"] for s in shards.info()["shards"]] == [12, 11, 11]
        assert shards.warm(wait=True) > 0  # each shard reads its vectors ahead
        for k in (1, 10, None):
            assert _top(shards.search(queries, k=k)) == _top(idx.search(queries, k=k))
        # `split` carried the source's lists across the shards: adaptive re-ranking needs no
        # `retrieval dba` first, and re-ranks as the source does.
        reranked = shards.search(queries, k=3, rerank=True)
        want = idx.search(queries, k=3, rerank=True)
        assert [[h.id for h in r.hits] for r in reranked] == [[h.id for h in r.hits] for r in want]
        got = [h.rerank_distance for r in reranked for h in r.hits]
        assert None not in got and got == pytest.approx([h.rerank_distance for r in want for h in r.hits], abs=1e-5)
        # 34 whitened images with lists across the shards: re-ranked by default, as the source is.
        assert shards.info()["reranking"]["by_default"] is True and idx.info()["reranking"]["by_default"] is True
        default = shards.search(queries, k=3)
        assert [[(h.id, h.rerank_distance) for h in r.hits] for r in default] == \
            [[(h.id, h.rerank_distance) for h in r.hits] for r in reranked]
        assert len(shards.search(queries, k=None)[0].hits) == 34


def test_rotations_over_shards_give_the_unsharded_hits(sharded_pair):
    """Issue 23 row 18: each shard keeps an image's smallest distance over the rotations,
    so the merged top k is the unsharded one, each hit with the same deciding rotation."""
    whole, sharded, queries = sharded_pair
    with Index.open(whole) as idx, ShardedIndex.open(sharded) as shards:
        for k in (3, None):
            want = idx.search(queries[:6], k=k, query_rotations=(0, 90, 180))
            got = shards.search(queries[:6], k=k, query_rotations=(0, 90, 180))
            assert _top(got) == _top(want)
            assert [[h.rotation for h in r.hits] for r in got] == [[h.rotation for h in r.hits] for r in want]
            assert {h.rotation for r in got for h in r.hits} > {0}
        # "auto" picks each query's turn through the shards' merged level-1 search.
        want = idx.search(queries[:6], k=3, query_rotations="auto")
        got = shards.search(queries[:6], k=3, query_rotations="auto")
        assert _top(got) == _top(want)
        assert [[h.rotation for h in r.hits] for r in got] == [[h.rotation for h in r.hits] for r in want]


def test_query_expansion_over_shards_gives_the_unsharded_hits(sharded_pair):
    """Issue 23 row 18: the qe nearest images found over every shard, then every shard
    scored against the query and their windows: the unsharded index's hits (exact mode)."""
    whole, sharded, queries = sharded_pair
    with Index.open(whole) as idx, ShardedIndex.open(sharded) as shards:
        for k, more in ((3, {}), (None, {}), (5, {"query_rotations": (0, 90)})):
            want = idx.search(queries, k=k, qe=2, **more)
            assert _top(shards.search(queries, k=k, qe=2, **more)) == _top(want)
            assert _top(want) != _top(idx.search(queries, k=k, **more))  # expansion changed something


def test_dba_over_shards_gives_the_unsharded_hits(sharded_pair, tmp_path):
    """Issue 23 row 18: `retrieval dba SHARDED_DIR` computes lists across every shard (an
    image's neighbours may lie in another shard), and `--dba 3` (alone, with `--qe`, with
    rotations; adaptive re-ranking) over the shards gives the unsharded index's hits in
    exact mode."""
    from retrieval.engine.index import IndexUsageError

    whole, sharded, queries = sharded_pair
    whole, sharded = shutil.copytree(whole, tmp_path / "idx"), shutil.copytree(sharded, tmp_path / "sh")
    with Index.open(whole) as idx, ShardedIndex.open(sharded) as shards:
        # `split` carried the unsharded index's current lists (k = 10) over to the shards.
        assert _top(shards.search(queries, k=6, dba=3)) == _top(idx.search(queries, k=6, dba=3))
    with Index.open(sharded / "shard-1") as one:
        one.build_neighbours(4)  # lists of that shard's images among themselves
    with ShardedIndex.open(sharded) as shards, pytest.raises(IndexUsageError, match=f"retrieval dba {sharded}"):
        shards.search(queries[:1], dba=3)  # the lists a shard keeps of itself do not count
    out = run_cli("dba", str(sharded), "-k", "4", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["images"] == 34
    with Index.open(whole) as idx, ShardedIndex.open(sharded) as shards:
        idx.build_neighbours(4)
        want_lists, got_lists = idx.neighbours(4), shards.neighbours(4)
        np.testing.assert_array_equal(got_lists.ids, want_lists.ids)
        np.testing.assert_array_equal(got_lists.neighbours, want_lists.neighbours)
        np.testing.assert_allclose(got_lists.distances, want_lists.distances, atol=1e-6)
        assert (got_lists.neighbours[:12] > got_lists.ids[11]).any()  # shard 0's images name other shards'
        for options in ({"dba": 3}, {"dba": 3, "qe": 2}, {"dba": 3, "query_rotations": (0, 90)}, {"rerank": True}):
            want = idx.search(queries, k=6, **options)
            got = shards.search(queries, k=6, **options)
            assert [[h.id for h in r.hits] for r in got] == [[h.id for h in r.hits] for r in want]
            np.testing.assert_allclose([[h.distance for h in r.hits] for r in got],
                                       [[h.distance for h in r.hits] for r in want], atol=1e-5)
        assert _top(idx.search(queries, k=6, dba=3)) != _top(idx.search(queries, k=6))  # augmentation changed something


def test_serve_on_a_sharded_directory_answers_as_the_unsharded_index(sharded_pair):
    """Issue 23 row 18: `retrieval serve SHARDED_DIR`: info, lookup, an indexed query, an
    upload with rotations and a thumbnail, each as the server of the unsharded index has them."""
    pytest.importorskip("fastapi", reason="fastapi is not installed (pip install 'retrieval[serve]')")
    pytest.importorskip("multipart", reason="python-multipart is not installed (pip install 'retrieval[serve]')")
    from fastapi.testclient import TestClient

    from retrieval.serving.server import create_app

    whole, sharded, queries = sharded_pair
    answers = []
    for index in (whole, sharded):
        with TestClient(create_app(index), base_url="http://127.0.0.1") as client:
            info = client.get("/api/info").json()
            found = client.get("/api/lookup", params={"path": queries[4]}).json()
            by_id = client.post(f"/api/query/{found['id']}", data={"k": "5"}).json()
            upload = client.post("/api/query", files={"image": ("q.jpg", open(queries[-1], "rb").read(), "image/jpeg")},
                                 data={"k": "5", "query_rotations": "0,90"}).json()
            thumb = client.get(f"/api/images/{found['id']}/thumb")
            answers.append((info["images"], found, by_id, upload, thumb.status_code, thumb.content))
    assert answers[0][0] == 34 and answers[1] == answers[0]
    assert answers[1][2]["results"][0]["hits"][0]["path"] == queries[4]


def test_shards_with_another_whitening_and_changes_to_shards_are_refused(sharded_pair, tmp_path):
    _, sharded, _ = sharded_pair
    from retrieval.engine.index import IndexUsageError

    with Index.create(tmp_path / "other", CONFIG, SEARCH, store=tmp_path / "s.sqlite") as other:
        other.add(_scenes(tmp_path / "imgs", 4, start=700), progress=False)  # its own whitening
    with pytest.raises(IndexUsageError, match="another whitening"):
        ShardedIndex([sharded / "shard-0", tmp_path / "other"])
    out = run_cli("add", str(sharded / "shard-1"), str(tmp_path))
    assert out.returncode == 2 and "shard of a split index" in out.stderr
    out = run_cli("remove", str(sharded), str(tmp_path))
    assert out.returncode == 2 and "holds the shards of a split index" in out.stderr
    query = sharded_pair[2][0]
    out = run_cli("query", str(sharded), query, "-k", "3", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["results"][0]["hits"][0]["path"] == query


@needs_ray
def test_three_shards_on_ray_actors_match_and_survive_a_killed_actor(sharded_pair, cluster):
    whole, sharded, queries = sharded_pair
    with Index.open(whole) as idx, ShardedIndex.open(sharded, ray=cluster) as shards:
        want = _top(idx.search(queries, k=10))
        assert _top(shards.search(queries, k=10)) == want
        pids = shards.shard_pids()
        assert len(set(pids)) == 3 and os.getpid() not in pids
        os.kill(pids[1], signal.SIGKILL)
        assert _top(shards.search(queries, k=10)) == want  # restarted from its directory
        assert shards.shard_pids()[1] != pids[1]
    out = run_cli("query", str(sharded), *queries[:2], "-k", "5", "--json", "--ray", cluster)
    assert out.returncode == 0, out.stderr
    assert [[h[1] for h in r[:5]] for r in want[:2]] == \
        [[h["path"] for h in r["hits"]] for r in json.loads(out.stdout)["results"]]
