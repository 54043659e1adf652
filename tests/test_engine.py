"""The engine under `Index`: segments, tombstones, whitening policy, readers during writes,
self-healing, resumable builds (issue 8), through the public API and the real CLI."""
from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import numpy as np

from retrieval import ExtractorConfig, Index, InputSpec, RuntimeConfig, SearchConfig
from retrieval.engine.policy import WritePolicy
from retrieval.engine.snapshot import read_state

from conftest import manifest_count, SELF_DISTANCE, TINY_FLAGS, make_scene, run_cli

CONFIG = ExtractorConfig(backbone="resnet18", weights="none", input_spec=InputSpec(size=(64, 64)))
SEARCH = SearchConfig(levels=(1, 2), pca_dim=16)


def _scenes(folder, n, start=100):
    folder.mkdir(exist_ok=True)
    for i in range(n):
        make_scene(start + i, size=(96, 72)).save(folder / f"s{start + i:04d}.jpg")
    return sorted(str(p) for p in folder.iterdir())


def _ranking(results):
    return [[(h.path, round(h.distance, 4)) for h in r.hits] for r in results]


def _create(path, store, **kw):
    return Index.create(path, CONFIG, SEARCH, store=store, runtime=RuntimeConfig(batch_size=16), **kw)


def test_segments_merge_and_tombstones_keep_exact_answers(tmp_path):
    paths = _scenes(tmp_path / "imgs", 24)
    store = tmp_path / "s.sqlite"
    plain = SearchConfig(levels=(1, 2), pca_dim=0)  # the same vectors whatever the history
    with Index.create(tmp_path / "fresh", CONFIG, plain, store=store) as fresh:
        fresh.add(paths[4:], progress=False)  # the reference: one batch, removed ones never added
        want = _ranking(fresh.search(paths[4:10], k=8))
    with Index.create(tmp_path / "grown", CONFIG, plain, store=store) as idx:
        for start in range(0, 24, 4):  # six adds: six segments, merged by tier
            idx.add(paths[start:start + 4], progress=False)
        state = read_state(idx.path)
        assert len(state.segments) < 6 and state.images == 24
        report = idx.remove(paths[:4])
        assert (report.removed, report.images) == (4, 20)
        state = read_state(idx.path)
        # Removing costs a tombstone list, not a rewrite of every segment.
        assert state.dead is None or state.dead["count"] <= 4
        got = _ranking(idx.search(paths[4:10], k=8))
        assert not {h.path for r in idx.search(paths[:2], k=None) for h in r.hits} & set(paths[:4])
    # The same images ranked the same, whatever the history of segments and tombstones.
    assert got == want


def test_many_removals_compact_segments(tmp_path):
    paths = _scenes(tmp_path / "imgs", 12)
    with _create(tmp_path / "idx", tmp_path / "s.sqlite") as idx:
        idx.add(paths, progress=False)
        idx.remove(paths[:6])
        state = read_state(idx.path)
        assert state.dead is None and state.rows == 6  # half removed: the segment was rewritten
        assert idx.info()["removed_pending"] == 0
        assert {h.path for h in idx.search(paths[6:7], k=None)[0].hits} == set(paths[6:])


def test_segment_reads_match_the_map_and_warm_keeps_answers(tmp_path):
    paths = _scenes(tmp_path / "imgs", 10)
    with _create(tmp_path / "idx", tmp_path / "s.sqlite") as idx:
        idx.add(paths, progress=False)
        before = _ranking(idx.search(paths[:3], k=5))
        view = idx.view()
        seg = view.segments[0]
        mapped = np.asarray(seg.vectors).reshape(seg.images, idx.patches_per_image, -1)
        for rows in ([0, 1, 2, 3], [1, 2, 4], [0, 9], [7]):  # contiguous, gappy, scattered, one
            got = seg.read(np.array(rows), idx.patches_per_image)
            np.testing.assert_array_equal(got, mapped[rows].reshape(-1, mapped.shape[2]))
        assert idx.warm(wait=True) == sum(os.path.getsize(s.vectors.filename) for s in view.segments)
        assert _ranking(idx.search(paths[:3], k=5)) == before


def test_small_index_grown_tenfold_refits_its_whitening(tmp_path):
    paths = _scenes(tmp_path / "imgs", 30)
    with _create(tmp_path / "idx", tmp_path / "s.sqlite") as idx:
        idx.add(paths[:3], progress=False)
        small = idx.info()["whitening"]
        assert small["fitted_at_images"] == 3 and small["sample_images"] == 3
        assert "re-fitted when the collection reaches 6 images" == small["refit"]
        idx.add(paths[3:], progress=False)
        grown = idx.info()["whitening"]
        assert grown["fitted_at_images"] == 30 and grown["windows"] == 30 * 5
        top = idx.search(paths[:5], k=1)
        assert [r.hits[0].path for r in top] == paths[:5]


def test_one_image_index_searches_without_whitening(tmp_path):
    paths = _scenes(tmp_path / "imgs", 2)
    with _create(tmp_path / "idx", tmp_path / "s.sqlite") as idx:
        idx.add(paths[:1], progress=False)
        info = idx.info()
        assert info["whitening"]["fitted"] is False and info["dim"] == 512  # raw ResNet-18 width
        (result,) = idx.search(paths, k=3)[:1]
        assert result.hits[0].path == paths[0] and result.hits[0].distance < SELF_DISTANCE


def test_database_whitening_never_collapses_a_small_collection(tmp_path):
    """Twenty images, five windows each: 100 windows for 512 dimensions. Plain PCA-whitening
    clamped to the sample's rank ranked near chance here; the shrunk one must rank every
    image first for itself and keep the same top hits as no whitening at all."""
    paths = _scenes(tmp_path / "imgs", 20)
    store = tmp_path / "s.sqlite"
    with _create(tmp_path / "w", store) as whitened, Index.create(
        tmp_path / "raw", CONFIG, SearchConfig(levels=(1, 2), pca_dim=0), store=store
    ) as raw:
        whitened.add(paths, progress=False)
        raw.add(paths, progress=False)
        w = whitened.search(paths, k=1)
        r = raw.search(paths, k=1)
    assert [x.hits[0].path for x in w] == paths
    assert [x.hits[0].path for x in w] == [x.hits[0].path for x in r]


def test_auto_structure_above_the_exact_limit(tmp_path):
    """Above the policy's size an IVF fast-scan PQ structure is trained on its own and its
    candidates, re-ranked by the kernel, agree with exact search."""
    paths = _scenes(tmp_path / "imgs", 60)
    with _create(tmp_path / "idx", tmp_path / "s.sqlite", policy=WritePolicy(ann_min_images=40)) as idx:
        idx.add(paths[:30], progress=False)
        assert idx.info()["structure"]["search"] == "exact"
        idx.add(paths[30:], progress=False)
        info = idx.info()
        assert info["structure"]["search"] == "candidates"
        assert info["index_type"].startswith("IVF") and info["index_type"].endswith("x4fs")
        exact = idx.search(paths[:10], k=5)
        approx = idx.search(paths[:10], k=5, exact_limit=40, nprobe=16, per_patch=300)
        assert _ranking(approx) == _ranking(exact)
        # Removing images keeps them out of the candidates too.
        idx.remove(paths[:2])
        hits = idx.search(paths[:2], k=5, exact_limit=40, nprobe=16, per_patch=300)
        assert all(h.path not in paths[:2] for r in hits for h in r.hits)


def test_layout_index_proposes_whole_images(tmp_path):
    """Beside the window index, the layout index holds each image's windows laid end to
    end: an indexed image is its own nearest there, its candidates alone (one window
    nominating one image) re-rank to the exact answer, removed images leave it, and a
    damaged layout file is rebuilt at the next query."""
    policy = WritePolicy(ann_min_images=20, layout_min_images=24, layout_train_images=24)
    paths = _scenes(tmp_path / "imgs", 40)
    with _create(tmp_path / "idx", tmp_path / "s.sqlite", policy=policy) as idx:
        idx.add(paths[:20], progress=False)
        assert idx.info()["structure"]["search"] == "exact"
        idx.add(paths[20:], progress=False)
        structure = idx.info()["structure"]
        patches, dim = idx.patches_per_image, idx.info()["dim"]
        assert structure["layout_factory"] == f"PQ{dim}x4fs"
        view = idx.view()
        ids = np.concatenate([s.ids for s in view.segments])
        laid = np.concatenate([s.vectors[:].astype(np.float32).reshape(s.images, patches * dim) for s in view.segments])
        _, near = view.layout.search(laid, 1)
        assert (near[:, 0] == ids).mean() >= 0.9
        exact = idx.search(paths[:10], k=5)
        alone = idx.search(paths[:10], k=5, exact_limit=20, nprobe=1, per_patch=1, layout_k=40)
        assert _ranking(alone) == _ranking(exact)
        # A query at fewer levels than the database fills only its windows' places.
        coarse = idx.search(paths[:10], k=5, query_levels=(1,))
        alone = idx.search(paths[:10], k=5, query_levels=(1,), exact_limit=20, nprobe=1, per_patch=1, layout_k=40)
        assert _ranking(alone) == _ranking(coarse)
        _, near = view.layout.search(np.pad(laid[:, :dim], ((0, 0), (0, (patches - 1) * dim))), 1)
        assert (near[:, 0] == ids).mean() >= 0.5
        idx.remove(paths[:12])
        assert idx.view().layout.ntotal == 28  # more than a fifth removed: purged
        hits = idx.search(paths[:12], k=5, exact_limit=20, layout_k=40)
        assert all(h.path not in paths[:12] for r in hits for h in r.hits)
        layout = tmp_path / "idx" / read_state(tmp_path / "idx").ann["layout"]
        layout.write_bytes(layout.read_bytes()[:100])
    with _create(tmp_path / "idx", tmp_path / "s.sqlite", policy=policy) as idx:
        again = idx.search(paths[12:20], k=5, exact_limit=20, layout_k=40)
        assert _ranking(again) == _ranking(idx.search(paths[12:20], k=5))
        assert read_state(tmp_path / "idx").ann["layout"] != layout.name


def test_reindex_changes_the_structure_without_extraction(tmp_path, store_env):
    folder = tmp_path / "imgs"
    _scenes(folder, 10)
    idx = str(tmp_path / "idx")
    assert run_cli("build", idx, str(folder), *TINY_FLAGS).returncode == 0
    out = run_cli("reindex", idx, "--index-type", "IVF4,Flat", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["factory"] == "IVF4,Flat"
    out = run_cli("reindex", idx, "--index-type", "Bogus,XX")
    assert out.returncode == 2 and "IVF1024,PQ64x4fs" in out.stderr  # says what is allowed
    out = run_cli("reindex", idx, "--index-type", "auto", "--json")
    assert json.loads(out.stdout)["search"] == "exact"


# -- readers never wait for writers ---------------------------------------------------------
SLOW_ADD = textwrap.dedent("""
    import pathlib, sys, time
    from retrieval import Index
    index, started, release, *paths = sys.argv[1:]
    def slowly():
        yield paths[0]
        pathlib.Path(started).touch()       # the lock is held from here on
        while not pathlib.Path(release).exists():
            time.sleep(0.05)
        yield from paths[1:]
    with Index.open(index) as idx:
        print(idx.add(slowly(), progress=False).added)
""")


def test_query_during_a_running_add_returns_hits(tmp_path, store_env):
    paths = _scenes(tmp_path / "imgs", 10)
    idx = str(tmp_path / "idx")
    assert run_cli("build", idx, *paths[:6], *TINY_FLAGS).returncode == 0
    started, release = tmp_path / "started", tmp_path / "release"
    writer_proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_ADD, idx, str(started), str(release), *paths[6:]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ},
    )
    try:
        deadline = time.time() + 120
        while not started.exists() and writer_proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert started.exists(), writer_proc.stderr.read() if writer_proc.poll() is not None else "no start"
        out = run_cli("query", idx, paths[0], "-k", "3", "--json")
        assert out.returncode == 0, out.stderr
        hits = json.loads(out.stdout)["results"][0]["hits"]
        assert hits[0]["path"] == paths[0] and len(hits) == 3
        assert writer_proc.poll() is None  # the writer was still running all along
        info = run_cli("info", idx, "--json")
        assert info.returncode == 0 and json.loads(info.stdout)["images"] >= 6
    finally:
        release.touch()
        out, err = writer_proc.communicate(timeout=240)
    assert writer_proc.returncode == 0, err
    assert out.strip() == "4"
    res = run_cli("query", idx, paths[9], "-k", "1", "--json")
    assert json.loads(res.stdout)["results"][0]["hits"][0]["path"] == paths[9]


# -- resumable builds ---------------------------------------------------------------------------
def _whitening_of(index_dir):
    with Index.open(index_dir) as idx:
        w = idx.whitening
        return w.mean_, w.projection_


def test_rebuild_twice_and_after_kill_9_resumes_with_the_same_whitening(tmp_path, store_env):
    folder = tmp_path / "imgs"
    paths = _scenes(folder, 30)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    # On the CPU: the claim is the same sample and the same fit; on a GPU, cuDNN's
    # algorithms (and TF32) differ by batch shape at about 1e-3, so two extractions that
    # were batched differently are not bit-identical (benchmarks/results/gpu.md).
    args = [str(folder), *TINY_FLAGS, "--device", "cpu", "--json"]
    out = run_cli("build", str(whole), *args)
    assert out.returncode == 0, out.stderr
    again = run_cli("build", str(whole), *args)  # the same command twice: resumes, adds nothing
    assert again.returncode == 0, again.stderr
    assert (json.loads(again.stdout)["already_present"], json.loads(again.stdout)["images"]) == (30, 30)

    # Fresh extractions for the cut build would be cached; a second store makes them real.
    env = {"RETRIEVAL_STORE": str(tmp_path / "other.sqlite")}
    proc = subprocess.Popen([sys.executable, "-m", "retrieval.cli", "build", str(cut), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **env})
    kill_after = random.Random().randint(1, 29)
    deadline = time.time() + 240
    while manifest_count(cut) < kill_after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = run_cli("build", str(cut), *args, env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["images"] == 30
    for a, b in zip(_whitening_of(whole), _whitening_of(cut)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"killed after {kill_after}")
    res = run_cli("query", str(cut), paths[7], "-k", "30", "--json")
    hits = json.loads(res.stdout)["results"][0]["hits"]
    assert hits[0]["path"] == paths[7] and len({h["path"] for h in hits}) == 30


def test_python_create_twice_is_a_resume(tmp_path, image_dir):
    paths = [str(p) for p in image_dir.iterdir()]
    with Index.create(tmp_path / "i", CONFIG, SEARCH, store=tmp_path / "s.sqlite") as idx:
        idx.add(paths, progress=False)
    with Index.create(tmp_path / "i", CONFIG, SEARCH, store=tmp_path / "s.sqlite") as idx:
        assert idx.add(paths, progress=False).already_present == 6


# -- self-healing -------------------------------------------------------------------------------
def _damage(path, how):
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(b"{{garbage")


def test_each_damaged_derived_file_is_rebuilt_from_the_store(tmp_path, image_dir, store_env):
    idx = tmp_path / "idx"
    assert run_cli("build", str(idx), str(image_dir), *TINY_FLAGS, "--index-type", "IVF2,Flat").returncode == 0
    query = ["query", str(idx), str(image_dir / "img3.jpg"), "-k", "6", "--json"]
    want = [h["path"] for h in json.loads(run_cli(*query).stdout)["results"][0]["hits"]]
    damages = [("whitening", "delete"), ("vectors", "truncate"), ("ids", "garbage"), ("ann", "truncate"),
               ("state", "garbage"), ("vectors", "delete"), ("ann", "delete"), ("state", "delete")]
    for kind, how in damages:
        target = _current(idx, kind)
        _damage(target, how)
        out = run_cli(*query)
        assert out.returncode == 0, f"{target.name} ({how}): {out.stderr}"
        assert [h["path"] for h in json.loads(out.stdout)["results"][0]["hits"]] == want, target.name
    info = json.loads(run_cli("info", str(idx), "--json").stdout)
    assert info["up_to_date"] and info["structure"]["factory"] == "IVF2,Flat"


def _current(idx, kind):
    """The file of one kind that the published state names now (names change on rebuild)."""
    if kind == "state":
        return idx / "state.json"
    state = read_state(idx)
    if kind in ("whitening", "ann"):
        return idx / getattr(state, kind)["file"]
    return idx / (state.segments[0]["name"] + (".ids.npy" if kind == "ids" else ".npy"))


def test_damaged_databases_are_named(tmp_path, image_dir, store_env):
    idx = tmp_path / "idx"
    assert run_cli("build", str(idx), str(image_dir), *TINY_FLAGS).returncode == 0
    manifest = idx / "manifest.sqlite"
    for extra in ("-wal", "-shm"):
        (idx / f"manifest.sqlite{extra}").unlink(missing_ok=True)
    manifest.write_bytes(b"not a database" * 100)
    out = run_cli("query", str(idx), str(image_dir / "img0.jpg"))
    assert out.returncode != 0 and "manifest.sqlite" in out.stderr

    idx2 = tmp_path / "idx2"
    assert run_cli("build", str(idx2), str(image_dir), *TINY_FLAGS, "--store", str(tmp_path / "own.sqlite")).returncode == 0
    (tmp_path / "own.sqlite").write_bytes(b"garbage" * 100)
    for extra in ("-wal", "-shm"):
        (tmp_path / f"own.sqlite{extra}").unlink(missing_ok=True)
    out = run_cli("add", str(idx2), str(image_dir))
    assert out.returncode != 0 and "own.sqlite" in out.stderr


def test_store_missing_descriptors_names_the_image_and_the_fix(tmp_path, image_dir, store_env):
    idx = tmp_path / "idx"
    assert run_cli("build", str(idx), str(image_dir), *TINY_FLAGS).returncode == 0
    with sqlite3.connect(store_env) as conn:
        conn.execute("DELETE FROM descriptors")
    state = read_state(idx)
    (idx / state.segments[0]["name"]).with_suffix(".npy").unlink()
    out = run_cli("query", str(idx), str(image_dir / "img0.jpg"))
    assert out.returncode == 2
    assert "lacks the descriptors of" in out.stderr and "retrieval add" in out.stderr


def test_fast_scan_structures_search_on_the_cpu():
    """FAISS has no GPU implementation of fast-scan codes: with a GPU present such a
    structure still searches on the CPU (and `info` says so), others move to the GPU."""
    from retrieval.engine.ann import VectorIndex, gpu_capable

    assert not gpu_capable("IVF1024,PQ64x4fs") and not gpu_capable("PQ256x4fs")
    assert gpu_capable("IVF256,Flat") and gpu_capable("IVF1024,PQ64") and gpu_capable("HNSW32")
    assert VectorIndex(64, "IVF16,PQ16x4fs", "auto").search_device() == "cpu"
