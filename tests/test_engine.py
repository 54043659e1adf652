"""The engine under `Index`: segments, tombstones, whitening policy, readers during writes,
self-healing, resumable builds (issue 8), through the public API and the real CLI."""
from __future__ import annotations

import json
import os
import random
import select
import shutil
import sqlite3
import sys

import numpy as np
import pytest

from retrieval import ExtractorConfig, Index, InputSpec, RuntimeConfig, SearchConfig
from retrieval.engine.policy import WritePolicy
from retrieval.engine.snapshot import read_state

from conftest import kill_at_pause, manifest_count, paused_at, SELF_DISTANCE, TINY_FLAGS, make_scene, run_cli

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
        # Many queries at once (one kernel call per segment, each over its own pool, some
        # pools naming removed images) answer exactly as each alone.
        narrow = dict(k=5, exact_limit=40, nprobe=2, per_patch=3)
        together = idx.search(paths[:12], **narrow)
        alone = [idx.search([p], **narrow)[0] for p in paths[:12]]
        assert [[(h.id, h.distance) for h in r.hits] for r in together] == \
            [[(h.id, h.distance) for h in r.hits] for r in alone]


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
        # The shortlist trims the window index's images only: the layout's are all scored.
        alone = idx.search(paths[:10], k=5, exact_limit=20, nprobe=1, per_patch=1, layout_k=40, shortlist=1)
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
def test_query_during_a_running_add_returns_hits(tmp_path, store_env):
    paths = _scenes(tmp_path / "imgs", 10)
    idx = str(tmp_path / "idx")
    assert run_cli("build", idx, *paths[:6], *TINY_FLAGS).returncode == 0
    add = [sys.executable, "-m", "retrieval.cli", "add", idx, *paths[6:], "--json"]
    # The writer is held, lock taken, right after committing its first image.
    with paused_at(add, "committed", 1, tmp_path) as writer_proc:
        out = run_cli("query", idx, paths[0], "-k", "3", "--json")
        assert out.returncode == 0, out.stderr
        hits = json.loads(out.stdout)["results"][0]["hits"]
        assert hits[0]["path"] == paths[0] and len(hits) == 3
        busy = run_cli("add", idx, paths[9])  # a second writer is refused, not queued
        assert busy.returncode == 4 and "being written by another process" in busy.stderr  # busy (SPEC)
        info = run_cli("info", idx, "--json")
        assert info.returncode == 0, info.stderr
        assert (json.loads(info.stdout)["images"], json.loads(info.stdout)["up_to_date"]) == (7, False)
        assert writer_proc.poll() is None  # the writer was held all along
    assert writer_proc.wait(timeout=240) == 0, writer_proc.err_file.read_text()
    assert json.loads(writer_proc.out_file.read_text())["added"] == 4
    res = run_cli("query", idx, paths[9], "-k", "1", "--json")
    assert json.loads(res.stdout)["results"][0]["hits"][0]["path"] == paths[9]


# -- resumable builds ---------------------------------------------------------------------------
def _whitening_of(index_dir):
    with Index.open(index_dir) as idx:
        w = idx.whitening
        return w.mean_, w.projection_


# Kill points come from this seed (set RETRIEVAL_TEST_SEED to try others); a failure names
# the seed and the point, so it can be re-run exactly.
SEED = int(os.environ.get("RETRIEVAL_TEST_SEED", "20261203"))


def _stored_digests(store):
    with sqlite3.connect(store) as conn:
        return {d for (d,) in conn.execute("SELECT DISTINCT digest FROM descriptors")}


def _manifest_digests(index_dir):
    with sqlite3.connect(f"file:{index_dir / 'manifest.sqlite'}?mode=ro", uri=True) as conn:
        return {d for (d,) in conn.execute("SELECT digest FROM images")}


def _spy_extractions(monkeypatch) -> list:
    """Paths the local extractor is asked to extract in this process, from now on."""
    from retrieval.extraction.extractor import Extractor

    sent, original = [], Extractor.extract

    def spy(self, jobs, **kw):
        jobs = list(jobs)
        sent.extend(job.path for job in jobs)
        return original(self, jobs, **kw)

    monkeypatch.setattr(Extractor, "extract", spy)
    return sent


def test_rebuild_twice_and_after_kill_9_resumes_with_the_same_whitening(tmp_path, store_env, monkeypatch):
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
    other = tmp_path / "other.sqlite"
    kill_after = random.Random(SEED).randint(1, 29)
    print(f"seed {SEED}: killed after image {kill_after} is committed")
    where = f"seed {SEED}, killed after image {kill_after}"
    kill_at_pause([sys.executable, "-m", "retrieval.cli", "build", str(cut), *args], "committed", kill_after,
                  tmp_path, env={"RETRIEVAL_STORE": str(other)})

    # The manifest holds exactly the images committed; each of them is in the store;
    # nothing was published for them (the first publish comes after the last image).
    assert manifest_count(cut) == kill_after, where
    committed, stored = _manifest_digests(cut), _stored_digests(other)
    assert len(committed) == kill_after and committed <= stored, where
    assert read_state(cut) is None, where
    info = run_cli("info", str(cut), "--json")
    assert info.returncode == 0, info.stderr
    partial = json.loads(info.stdout)
    assert (partial["images"], partial["patches"], partial["up_to_date"]) == (kill_after, 5 * kill_after, False), where

    # The re-run adds exactly the rest, extracting exactly what the store lacks.
    monkeypatch.setenv("RETRIEVAL_STORE", str(other))
    extracted = _spy_extractions(monkeypatch)
    with Index.open(cut, runtime=RuntimeConfig(device="cpu", batch_size=16)) as idx:
        report = idx.add(paths, progress=False)
        assert (report.added, report.already_present, report.images) == (30 - kill_after, kill_after, 30), where
        assert idx.manifest.count() == 30 and idx.info()["up_to_date"], where
    from retrieval.config import file_digest

    assert sorted(extracted) == sorted(p for p in paths if file_digest(p) not in stored), where
    assert _stored_digests(other) == _manifest_digests(cut) == _manifest_digests(whole), where

    # The same whitening and ranking as the build that was never interrupted.
    for a, b in zip(_whitening_of(whole), _whitening_of(cut)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=where)
    with Index.open(whole) as w, Index.open(cut) as c:
        want, got = w.search(paths[::6], k=None), c.search(paths[::6], k=None)
    for a, b in zip(want, got):
        assert [h.path for h in b.hits] == [h.path for h in a.hits], where
        np.testing.assert_allclose([h.distance for h in b.hits], [h.distance for h in a.hits], atol=2e-3, err_msg=where)


def test_kill_9_while_publishing_keeps_the_last_generation_then_heals(tmp_path, store_env):
    """Killed after a writer wrote the files of a new generation but before state.json
    names them: readers see the previous generation; the next reader publishes the new
    one from the manifest and deletes the orphans; the answers equal an add never killed."""
    paths = _scenes(tmp_path / "imgs", 16)
    calm, cut = tmp_path / "calm", tmp_path / "cut"
    assert run_cli("build", str(calm), *paths[:10], *TINY_FLAGS, "--device", "cpu").returncode == 0
    shutil.copytree(calm, cut)
    before = read_state(cut)
    assert run_cli("add", str(calm), *paths[10:], "--quiet").returncode == 0
    kill_at_pause([sys.executable, "-m", "retrieval.cli", "add", str(cut), *paths[10:], "--quiet"],
                  "publish", 1, tmp_path)

    assert manifest_count(cut) == 16
    assert read_state(cut) == before  # still the 10-image generation
    orphans = {p.name for p in cut.iterdir() if p.name.startswith("seg-")} - before.files()
    assert orphans, "the killed writer had written the new segment"
    info = json.loads(run_cli("info", str(cut), "--json").stdout)
    assert (info["images"], info["up_to_date"]) == (16, False)

    out = run_cli("query", str(cut), *paths[::3], "-k", "16", "--json")  # heals first
    assert out.returncode == 0, out.stderr
    healed = read_state(cut)
    assert healed.images == 16 and healed.generation > before.generation
    # Nothing is left over but what the healed state names (file names may be reused).
    left = {p.name for p in cut.iterdir() if not p.name.startswith("manifest.sqlite")}
    assert left - {".lock", "index.json", "state.json", "neighbours.npz"} == healed.files()
    calm_out = run_cli("query", str(calm), *paths[::3], "-k", "16", "--json")
    assert json.loads(out.stdout)["results"] == json.loads(calm_out.stdout)["results"]
    info = json.loads(run_cli("info", str(cut), "--json").stdout)
    assert (info["images"], info["up_to_date"]) == (16, True)


def test_pause_hook_fires_once_at_its_point_and_resumes(tmp_path, monkeypatch):
    import threading

    from retrieval.engine import pause

    monkeypatch.setattr(pause, "_reached", {})
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    monkeypatch.delenv(pause.ENV, raising=False)
    assert pause.pause_hook("committed") is None  # unset: nothing to call
    for bad in ("committed", "committed:0:x", "nowhere:1:x", "committed:two:x", "committed:1:"):
        monkeypatch.setenv(pause.ENV, bad)
        with pytest.raises(ValueError, match="RETRIEVAL_PAUSE"):
            pause.pause_hook("committed")
    monkeypatch.setenv(pause.ENV, f"committed:1:{fifo}")
    with pytest.raises(OSError):  # nobody reads the FIFO: an error, not a hang
        pause.pause_hook("committed")()
    monkeypatch.setattr(pause, "_reached", {})
    monkeypatch.setenv(pause.ENV, f"committed:3:{fifo}")
    assert pause.pause_hook("publish") is None
    hook = pause.pause_hook("committed")
    fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    try:
        hook(), hook()  # the first two pass
        assert not select.select([fd], [], [], 0)[0]
        worker = threading.Thread(target=hook)
        worker.start()
        assert select.select([fd], [], [], 60)[0]
        assert os.read(fd, 100).decode() == f"committed 3 {os.getpid()}\n"
        assert worker.is_alive()  # paused until the reader lets go
    finally:
        os.close(fd)
    worker.join(60)
    assert not worker.is_alive()
    fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # a reader, so a wrong pause would not hang
    try:
        hook()  # the fourth passes again
        assert not select.select([fd], [], [], 0)[0]
    finally:
        os.close(fd)


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


@pytest.mark.parametrize("factory, windows", [
    ("IVF1024,PQ64x4fs", 64 * 1024),
    ("IVF8192_HNSW32,PQ64x4fs", 64 * 8192),   # the 32 is the coarse quantizer's, not lists
    ("OPQ16_64,IVF256_HNSW32,PQ16x4fs", 64 * 256),
    ("PQ256x4fs", 4096),
    ("HNSW32", 4096),
])
def test_the_training_sample_follows_the_ivf_list_count_alone(factory, windows):
    """A structure is trained on TRAIN_PER_LIST windows per IVF list (at least 4,096):
    digits elsewhere in the factory string (an HNSW coarse quantizer's degree) are not
    lists; read as lists, `IVF8192_HNSW32` asked for a 53 GB sample and was killed."""
    from retrieval.engine.ann import training_size

    assert training_size(factory) == windows


@pytest.mark.parametrize("images, factory", [
    (2_001, "IVF512,PQ64x4fs"),
    (10_000, "IVF1024,PQ64x4fs"),
    (100_000, "IVF4096_HNSW32,PQ64x4fs"),      # from 4,096 lists the centroids are in a graph
    (1_000_000, "IVF8192_HNSW32,PQ64x4fs"),
    (10_000_000, "IVF8192_HNSW32,PQ64x4fs"),   # at most 8,192 lists (training grows as lists squared)
])
def test_the_automatic_structure_has_about_two_sqrt_windows_lists(images, factory):
    """About 2 x sqrt(windows) IVF lists (a power of two), the list centroids searched
    through an HNSW graph from 4,096 lists on; FAISS builds each of them."""
    import faiss

    from retrieval.engine.ann import auto_factory

    assert auto_factory(30 * images, 256) == factory
    assert faiss.index_factory(256, factory, faiss.METRIC_INNER_PRODUCT).d == 256
