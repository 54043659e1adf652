#!/usr/bin/env python
"""Scale benchmark: IVF-PQ candidates + exact native re-rank over N synthetic images.

    python benchmarks/scale.py --images 1000000 --workdir /var/tmp/scale-1m --json 1m.json

Each image has `--patches` (30) L2-normalised descriptors of `--dim` (128) dimensions;
image distance = min over patch pairs of the Euclidean distance (the engine's "min").

Pipeline (what one query costs, end to end; all three phases are timed separately):

1. FAISS: the 30 query patches are searched as one batch in an IVF-PQ index over all
   N*30 patch vectors (the engine's `retrieval.ann.VectorIndex`, inner product on unit
   vectors); each patch keeps its `--per-patch` nearest patch ids, whose owners
   (id // 30) are the candidate images.
2. fetch: the raw float16 descriptors of the candidate images are read from
   `vectors.npy` in the workdir, one `preadv` per image straight into the kernel's input
   buffer (`--fetch pread`, default), or gathered by numpy fancy indexing on the memmap
   (`--fetch mmap`; same bytes and speed, but the memmap's fault-around maps most of the
   file into the process's RSS over many queries -- clean page cache, yet it inflates
   ru_maxrss to ~7 GiB at 1M). Candidates are sorted, so reads go forward.
3. kernel: `retrieval.kernel.patch_distances` scores every (query patch, candidate patch)
   pair exactly and the top 10 images are kept (ties broken by image number).

Raw vectors on disk, not in RAM. At 1M images the raw vectors are 30M x 128: 15.4 GB as
float32, 7.7 GB as float16 -- they must not live in RAM next to the index and the other
jobs on a 24 GiB machine. They are kept as ONE float16 C-order `.npy` of shape
[N*30, d] opened with `np.load(mmap_mode="r")`: that is exactly the engine's derived
`vectors-G.npy` (see `retrieval/index.py`: the SQLite FeatureStore keeps the *raw,
pre-whitening* float32 descriptors as the source of truth, and the search path reads the
derived, whitened, normalised matrix; `Index._load_derived` currently `np.load`s it fully
into RAM, which at this scale would have to become `mmap_mode="r"` and float16 -- the
kernel already accepts float16). Reading candidates from SQLite instead would cost one
B-tree lookup + blob copy per candidate image (~1-2k per query), store float32 (2x the
disk) and still need the whitening per fetch; an image's 30 rows in the memmap are one
contiguous 7.5 KiB run (2 pages), so a fetch is a page-cache copy. The OS page cache then
decides how much of the 7.7 GB stays in RAM; the process RSS stays small (we report the
anonymous RSS and the file-backed RSS separately: file pages are clean and reclaimable).

Factory choice (default "IVF1024,PQ32x4fs", see benchmarks/RESULTS.md, section 6, for numbers):
memory first -- PQ32x4fs stores 16 B of code per vector (+8 B id in the inverted lists),
0.72 GB for 30M vectors, where PQ32 (8-bit) is 32+8 B = 1.2 GB and Flat would be 15.4 GB.
Then build time on 2 shared cores: `add` assigns every vector to its nearest coarse
centroid by brute force, 30M x nlist x 128 multiply-adds, so nlist=16384 or 65536 (the
textbook 4..16*sqrt(N) for 30M) costs 16-64x the assignment of nlist=1024 (hours here),
and training 65536 centroids needs >= 2.5M training points; an HNSW coarse quantizer
speeds the assignment but not enough on 2 cores. With only 1024 lists each list holds
~29k codes, so the scan dominates a search: the 4-bit fast-scan PQ (SIMD, in-register
lookup tables) scans those lists ~10-15x faster than 8-bit PQ32 (measured at 1M: FAISS
8.7 ms vs 121-134 ms per query at nprobe 4), which keeps p50 far under 100 ms. Its low
code precision is harmless on the default data (FAISS only proposes candidate *images*
and the exact kernel re-ranks them), but not on the harder variant below, where recall
is limited by the PQ codes (IVF1024,Flat: ~1.0): use "IVF1024,PQ64x4fs" (32 B code +
8 B id, same scan speed class) for such data.

Synthetic data (`generate`): images come in scenes ("clusters") of exactly
`--cluster-size` (20) images, placed at random positions of the database. Each scene has
a pool of 20 object prototypes (random unit vectors); each image draws 20 object patches
from its scene's pool (with replacement) and 10 background patches from a global pool of
512 background prototypes shared by the whole database (sky, walls...). A patch is
normalise(prototype + s * g / sqrt(d)), g ~ N(0, I): object noise s is drawn per image
in [0.25, 0.6] (so scene mates are at graded distances ~0.35-0.8), background noise is
0.9 (~1.0 between two background copies, while unrelated patches are ~1.41). A query is
a database image (the planted answer) with every patch re-perturbed with s=0.2 and
re-normalised. The planted image is then (almost always) rank 1, but ranks 2-10 are the
9 closest of its 19 scene mates at finely graded distances, and every background query
patch has ~N*10/512 near-identical neighbours that flood its candidate list: recall@10
against exact search measures whether the approximate pipeline finds the right mates.
With these defaults the mates (0.43-0.51 from the query) are well separated from every
other image (>= ~0.95), so recall saturates quickly; `--object-noise 0.5,1.2
--query-noise 0.4` is a harder variant where the mates reach into the background band
and recall depends strongly on `--per-patch`.

Exact search (ground truth) = the native kernel over ALL images for `--exact-queries`
queries at once (`patch_distances_batch`), streaming the .npy in chunks with plain reads.

Output: a table over (nprobe, per-patch) with p50/p95 latency, per-phase means and
recall@10; `--json OUT` writes everything (build times, peak RSS, index bytes, table).
The workdir is reused: data and index are only rebuilt when their parameters change
(`--rebuild` forces it), so the latency measurement can be repeated cheaply.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Sleeping (not spinning) OpenMP workers: on a shared 2-core machine a spinning worker of
# FAISS or of the kernel waits for a descheduled sibling and searches get ~5x slower (and
# k-means ~10x). Must be set before FAISS / the kernel load their OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from retrieval import kernel  # noqa: E402
from retrieval.ann import VectorIndex  # noqa: E402
from retrieval.search import candidate_images, top_k  # noqa: E402

TOP = 10
OBJECT_PATCHES = 20  # per image (the rest are background patches)
OBJECT_POOL = 20  # object prototypes per scene
BACKGROUND_POOL = 512
OBJECT_NOISE = (0.25, 0.6)
BACKGROUND_NOISE = 0.9
QUERY_NOISE = 0.2
GIB = 1024 ** 3


# ----------------------------------------------------------------------------- memory
def _proc_status() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS", "RssAnon", "RssFile", "VmHWM")):
                    k, v = line.split(":")
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


class MemorySampler:
    """Peak anonymous / file-backed RSS, sampled every `period` s in a thread."""

    def __init__(self, period: float = 0.1) -> None:
        self.period = period
        self.peak_anon = 0
        self.peak_file = 0
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        s = _proc_status()
        self.peak_anon = max(self.peak_anon, s.get("RssAnon", 0))
        self.peak_file = max(self.peak_file, s.get("RssFile", 0))
        self.peak_rss = max(self.peak_rss, s.get("VmRSS", 0))

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.sample()

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def ru_maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


# ----------------------------------------------------------------------------- data
def _normalise(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    return x


def _npy_header_size(path: Path) -> tuple[int, tuple, np.dtype]:
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        assert not fortran
        return f.tell(), shape, dtype


def generate(path: Path, n: int, patches: int, dim: int, cluster_size: int, seed: int,
             chunk: int, log, object_noise: tuple[float, float] = OBJECT_NOISE) -> None:
    """Write the [n*patches, dim] float16 database to `path` (.npy), chunk by chunk."""
    rng = np.random.default_rng(seed)
    n_clusters = max(1, n // cluster_size)
    cluster_of = rng.permutation(np.arange(n) % n_clusters).astype(np.int64)
    objects = _normalise(rng.standard_normal((n_clusters, OBJECT_POOL, dim), dtype=np.float32))
    background = _normalise(rng.standard_normal((BACKGROUND_POOL, dim), dtype=np.float32))
    n_obj = min(OBJECT_PATCHES, patches)
    tmp = path.with_suffix(".tmp.npy")
    mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n * patches, dim))
    del mm  # header written, file sized; the data goes in with plain writes (no RSS)
    header, _, _ = _npy_header_size(tmp)
    t0 = time.perf_counter()
    with open(tmp, "r+b") as f:
        f.seek(header)
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            cl = cluster_of[start:start + m]
            x = np.empty((m, patches, dim), dtype=np.float32)
            pick = rng.integers(0, OBJECT_POOL, (m, n_obj))
            s = rng.uniform(*object_noise, (m, 1, 1)).astype(np.float32)
            x[:, :n_obj] = objects[cl[:, None], pick]
            x[:, :n_obj] += (s / np.sqrt(dim)) * rng.standard_normal((m, n_obj, dim), dtype=np.float32)
            if patches > n_obj:
                bg = rng.integers(0, BACKGROUND_POOL, (m, patches - n_obj))
                x[:, n_obj:] = background[bg]
                x[:, n_obj:] += (BACKGROUND_NOISE / np.sqrt(dim)) * rng.standard_normal(
                    (m, patches - n_obj, dim), dtype=np.float32)
            _normalise(x)
            f.write(x.astype(np.float16).tobytes())
            if log and (start // chunk) % 10 == 0:
                log(f"  generated {start + m:,}/{n:,} images ({time.perf_counter() - t0:.0f} s)")
    os.replace(tmp, path)


def read_rows(f, header: int, row_bytes: int, start: int, count: int, dim: int) -> np.ndarray:
    """Rows [start, start+count) of the float16 .npy by a plain read (page cache, not RSS)."""
    f.seek(header + start * row_bytes)
    buf = f.read(count * row_bytes)
    return np.frombuffer(buf, dtype=np.float16).reshape(count, dim)


def training_sample(path: Path, n: int, patches: int, dim: int, size: int, seed: int) -> np.ndarray:
    """All patches of ~size/patches random images, read with pread (no memmap: scattered
    row reads through the memmap would fault most of the file into this process's RSS)."""
    rng = np.random.default_rng(seed + 2)
    n_img = max(1, min(n, -(-size // patches)))
    images = np.sort(rng.choice(n, n_img, replace=False))
    header, _, _ = _npy_header_size(path)
    nbytes = patches * dim * 2
    out = np.empty((n_img * patches, dim), dtype=np.float32)
    fd = os.open(path, os.O_RDONLY)
    try:
        for j, i in enumerate(images.tolist()):
            buf = os.pread(fd, nbytes, header + i * nbytes)
            out[j * patches:(j + 1) * patches] = np.frombuffer(buf, np.float16).reshape(patches, dim)
    finally:
        os.close(fd)
    return out


def make_queries(db3: np.ndarray, n_queries: int, seed: int,
                 noise: float = QUERY_NOISE) -> tuple[np.ndarray, np.ndarray]:
    """Perturbed copies of random database images: (planted ids [Q], queries [Q, P, d] f32)."""
    rng = np.random.default_rng(seed + 1)
    n, p, d = db3.shape
    planted = rng.choice(n, size=n_queries, replace=n_queries > n)
    q = db3[planted].astype(np.float32)
    q += (noise / np.sqrt(d)) * rng.standard_normal(q.shape, dtype=np.float32)
    return planted.astype(np.int64), _normalise(q)


# ----------------------------------------------------------------------------- exact
def exact_topk(path: Path, queries: np.ndarray, n: int, patches: int, dim: int, chunk: int,
               log) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-10 over ALL images for each query (kernel, streaming the .npy)."""
    nq = len(queries)
    qcat = np.ascontiguousarray(queries.reshape(-1, dim))
    qoff = np.arange(nq + 1, dtype=np.int64) * patches
    best_d = np.full((nq, 0), np.inf, dtype=np.float32)
    best_i = np.zeros((nq, 0), dtype=np.int64)
    header, _, _ = _npy_header_size(path)
    row_bytes = dim * 2
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            db = read_rows(f, header, row_bytes, start * patches, m * patches, dim)
            offsets = np.arange(m + 1, dtype=np.int64) * patches
            dist = kernel.patch_distances_batch(qcat, qoff, db, offsets)  # [nq, m]
            ids = np.broadcast_to(np.arange(start, start + m, dtype=np.int64), dist.shape)
            all_d = np.concatenate([best_d, dist], axis=1)
            all_i = np.concatenate([best_i, ids], axis=1)
            keep = min(TOP, all_d.shape[1])
            top = np.argpartition(all_d, keep - 1, axis=1)[:, :keep]
            best_d = np.take_along_axis(all_d, top, 1)
            best_i = np.take_along_axis(all_i, top, 1)
            if log and (start // chunk) % 20 == 0:
                log(f"  exact: {start + m:,}/{n:,} images ({time.perf_counter() - t0:.0f} s)")
    order = np.lexsort((best_i, best_d), axis=1)
    return np.take_along_axis(best_i, order, 1), np.take_along_axis(best_d, order, 1)


# ----------------------------------------------------------------------------- search
class PreadFetcher:
    """Candidate images' rows by one pread each straight into the output buffer: the same
    bytes as the memmap gather, but the page cache is not mapped into this process (the
    memmap gather's fault-around maps ~64 KiB per fault, so over many queries most of the
    file shows up as file-backed RSS -- clean and reclaimable, but it inflates ru_maxrss)."""

    def __init__(self, path: Path, patches: int, dim: int) -> None:
        self.header, _, _ = _npy_header_size(path)
        self.fd = os.open(path, os.O_RDONLY)
        self.patches, self.dim = patches, dim
        self.nbytes = patches * dim * 2

    def __call__(self, cands: np.ndarray) -> np.ndarray:
        rows = np.empty((len(cands) * self.patches, self.dim), dtype=np.float16)
        buf = memoryview(rows).cast("B")
        nb, h, fd = self.nbytes, self.header, self.fd
        for j, c in enumerate(cands.tolist()):
            os.preadv(fd, [buf[j * nb:(j + 1) * nb]], h + c * nb)
        return rows


def search_one(q: np.ndarray, ann: VectorIndex, db3: np.ndarray, patches: int,
               per_patch: int, fetch=None) -> tuple[np.ndarray, float, float, float, int]:
    """One query end to end: (top-10 image ids, faiss s, fetch s, kernel s, #candidates)."""
    t0 = time.perf_counter()
    cands = candidate_images(q, ann, patches, per_patch)  # sorted: the file is read forwards
    t1 = time.perf_counter()
    if fetch is None:
        rows = db3[cands].reshape(-1, db3.shape[2])  # memmap gather: float16 [m*P, d]
    else:
        rows = fetch(cands)
    t2 = time.perf_counter()
    offsets = np.arange(len(cands) + 1, dtype=np.int64) * patches
    dist, _, _ = kernel.patch_distances(q, rows, offsets)
    top = top_k(dist, cands, TOP)
    t3 = time.perf_counter()
    return cands[top], t1 - t0, t2 - t1, t3 - t2, len(cands)


def sweep(queries, planted, exact_ids, ann, db3, patches, nprobes, per_patches, log, fetch=None):
    rows = []
    n_exact = len(exact_ids)
    for nprobe in nprobes:
        ann.nprobe = nprobe
        for per_patch in per_patches:
            # one warm-up query (thread pools, first touch of the lists)
            search_one(queries[0], ann, db3, patches, per_patch, fetch)
            lat, tf, tg, tk, nc, rec, hit1 = [], [], [], [], [], [], []
            for i, q in enumerate(queries):
                top, a, b, c, m = search_one(q, ann, db3, patches, per_patch, fetch)
                lat.append(a + b + c)
                tf.append(a)
                tg.append(b)
                tk.append(c)
                nc.append(m)
                hit1.append(len(top) > 0 and top[0] == planted[i])
                if i < n_exact:
                    rec.append(len(np.intersect1d(top, exact_ids[i])) / TOP)
            ms = np.array(lat) * 1e3
            row = {
                "nprobe": nprobe,
                "per_patch": per_patch,
                "queries": len(queries),
                "p50_ms": round(float(np.percentile(ms, 50)), 2),
                "p95_ms": round(float(np.percentile(ms, 95)), 2),
                "mean_ms": round(float(ms.mean()), 2),
                "faiss_ms": round(float(np.mean(tf) * 1e3), 2),
                "fetch_ms": round(float(np.mean(tg) * 1e3), 2),
                "kernel_ms": round(float(np.mean(tk) * 1e3), 2),
                "candidates": round(float(np.mean(nc)), 1),
                "recall@10": round(float(np.mean(rec)), 4) if rec else None,
                "planted_top1": round(float(np.mean(hit1)), 4),
            }
            rows.append(row)
            log(_fmt_row(row))
    return rows


HEADER = (f"{'nprobe':>6} {'per-patch':>9} {'p50 ms':>8} {'p95 ms':>8} {'faiss':>7} {'fetch':>7} "
          f"{'kernel':>7} {'cands':>7} {'R@10':>6} {'top1':>6}")


def _fmt_row(r: dict) -> str:
    rec = "-" if r["recall@10"] is None else f"{r['recall@10']:.3f}"
    return (f"{r['nprobe']:>6} {r['per_patch']:>9} {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} "
            f"{r['faiss_ms']:>7.1f} {r['fetch_ms']:>7.1f} {r['kernel_ms']:>7.1f} "
            f"{r['candidates']:>7.0f} {rec:>6} {r['planted_top1']:>6.3f}")


def choose(rows: list[dict], goal_ms: float) -> dict:
    """Best recall among the settings meeting the p50 goal (then the fastest); else fastest."""
    ok = [r for r in rows if r["p50_ms"] < goal_ms and r["recall@10"] is not None]
    if ok:
        return max(ok, key=lambda r: (r["recall@10"], -r["p50_ms"]))
    return min(rows, key=lambda r: r["p50_ms"])


# ----------------------------------------------------------------------------- main
def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scale.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring for the design.")
    p.add_argument("--images", type=int, required=True, help="database images N")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--patches", type=int, default=30, help="patches per image")
    p.add_argument("--factory", default="IVF1024,PQ32x4fs", help="FAISS index-factory string")
    p.add_argument("--train-size", type=int, default=262_144, help="training vectors (sampled)")
    p.add_argument("--nprobe", default="4,8,16,32", help="comma list of nprobe values")
    p.add_argument("--per-patch", default="32,64", help="comma list: FAISS neighbours per query patch")
    p.add_argument("--queries", type=int, default=200, help="latency queries")
    p.add_argument("--exact-queries", type=int, default=20, help="queries scored against exact search")
    p.add_argument("--cluster-size", type=int, default=20, help="images per synthetic scene")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--object-noise", default=",".join(map(str, OBJECT_NOISE)), metavar="LO,HI",
                   help="per-image object-patch noise range (larger = harder: scene mates move "
                        "out towards the background-sharing images)")
    p.add_argument("--query-noise", type=float, default=QUERY_NOISE)
    p.add_argument("--chunk", type=int, default=20_000, help="images per generation/exact chunk")
    p.add_argument("--add-chunk", type=int, default=1_000_000, help="vectors per index.add call")
    p.add_argument("--fetch", choices=("mmap", "pread"), default="pread",
                   help="how candidate rows are read from vectors.npy (see PreadFetcher)")
    p.add_argument("--goal-ms", type=float, default=100.0)
    p.add_argument("--workdir", default=None, help="data/index directory (default: a temp dir)")
    p.add_argument("--rebuild", action="store_true", help="regenerate data and index")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON")
    p.add_argument("--quiet", action="store_true")
    return p


def _machine() -> dict:
    model = platform.processor()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cpu": model, "cores": os.cpu_count(), "load_avg": [round(x, 2) for x in os.getloadavg()],
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "faiss": faiss.__version__, "faiss_threads": faiss.omp_get_max_threads(),
            "kernel": kernel.describe(), "numpy": np.__version__}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    if args.images < 1 or args.patches < 1 or args.dim < 1:
        raise SystemExit("--images, --patches and --dim must be >= 1")
    import tempfile
    tmpdir = None
    if args.workdir is None:
        tmpdir = tempfile.TemporaryDirectory(prefix="scale-")
        workdir = Path(tmpdir.name)
    else:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    n, P, d = args.images, args.patches, args.dim
    result: dict = {"images": n, "patches": P, "dim": d, "vectors": n * P, "factory": args.factory,
                    "machine": _machine(), "argv": sys.argv if argv is None else argv}
    sampler = MemorySampler()
    with sampler:
        # -- data
        data = workdir / "vectors.npy"
        data_meta = {"images": n, "patches": P, "dim": d, "cluster_size": args.cluster_size,
                     "seed": args.seed, "generator": 1}
        object_noise = tuple(float(x) for x in args.object_noise.split(","))
        if len(object_noise) != 2 or not 0 <= object_noise[0] <= object_noise[1]:
            raise SystemExit("--object-noise must be LO,HI with 0 <= LO <= HI")
        if object_noise != OBJECT_NOISE:  # (only when not the default: older workdirs stay valid)
            data_meta["object_noise"] = list(object_noise)
        meta_path = workdir / "meta.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        if args.rebuild or meta.get("data") != data_meta or not data.exists():
            log(f"generating {n:,} images x {P} patches x {d} (float16 -> {data})")
            t0 = time.perf_counter()
            generate(data, n, P, d, args.cluster_size, args.seed, args.chunk, log, object_noise)
            meta = {"data": data_meta, "generate_s": round(time.perf_counter() - t0, 1)}
            meta_path.write_text(json.dumps(meta))
        result["generate_s"] = meta.get("generate_s")
        result["raw_bytes"] = data.stat().st_size
        db = np.load(data, mmap_mode="r")  # [N*P, d] float16, file-backed
        db3 = db.reshape(n, P, d)

        # -- index
        index_path = workdir / "faiss.index"
        index_meta = {"factory": args.factory, "train_size": args.train_size}
        if args.rebuild or meta.get("index") != index_meta or not index_path.exists():
            ann = VectorIndex(d, args.factory, device="cpu")
            train = training_sample(data, n, P, d, args.train_size, args.seed)
            n_train = len(train)
            log(f"training {args.factory} on {n_train:,} vectors")
            t0 = time.perf_counter()
            ann.index.train(train)
            train_s = time.perf_counter() - t0
            del train
            log(f"  train {train_s:.1f} s; adding {n * P:,} vectors")
            header, _, _ = _npy_header_size(data)
            t0 = time.perf_counter()
            with open(data, "rb") as f:
                for start in range(0, n * P, args.add_chunk):
                    m = min(args.add_chunk, n * P - start)
                    ann.add(read_rows(f, header, d * 2, start, m, d).astype(np.float32))
                    log(f"  added {start + m:,}/{n * P:,} ({time.perf_counter() - t0:.0f} s)")
            add_s = time.perf_counter() - t0
            ann.save(index_path)
            meta.update(index=index_meta, train_s=round(train_s, 1), add_s=round(add_s, 1),
                        build_peak_rss=ru_maxrss(), build_peak_anon=sampler.peak_anon)
            meta_path.write_text(json.dumps(meta))
        else:
            log(f"reusing {index_path}")
            ann = VectorIndex.load(index_path, args.factory, device="cpu")
        result.update(train_s=meta["train_s"], add_s=meta["add_s"],
                      index_bytes=index_path.stat().st_size,
                      index_bytes_per_vector=round(index_path.stat().st_size / (n * P), 2),
                      build_peak_rss_gib=round(meta["build_peak_rss"] / GIB, 3),
                      build_peak_anon_gib=round(meta["build_peak_anon"] / GIB, 3))
        log(f"index: {result['index_bytes'] / 1e9:.3f} GB ({result['index_bytes_per_vector']} B/vector); "
            f"train {result['train_s']} s, add {result['add_s']} s")

        # -- queries and ground truth
        planted, queries = make_queries(db3, args.queries, args.seed, args.query_noise)
        n_exact = min(args.exact_queries, args.queries)
        gt_path = workdir / "exact.npz"
        gt_key = json.dumps({"data": data_meta, "queries": args.queries, "exact": n_exact}
                            | ({"query_noise": args.query_noise} if args.query_noise != QUERY_NOISE else {}))
        if not args.rebuild and gt_path.exists() and str(np.load(gt_path)["key"]) == gt_key:
            gt = np.load(gt_path)
            exact_ids, exact_d, exact_s = gt["ids"], gt["dist"], float(gt["seconds"])
        else:
            log(f"exact search of {n_exact} queries over all {n:,} images")
            t0 = time.perf_counter()
            exact_ids, exact_d = exact_topk(data, queries[:n_exact], n, P, d, args.chunk, log)
            exact_s = time.perf_counter() - t0
            np.savez(gt_path, ids=exact_ids, dist=exact_d, seconds=exact_s, key=gt_key)
        result["exact_s_per_query"] = round(exact_s / max(n_exact, 1), 3)
        result["exact_planted_top1"] = round(float(np.mean(exact_ids[:, 0] == planted[:n_exact])), 4)
        result["exact_top10_distance_mean"] = [round(float(x), 4) for x in exact_d.mean(0)]

        # -- sweep
        result["machine"]["load_avg_before_search"] = [round(x, 2) for x in os.getloadavg()]
        log(f"search: {args.queries} queries, recall@10 on the first {n_exact} (load {os.getloadavg()[0]:.2f})")
        log(HEADER)
        fetch = PreadFetcher(data, P, d) if args.fetch == "pread" else None
        result["fetch"] = args.fetch
        rows = sweep(queries, planted, exact_ids, ann, db3, P, _ints(args.nprobe),
                     _ints(args.per_patch), log, fetch)
        result["machine"]["load_avg_after_search"] = [round(x, 2) for x in os.getloadavg()]
    result["table"] = rows
    result["chosen"] = choose(rows, args.goal_ms)
    result["goal_met"] = bool(result["chosen"]["p50_ms"] < args.goal_ms)
    result["peak_rss_gib"] = round(ru_maxrss() / GIB, 3)  # includes file-backed memmap pages
    result["peak_anon_rss_gib"] = round(sampler.peak_anon / GIB, 3)
    result["peak_file_rss_gib"] = round(sampler.peak_file / GIB, 3)
    c = result["chosen"]
    log(f"chosen: nprobe={c['nprobe']} per-patch={c['per_patch']}: p50 {c['p50_ms']} ms, "
        f"p95 {c['p95_ms']} ms, recall@10 {c['recall@10']}; goal p50 < {args.goal_ms:g} ms "
        f"{'met' if result['goal_met'] else 'NOT met'}")
    log(f"peak RSS {result['peak_rss_gib']} GiB (anon {result['peak_anon_rss_gib']}, "
        f"file-backed {result['peak_file_rss_gib']})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if tmpdir is not None:
        del db, db3
        tmpdir.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
