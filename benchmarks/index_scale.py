#!/usr/bin/env python
"""The engine at scale, through the public API only: `Index.create` / `add` / `search` / `remove`.

    python benchmarks/index_scale.py --images 1000,10000,100000 --json out.json --plot p50.png
    python benchmarks/index_scale.py --images 1000000 --raw-dim 256 --hard --json out.json

For each N it writes N small files, puts synthetic raw descriptors for them in a
`FeatureStore` (as `retrieval build` would after extraction: levels 1-4, 30 windows,
float16), then measures what a user would see:

- build: `Index.create` + `Index.add` of all N (seconds; peak RSS of this process, and
  its anonymous and file-backed parts apart);
- disk bytes per image: the feature store and the index directory apart;
- `add` of 1,000 more images and `remove` of 1,000 (seconds);
- p50 / p95 latency of `Index.search` (one query at a time, its descriptors already
  stored) after `Index.warm(wait=True)` as `retrieval serve` does at start (and, before
  it, with the page cache as the build left it), and recall@10 against exact kernel scoring of every image
  (`search(..., exact_limit=huge)`);
- beside it, on the same window vectors and queries, FastPLAID
  (`benchmarks/fastplaid_peer.py`, in its own venv: run it once with `--setup`), up to
  `--peer-max` images.

Generator: images come in groups of `--group` (near-duplicates of one scene: the same
30 window descriptors plus noise); each query is one more, unindexed member of a group.
`--hard` raises the noise until group mates are barely nearer than the crowd. Raw
descriptors are non-negative (like pooled ReLU activations) with a decaying spectrum,
so the whitening has something to learn.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from retrieval import ExtractorConfig, FeatureStore, Index, InputSpec, SearchConfig  # noqa: E402
from retrieval.config import file_digest  # noqa: E402
from retrieval.extraction.extractor import Extractor  # noqa: E402
from retrieval.extraction.patches import level_names  # noqa: E402

LEVELS = (1, 2, 3, 4)
PATCHES = 30
# A small torch config: only its key is used (descriptors come from the generator), and
# loading it needs no download.
CONFIG = ExtractorConfig(backbone="resnet18", weights="none", input_spec=InputSpec(size=(64, 64)))
PEER = ROOT / "benchmarks" / "fastplaid_peer.py"


class Generator:
    """Synthetic raw window descriptors with planted near-duplicate groups."""

    def __init__(self, dim: int, group: int, hard: bool, seed: int = 0) -> None:
        self.dim, self.group, self.seed = dim, group, seed
        self.noise = 2.0 if hard else 0.35
        rng = np.random.default_rng(seed)
        self.scale = (1.0 / np.sqrt(1 + np.arange(dim))).astype(np.float32)
        self.offset = rng.uniform(0.5, 1.5, dim).astype(np.float32)

    def scene(self, g: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, g))
        return rng.normal(size=(PATCHES, self.dim)).astype(np.float32)

    def image(self, i: int, scene: np.ndarray | None = None) -> np.ndarray:
        """Raw descriptors [30, dim] of image i (member i % group of scene i // group)."""
        scene = self.scene(i // self.group) if scene is None else scene
        return self._member(scene, (self.seed, 1, i))

    def query(self, q: int) -> np.ndarray:
        """Query q: one more, unindexed member of scene q."""
        return self._member(self.scene(q), (self.seed, 2, q))

    def _member(self, scene: np.ndarray, seed: tuple) -> np.ndarray:
        rng = np.random.default_rng(seed)
        x = scene + self.noise * rng.normal(size=scene.shape).astype(np.float32)
        return np.maximum(self.offset + x * self.scale, 0)


def _regions(raw: np.ndarray) -> dict[str, np.ndarray]:
    out, at = {}, 0
    for name, level in zip(level_names(LEVELS), LEVELS):
        out[name] = raw[at:at + level * level]
        at += level * level
    return out


def write_images(folder: Path, store: FeatureStore, key: str, gen: Generator, ids: range, tag: str) -> list[str]:
    """Files whose content names them, and their descriptors in the store."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, batch = [], []
    for i in ids:
        path = folder / f"{tag}{i:07d}.jpg"
        path.write_bytes(f"{tag}{i}".encode())
        paths.append(str(path))
        batch.append((file_digest(path), 640, 480, _regions(gen.image(i) if tag == "img" else gen.query(i))))
        if len(batch) == 2000:
            store.put_many(key, batch)
            batch = []
    if batch:
        store.put_many(key, batch)
    return paths


def _du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size + sum(
            Path(str(path) + s).stat().st_size for s in ("-wal", "-shm") if Path(str(path) + s).exists())
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class MemorySampler:
    """Peak anonymous and file-backed resident memory of this process, sampled 4x a second.

    ru_maxrss adds both: file-backed pages are mapped file contents (segments, FAISS
    reads) the kernel can drop at any time, anonymous pages are what the process holds.
    """

    def __init__(self) -> None:
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        with open("/proc/self/status") as fh:
            for line in fh:
                key = line.split(":", 1)[0]
                if key in self.peak:
                    self.peak[key] = max(self.peak[key], int(line.split()[1]) * 1024)

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            self._sample()

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        self._sample()
        return {"anon_gib": round(self.peak["RssAnon"] / 2**30, 2), "file_gib": round(self.peak["RssFile"] / 2**30, 2)}


def _latencies(index: Index, queries: list[str]) -> tuple[list[float], list]:
    times, results = [], []
    for q in queries:
        t = time.perf_counter()
        results.append(index.search([q], k=10)[0])
        times.append(time.perf_counter() - t)
    return times, results


def _ms(times: list[float], q: int) -> float:
    return round(1000 * float(np.percentile(times, q)), 2)


def run_one(n: int, args, work: Path) -> dict:
    base = work / f"n{n}"
    n_groups = max(1, n // args.group)
    if args.reuse and (base / "build.json").exists():
        # Measure search again on an index built by an earlier run (--keep), e.g. on a
        # quieter machine: the build columns are that run's.
        row = json.loads((base / "build.json").read_text())
        index = Index.open(base / "index")
        images, extra, queries = ([str(p) for p in sorted((base / sub).iterdir())] for sub in ("images", "extra", "queries"))
    elif args.prepare_only:
        prepare(n, args, base, n_groups)
        return {"images": n, "prepared": str(base)}
    else:
        index, row, images, extra, queries = build(n, args, base, n_groups)
    run_queries(index, row, args, n, n_groups, extra, queries, base)
    index.close()
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    return row


def prepare(n: int, args, base: Path, n_groups: int) -> tuple[Path, list[str], list[str], list[str], float]:
    """The N files and their raw descriptors in a store; reused when an earlier --keep
    run left them complete (prepared.json is written last)."""
    marker = base / "prepared.json"
    names = lambda sub: [str(p) for p in sorted((base / sub).iterdir())]  # noqa: E731
    if args.reuse and marker.exists():
        return base / "store.sqlite", names("images"), names("extra"), names("queries"), json.loads(marker.read_text())["prepare_s"]
    gen = Generator(args.raw_dim, args.group, args.hard)
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    store_path = base / "store.sqlite"
    key = Extractor(CONFIG).key
    t = time.perf_counter()
    with FeatureStore.open(store_path) as store:
        store.register_config(key, CONFIG.to_dict())
        images = write_images(base / "images", store, key, gen, range(n), "img")
        extra = write_images(base / "extra", store, key, gen, range(n, n + 1000), "img")
        queries = write_images(base / "queries", store, key, gen,
                               range(0, n_groups, max(1, n_groups // args.queries))[: args.queries], "qry")
    prepare_s = round(time.perf_counter() - t, 1)
    marker.write_text(json.dumps({"prepare_s": prepare_s, "raw_dim": args.raw_dim, "hard": args.hard}))
    return store_path, images, extra, queries, prepare_s


def build(n: int, args, base: Path, n_groups: int):
    store_path, images, extra, queries, prepare_s = prepare(n, args, base, n_groups)
    shutil.rmtree(base / "index", ignore_errors=True)
    sampler = MemorySampler()
    t = time.perf_counter()
    index = Index.create(base / "index", CONFIG, SearchConfig(levels=LEVELS, pca_dim=args.pca_dim),
                         store=store_path, index_type=args.index_type)
    index.add(images, progress=not args.quiet)
    build_s = time.perf_counter() - t
    build_rss = _rss_gib()
    build_mem = sampler.stop()
    info = index.info()
    row = {
        "images": n, "raw_dim": args.raw_dim, "hard": args.hard, "prepare_s": prepare_s,
        "build_s": round(build_s, 1), "build_peak_rss_gib": round(build_rss, 2),
        "build_peak_anon_gib": build_mem["anon_gib"], "build_peak_file_gib": build_mem["file_gib"],
        "store_bytes_per_image": round(_du(store_path) / (n + 1000 + len(queries))),
        "index_bytes_per_image": round(_du(base / "index") / n),
        "structure": info["structure"], "segments": info["segments"], "dim": info["dim"],
        "whitening": info["whitening"],
    }
    (base / "build.json").write_text(json.dumps(row))
    return index, row, images, extra, queries


def run_queries(index: Index, row: dict, args, n: int, n_groups: int, extra: list[str], queries: list[str], base: Path) -> None:
    t = time.perf_counter()
    index.add(extra, progress=False)
    row["add_1000_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    index.remove(extra)
    row["remove_1000_s"] = round(time.perf_counter() - t, 2)

    index.search(queries[:1], k=10)  # loads the view and the FAISS structure
    first, _ = _latencies(index, queries)  # the page cache as the build left it
    t = time.perf_counter()
    row["warm_bytes"] = index.warm(wait=True)  # as `retrieval serve` does at start
    row["warm_s"] = round(time.perf_counter() - t, 1)
    latencies, approx = _latencies(index, queries)
    exact = [index.search([q], k=10, exact_limit=10**12)[0] for q in queries]
    recall = np.mean([len({h.id for h in a.hits} & {h.id for h in e.hits}) / 10 for a, e in zip(approx, exact)])
    groups = range(0, n_groups, max(1, n_groups // args.queries))
    planted = np.mean([e.hits[0].id - 1 < n and (e.hits[0].id - 1) // args.group == g for g, e in zip(groups, exact)])

    def mates(results) -> float:
        """Mean share of a top 10 that are the query's planted group mates (manifest id = i + 1)."""
        return round(float(np.mean([sum(h.id - 1 < n and (h.id - 1) // args.group == g for h in r.hits) / 10
                                    for g, r in zip(groups, results)])), 3)
    row.update({
        "queries": len(queries),
        "p50_ms": _ms(latencies, 50), "p95_ms": _ms(latencies, 95),
        "unwarmed_p50_ms": _ms(first, 50), "unwarmed_p95_ms": _ms(first, 95),
        "recall@10": round(float(recall), 4),
        "exact_top1_in_group": round(float(planted), 3),
        # On hard data at large N the exact top 10 is a few group mates and then near-ties
        # of the crowd; these say whether the candidates miss mates or only those ties.
        "mates_in_exact_top10": mates(exact), "mates_in_top10": mates(approx),
        "peak_rss_gib": round(_rss_gib(), 2),
        "load_1min": round(os.getloadavg()[0], 1),  # other processes on the cores inflate latencies
    })
    row["grid"] = []
    for nprobe, per_patch, *layout in args.grid:
        layout_k = layout[0] if layout else None
        times, found = [], []
        for q, e in zip(queries, exact):
            t = time.perf_counter()
            hits = index.search([q], k=10, nprobe=nprobe, per_patch=per_patch, layout_k=layout_k)[0].hits
            times.append(time.perf_counter() - t)
            found.append(len({h.id for h in hits} & {h.id for h in e.hits}) / 10)
        row["grid"].append({"nprobe": nprobe, "per_patch": per_patch, "layout_k": layout_k, "recall@10": round(float(np.mean(found)), 4),
                            "p50_ms": round(1000 * float(np.percentile(times, 50)), 2)})
    if n <= args.peer_max:
        row["fastplaid"] = run_peer(index, queries, exact, base, args)


def run_peer(index: Index, queries: list[str], exact, base: Path, args) -> dict:
    """FastPLAID on the same whitened window vectors, queries and exact truth."""
    view = index.view()
    docs = np.concatenate([s.vectors.reshape(s.images, PATCHES, -1) for s in view.segments])
    ids = np.concatenate([s.ids for s in view.segments])
    live = ~np.isin(ids, view.dead)
    docs, ids = docs[live], ids[live]
    pos = {int(i): p for p, i in enumerate(ids.tolist())}
    names = level_names(LEVELS)
    raw = index.store.get_many([file_digest(q) for q in queries], index.extractor.key, names)
    qv = np.stack([view.whitening.transform(raw[file_digest(q)]) for q in queries]).astype(np.float16)
    truth = np.array([[pos[h.id] for h in e.hits] for e in exact], dtype=np.int64)
    data, out = base / "peer.npz", base / "peer.json"
    np.savez(data, docs=docs, queries=qv, truth=truth)
    proc = subprocess.run([sys.executable, str(PEER), "--data", str(data), "--json", str(out), "--threads",
                           str(os.cpu_count() or 2), "--quiet"], capture_output=True, text=True)
    if proc.returncode == 3:
        return {"status": "not set up: run `python benchmarks/fastplaid_peer.py --setup` once"}
    if proc.returncode != 0:
        return {"status": f"failed: {proc.stderr.strip()[-300:]}"}
    peer = json.loads(out.read_text())
    return {k: peer.get(k) for k in ("version", "build_s", "peak_rss_gib", "p50_ms", "p95_ms", "recall@10")}


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ns = [r["images"] for r in rows]
    ax.plot(ns, [r["p50_ms"] for r in rows], "o-", label="Index.search p50")
    ax.plot(ns, [r["p95_ms"] for r in rows], "o--", label="Index.search p95", alpha=0.6)
    peer = [(r["images"], r["fastplaid"]["p50_ms"]) for r in rows
            if isinstance(r.get("fastplaid"), dict) and r["fastplaid"].get("p50_ms")]
    if peer:
        ax.plot(*zip(*peer), "s-", label="FastPLAID p50")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("images in the index (30 windows each)")
    ax.set_ylabel("query latency (ms)")
    ax.set_title(f"one query, 2 CPU cores ({platform.processor() or platform.machine()})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _machine() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    return f"{model}, {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default="1000,10000", help="comma list of collection sizes N")
    p.add_argument("--raw-dim", type=int, default=1280, help="raw descriptor width (MobileNetV2: 1280)")
    p.add_argument("--pca-dim", type=int, default=256)
    p.add_argument("--group", type=int, default=16, help="images per planted scene (more than 10, so that the exact top 10 are planted)")
    p.add_argument("--hard", action="store_true", help="group mates barely nearer than the crowd")
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--index-type", help="override the automatic structure (a FAISS factory string)")
    p.add_argument("--grid", default="", metavar="NPROBE:PER_PATCH[:LAYOUT_K],...",
                   help="also measure these search settings, e.g. 8:64,16:64,16:128:0 (LAYOUT_K 0: no layout index)")
    p.add_argument("--peer-max", type=int, default=20_000, help="run FastPLAID up to this N (0: never)")
    p.add_argument("--workdir", help="where the files, store and index go (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep each N's files (for a later --reuse)")
    p.add_argument("--reuse", action="store_true",
                   help="where --workdir holds an index kept from an earlier run for N, measure search on it "
                        "instead of building again (the build columns are the earlier run's); where it "
                        "holds only the prepared files and store, build the index on them")
    p.add_argument("--prepare-only", action="store_true",
                   help="only write the files and the store (with --workdir --keep, for a later --reuse)")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--plot", help="PNG of p50 latency against N")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    try:
        sizes = [int(v) for v in args.images.split(",")]
    except ValueError:
        p.error(f"--images takes a comma list of integers (got {args.images!r})")
    try:
        args.grid = [tuple(int(v) for v in item.split(":")) for item in args.grid.split(",") if item]
        if any(len(g) not in (2, 3) or min(g[:2]) < 1 or min(g) < 0 for g in args.grid):
            raise ValueError
    except ValueError:
        p.error(f"--grid takes NPROBE:PER_PATCH[:LAYOUT_K] (positive, LAYOUT_K >= 0) integers (got {args.grid!r})")
    if min(sizes) < args.group or args.queries < 1:
        p.error("every N must be at least --group, and --queries at least 1")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="index-scale-"))
    rows = []
    for n in sizes:
        row = run_one(n, args, work)
        rows.append(row)
        if args.prepare_only:
            print(f"N={n}: prepared in {row['prepared']}", flush=True)
            continue
        peer = row.get("fastplaid") or {}
        print(f"N={n}: build {row['build_s']} s, peak {row['build_peak_rss_gib']} GiB "
              f"(anon {row['build_peak_anon_gib']}, file {row['build_peak_file_gib']}), "
              f"{row['store_bytes_per_image']} + {row['index_bytes_per_image']} B/img, "
              f"add 1000 {row['add_1000_s']} s, remove 1000 {row['remove_1000_s']} s, "
              f"p50 {row['p50_ms']} ms, p95 {row['p95_ms']} ms (before warm: {row['unwarmed_p50_ms']} / "
              f"{row['unwarmed_p95_ms']}), recall@10 {row['recall@10']} "
              f"[{row['structure']['search']} {row['structure']['factory'] or ''}]"
              + "".join(f"; nprobe {g['nprobe']} per-patch {g['per_patch']} layout-k {g['layout_k']}: p50 {g['p50_ms']} ms, "
                        f"recall@10 {g['recall@10']}" for g in row["grid"])
              + (f"; FastPLAID build {peer.get('build_s')} s, p50 {peer.get('p50_ms')} ms, "
                 f"recall@10 {peer.get('recall@10')}" if peer.get("p50_ms") else
                 (f"; FastPLAID {peer['status']}" if peer else "")), flush=True)
    result = {"machine": _machine(), "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
              "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(rows, args.plot)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
