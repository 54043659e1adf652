#!/usr/bin/env python
"""FastPLAID (`fast-plaid` on PyPI, device="cpu") as the peer of the engine's multi-vector search.

    python benchmarks/fastplaid_peer.py --setup                   # once: venv + fast-plaid (+ the torch it pins)
    python benchmarks/fastplaid_peer.py --data D.npz --json O.json [--queries 100] [--threads 2]
    python benchmarks/fastplaid_peer.py --synthetic 2000 --dim 128 --json O.json   # self-check

FastPLAID pins its own torch, so it lives in a virtual environment of its own,
`benchmarks/.cache/fastplaid-venv` (git-ignored; `--venv DIR` or $FASTPLAID_PEER_VENV
override). `--setup` creates it (or reuses it) and pip-installs fast-plaid there; it is
the only mode that downloads anything (~5 GB: the pinned torch is the CUDA build). Any
other run can be started with any python: when `fast_plaid` is not importable, the script
re-executes itself with the venv's python, or exits with status 3 and a message saying to
run `--setup` when the venv is missing.

How benchmarks/index_scale.py (or any caller) uses it -- three steps, no import:
  1. write the data with `np.savez(path, docs=..., queries=..., truth=...)` (plain savez,
     not savez_compressed: stored members are memory-mapped instead of read into RAM);
  2. run `subprocess.run([sys.executable, "benchmarks/fastplaid_peer.py", "--data", path,
     "--json", out, "--threads", "2", *peer_params])` -- status 0: done; status 3: the venv
     is missing (report the peer as "not set up" and go on); anything else: a failure, its
     stderr says why;
  3. `json.load(open(out))` and put the dict next to the engine's numbers (same keys:
     build_s, peak_rss_gib, p50_ms, p95_ms, recall@10).

Data (`--data FILE.npz`):
  docs    float16/float32 [n_docs, P, d]  unit-norm window vectors of each image; converted
                                          to float16 (what FastPLAID works in) if needed
  queries float16/float32 [n_q, Pq, d]    unit-norm query windows (no all-zero rows:
                                          FastPLAID trims trailing zero rows as padding)
  truth   int64 [n_q, >=10]               exact top doc indices by the engine's kernel,
                                          best first
Doc i of the npz is FastPLAID document id i.

Measured (one process, after the data is loaded):
  build_s        `FastPlaid.create(...)` (k-means centroids + residual compression +
                 IVF, written to --index-dir), wall seconds;
  latency        every query searched alone (`search` with one query, n_processes=1),
                 after one untimed warm-up query that also loads the index
                 (`first_query_ms`); p50 / p95 / mean ms;
  cpu            build_cpu_s and cpu_ms_per_query: user + system CPU seconds of the
                 process (all threads) -- steadier than wall time on a shared machine;
  recall@10      mean over queries of |FastPLAID top-10 ∩ truth top-10| / 10;
  memory         peak_rss_gib = the process's peak RSS over load + build + search
                 (ru_maxrss, combined with the per-phase high-water marks below, since
                 resetting VmHWM also lowers ru_maxrss); build_peak_rss_gib and
                 build_rss_delta_gib (the build's own increase over the RSS before it),
                 search_peak_rss_gib (after the docs are dropped and malloc_trim: about
                 the serving footprint, torch runtime and its ~0.5 GiB of mapped libraries
                 included) -- phases are separated by resetting the kernel's
                 RSS high-water mark (/proc/self/clear_refs "5"); a 50 ms sampler gives the
                 anonymous / file-backed split (FastPLAID memory-maps its index files).
                 All of these include the ~0.8 GiB that importing the pinned (CUDA) torch
                 maps, and peak_rss_gib the loaded data (with --synthetic: its generation).

Metric note: the truth ranks by the mean over query windows of the min Euclidean distance;
FastPLAID ranks by ColBERT MaxSim (sum over query windows of the max inner product). For
unit vectors each window's min distance is sqrt(2 - 2 max-sim), so the two agree window by
window, but the mean of square roots is not a monotone function of the sum, and the image
rankings differ (on the synthetic data exact MaxSim finds ~95% of the truth's top-10,
the rest are near ties among the planted near-duplicates). `--synthetic` (and `--exact-maxsim` on --data) therefore also
reports `exact_maxsim_recall@10`: the recall of *exact* MaxSim against the truth, the
ceiling for any MaxSim engine on that data, and `recall_vs_exact_maxsim@10`: FastPLAID's
top-10 against exact MaxSim, i.e. the loss from its own approximation (centroid pruning,
nbits residual compression) alone.

`--synthetic N`: N images in scenes of `--group-size` (20) planted near-duplicates: each
scene has 20 object prototypes, an image draws 2/3 of its P windows from its scene's
prototypes (noise per image in [0.25, 0.6]) and the rest from 512 background prototypes
shared by all images (noise 0.9); a query is a random image with every window re-perturbed
(noise 0.2). The truth is computed exactly with numpy (float32 on the float16 data, ties
by index). `--data FILE` with `--synthetic` keeps the generated npz there. With
`--synthetic` the result also says how FastPLAID's ranking treats each query's planted
image (`planted_top1`, `planted_in_top10`) and its scene (`same_scene@10`, the share of
the top 10 from it), and the same for the truth (`truth_...`) and exact MaxSim
(`exact_maxsim_...`): exact rankings score 1 on all three, while guessing inside the
right scene scores 1 on `same_scene@10` only, with recall@10 about 0.5.

Threads: --threads (default 2, for the shared 2-core machine) sets torch's intra-op
threads, OMP/MKL/OpenBLAS and RAYON_NUM_THREADS (FastPLAID's Rust side uses rayon) before
torch is imported; OMP_WAIT_POLICY=PASSIVE as in retrieval/__init__.py.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
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
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VENV = ROOT / "benchmarks" / ".cache" / "fastplaid-venv"
REEXEC_MARK = "FASTPLAID_PEER_REEXEC"
EXIT_NO_VENV = 3
GIB = 1024 ** 3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setup", action="store_true",
                   help="create/reuse the venv, pip-install fast-plaid, print its version, exit")
    p.add_argument("--spec", default="fast-plaid",
                   help="pip requirement installed by --setup (e.g. 'fast-plaid==1.7.0.2110')")
    p.add_argument("--venv", type=Path,
                   default=Path(os.environ.get("FASTPLAID_PEER_VENV", DEFAULT_VENV)),
                   help=f"the peer's virtual environment (default {DEFAULT_VENV.relative_to(ROOT)})")
    p.add_argument("--data", type=Path, metavar="FILE.npz", help="docs / queries / truth (see above)")
    p.add_argument("--synthetic", type=int, metavar="N",
                   help="generate N synthetic images (+ queries, exact truth) instead of --data")
    p.add_argument("--patches", type=int, default=30, help="--synthetic: windows per image (P)")
    p.add_argument("--dim", type=int, default=128, help="--synthetic: dimension d")
    p.add_argument("--group-size", type=int, default=20, help="--synthetic: images per planted scene")
    p.add_argument("--synthetic-queries", type=int, default=100, help="--synthetic: number of queries")
    p.add_argument("--seed", type=int, default=0, help="--synthetic: data seed")
    p.add_argument("--queries", type=int, metavar="N", help="use only the first N queries (default all)")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--exact-maxsim", action="store_true",
                   help="also compute exact MaxSim top-k with numpy (always on with --synthetic)")
    # FastPlaid.create(...) -- defaults are the library's own (fast-plaid 1.7)
    p.add_argument("--nbits", type=int, default=4, help="create(nbits): bits per residual dimension")
    p.add_argument("--kmeans-niters", type=int, default=4, help="create(kmeans_niters)")
    p.add_argument("--max-points-per-centroid", type=int, default=256,
                   help="create(max_points_per_centroid)")
    p.add_argument("--n-samples-kmeans", type=int, default=None,
                   help="create(n_samples_kmeans): documents sampled for k-means (default: library heuristic)")
    p.add_argument("--build-batch-size", type=int, default=25_000, help="create(batch_size)")
    p.add_argument("--build-seed", type=int, default=42, help="create(seed)")
    # FastPlaid.search(...)
    p.add_argument("--n-ivf-probe", type=int, default=8, help="search(n_ivf_probe): centroids probed per query token")
    p.add_argument("--n-full-scores", type=int, default=4096,
                   help="search(n_full_scores): candidates re-scored with decompressed vectors")
    p.add_argument("--search-batch-size", default="auto",
                   help="search(batch_size): documents per scoring chunk, or 'auto'")
    p.add_argument("--index-dir", type=Path, help="where the index is written (default: a temp dir, removed)")
    p.add_argument("--threads", type=int, default=2, help="torch / OpenMP / rayon threads")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the results here")
    p.add_argument("--quiet", action="store_true")
    return p


# ----------------------------------------------------------------------------- venv
def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def setup(venv: Path, spec: str) -> int:
    py = venv_python(venv)
    if not py.exists():
        print(f"creating {venv}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    have = subprocess.run([str(py), "-c", "import fast_plaid"], check=False, capture_output=True).returncode == 0
    if not have or spec != "fast-plaid":
        print(f"pip install {spec} (pulls the torch it pins)", flush=True)
        subprocess.run([str(py), "-m", "pip", "install", spec], check=True)
    out = subprocess.run(
        [str(py), "-c", "import importlib.metadata as m; print(m.version('fast-plaid'), m.version('torch'))"],
        capture_output=True, text=True, check=True).stdout.split()
    print(f"fast-plaid {out[0]} (torch {out[1]}) in {venv}")
    return 0


def ensure_fast_plaid(venv: Path) -> None:
    """Return if fast_plaid imports here; else re-exec in the venv or exit(3)."""
    if importlib.util.find_spec("fast_plaid") is not None:
        return
    py = venv_python(venv)
    if os.environ.get(REEXEC_MARK) or not py.exists():
        why = ("is not importable inside it" if os.environ.get(REEXEC_MARK)
               else f"is not importable by {sys.executable} and {venv} does not exist")
        print(f"fastplaid_peer: fast-plaid {why}.\n"
              f"Run `python {Path(__file__).relative_to(ROOT) if Path(__file__).is_relative_to(ROOT) else __file__}"
              f" --setup` first (creates the venv and downloads fast-plaid and the torch it pins).",
              file=sys.stderr)
        raise SystemExit(EXIT_NO_VENV)
    os.environ[REEXEC_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(str(py), [str(py), str(Path(__file__).resolve()), *sys.argv[1:]])


def set_thread_env(threads: int) -> None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"):
        os.environ[var] = str(threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# ----------------------------------------------------------------------------- memory
def proc_status() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS", "RssAnon", "RssFile", "VmHWM")):
                    k, v = line.split(":")
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def ru_maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def cpu_s() -> float:
    """User + system CPU seconds of this process (all threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM, and with it ru_maxrss) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def malloc_trim() -> None:
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Phase:
    """Peak RSS of a phase: VmHWM after a reset (exact), plus a sampler (anon/file split)."""

    def __init__(self, period: float = 0.05) -> None:
        self.period = period
        self.start_rss = 0
        self.peak_rss = self.peak_anon = self.peak_file = 0
        self.exact = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        s = proc_status()
        self.peak_rss = max(self.peak_rss, s.get("VmRSS", 0))
        self.peak_anon = max(self.peak_anon, s.get("RssAnon", 0))
        self.peak_file = max(self.peak_file, s.get("RssFile", 0))

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._sample()

    def __enter__(self) -> Phase:
        self.exact = reset_hwm()
        self.start_rss = proc_status().get("VmRSS", 0)
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        if self.exact:
            self.peak_rss = max(self.peak_rss, proc_status().get("VmHWM", 0))


# ----------------------------------------------------------------------------- data
def _normalise(x):
    import numpy as np
    x /= np.linalg.norm(x, axis=-1, keepdims=True).astype(x.dtype)
    return x


def load_npz(path: Path) -> dict:
    """The npz's arrays; members stored uncompressed are memory-mapped (copy-on-write)."""
    import numpy as np
    out = {}
    with zipfile.ZipFile(path) as zf:
        infos = {i.filename[:-4]: i for i in zf.infolist() if i.filename.endswith(".npy")}
    with open(path, "rb") as f:
        for name, info in infos.items():
            if info.compress_type == zipfile.ZIP_STORED:
                f.seek(info.header_offset)
                local = f.read(30)
                n_name, n_extra = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
                start = info.header_offset + 30 + n_name + n_extra
                f.seek(start)
                version = np.lib.format.read_magic(f)
                read = {(1, 0): np.lib.format.read_array_header_1_0,
                        (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                shape, fortran, dtype = read(f) if read else ((), True, None)
                if not fortran and not dtype.hasobject:
                    out[name] = np.memmap(path, dtype=dtype, mode="c", offset=f.tell(), shape=shape)
                    continue
            with np.load(path) as z:
                out[name] = z[name]
    return out


def synthetic(n: int, patches: int, dim: int, group: int, n_queries: int, seed: int) -> dict:
    """Planted near-duplicate scenes (see the module docstring); docs float16."""
    import numpy as np
    rng = np.random.default_rng(seed)
    n_groups = max(1, n // group)
    group_of = rng.permutation(np.arange(n) % n_groups)
    objects = _normalise(rng.standard_normal((n_groups, 20, dim), dtype=np.float32))
    background = _normalise(rng.standard_normal((512, dim), dtype=np.float32))
    n_obj = max(1, (2 * patches) // 3)
    docs = np.empty((n, patches, dim), dtype=np.float16)
    for s in range(0, n, 4096):
        m = min(4096, n - s)
        x = np.empty((m, patches, dim), dtype=np.float32)
        x[:, :n_obj] = objects[group_of[s:s + m, None], rng.integers(0, 20, (m, n_obj))]
        noise = rng.uniform(0.25, 0.6, (m, 1, 1)).astype(np.float32) / np.sqrt(dim)
        x[:, :n_obj] += noise * rng.standard_normal((m, n_obj, dim), dtype=np.float32)
        if patches > n_obj:
            x[:, n_obj:] = background[rng.integers(0, 512, (m, patches - n_obj))]
            x[:, n_obj:] += (0.9 / np.sqrt(dim)) * rng.standard_normal((m, patches - n_obj, dim), dtype=np.float32)
        docs[s:s + m] = _normalise(x)
    planted = rng.choice(n, size=min(n_queries, n), replace=False)
    q = docs[planted].astype(np.float32)
    q += (0.2 / np.sqrt(dim)) * rng.standard_normal(q.shape, dtype=np.float32)
    queries = _normalise(q).astype(np.float16)
    dist, maxsim = exact_scores(docs, queries)
    truth = np.argsort(dist, axis=1, kind="stable")[:, :10].astype(np.int64)
    return {"docs": docs, "queries": queries, "truth": truth, "planted": planted.astype(np.int64),
            "scene": group_of.astype(np.int64), "maxsim": maxsim}


def planted_hits(found, planted, scene, k: int, prefix: str = "") -> dict:
    """How a ranking (`found[i]`: doc ids, best first, for query i) treats query i's planted
    image `planted[i]` and its scene (`scene[doc]`): the share of queries whose planted
    image comes first and in the top k, and the mean share of the top k from its scene.
    On the synthetic data any sound ranking scores about 1 on all three; ranking at
    random within the right scene still scores 1 on the last one only."""
    import numpy as np
    found = [list(map(int, f)) for f in found]
    planted = np.asarray(planted)[:len(found)]
    scene = np.asarray(scene)
    return {
        f"{prefix}planted_top1": round(float(np.mean([f[:1] == [int(p)] for f, p in zip(found, planted)])), 4),
        f"{prefix}planted_in_top{k}": round(float(np.mean([int(p) in f[:k] for f, p in zip(found, planted)])), 4),
        f"{prefix}same_scene@{k}": round(float(np.mean(
            [np.sum(scene[f[:k]] == scene[p]) / k if f else 0.0 for f, p in zip(found, planted)])), 4),
    }


def exact_scores(docs, queries, chunk: int = 512):
    """(mean-of-min Euclidean distance, MaxSim score), each [n_q, n_docs] float32."""
    import numpy as np
    n, p, d = docs.shape
    nq, pq, _ = queries.shape
    qf = np.ascontiguousarray(queries, dtype=np.float32).reshape(nq * pq, d)
    dist = np.empty((nq, n), dtype=np.float32)
    maxsim = np.empty((nq, n), dtype=np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        block = np.asarray(docs[s:s + m], dtype=np.float32).reshape(m * p, d)
        best = (qf @ block.T).reshape(nq, pq, m, p).max(axis=3)  # [nq, pq, m]
        maxsim[:, s:s + m] = best.sum(axis=1)
        dist[:, s:s + m] = np.sqrt(np.maximum(2.0 - 2.0 * best, 0.0)).mean(axis=1)
    return dist, maxsim


def machine() -> dict:
    model = platform.processor()
    try:
        out = subprocess.run(["lscpu"], check=False, capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cpu": model, "cores": os.cpu_count(),
            "available_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "load_avg": [round(x, 2) for x in os.getloadavg()]}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def recall(found: list[list[int]], truth, k: int) -> float:
    return sum(len(set(f[:k]) & {int(t) for t in truth[i, :k]}) / k for i, f in enumerate(found)) / len(found)


# ----------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> dict:
    import importlib.metadata as md

    import numpy as np
    import torch

    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(args.threads)
    except RuntimeError:
        pass
    from fast_plaid import search as fp_search

    t0 = time.perf_counter()
    extra: dict = {}
    if args.synthetic:
        data = synthetic(args.synthetic, args.patches, args.dim, args.group_size,
                         args.synthetic_queries, args.seed)
        extra["synthetic"] = {"images": args.synthetic, "group_size": args.group_size, "seed": args.seed,
                              "generate_s": round(time.perf_counter() - t0, 2)}
        if args.data:
            np.savez(args.data, docs=data["docs"], queries=data["queries"], truth=data["truth"])
        log(f"generated {args.synthetic} images + {len(data['queries'])} queries in {time.perf_counter() - t0:.1f} s")
    else:
        data = load_npz(args.data)
    for key in ("docs", "queries", "truth"):
        if key not in data:
            raise SystemExit(f"{args.data}: no array named {key!r}")
    docs, queries, truth = data["docs"], data["queries"], np.asarray(data["truth"])
    if docs.ndim != 3 or queries.ndim != 3 or queries.shape[2] != docs.shape[2]:
        raise SystemExit(f"bad shapes: docs {docs.shape}, queries {queries.shape} (want [n,P,d], [q,Pq,d])")
    nq = len(queries) if args.queries is None else min(args.queries, len(queries))
    if truth.ndim != 2 or len(truth) < nq:
        raise SystemExit(f"bad truth shape {truth.shape} for {nq} queries")
    if truth.size and (truth.min() < 0 or truth.max() >= len(docs)):
        raise SystemExit(f"truth holds doc indices outside [0, {len(docs)})")
    k = min(args.top_k, truth.shape[1])
    queries = np.asarray(queries[:nq], dtype=np.float16)
    truth = truth[:nq]
    n_docs, p, d = docs.shape
    if docs.dtype != np.float16:
        docs = docs.astype(np.float16)
    maxsim_top = None
    if args.synthetic or args.exact_maxsim:
        t = time.perf_counter()
        maxsim = data["maxsim"][:nq] if "maxsim" in data else exact_scores(docs, queries)[1]
        maxsim_top = np.argsort(-maxsim, axis=1, kind="stable")[:, :k]
        extra[f"exact_maxsim_recall@{k}"] = round(recall(maxsim_top.tolist(), truth, k), 4)
        if "maxsim" not in data:
            extra["exact_maxsim_s"] = round(time.perf_counter() - t, 2)
        if "planted" in data:
            extra["truth_planted_top1"] = round(float(np.mean(truth[:, 0] == data["planted"][:nq])), 4)
            if "scene" in data:
                extra.update(planted_hits(truth.tolist(), data["planted"], data["scene"], k, "truth_"))
                extra.update(planted_hits(maxsim_top.tolist(), data["planted"], data["scene"], k, "exact_maxsim_"))
        del maxsim
    doc_list = list(torch.from_numpy(docs).unbind(0))  # views, no copy
    peak_before = max(ru_maxrss(), proc_status().get("VmHWM", 0))
    log(f"data: {n_docs} docs x {p} x {d}, {nq} queries (RSS {proc_status().get('VmRSS', 0) / GIB:.2f} GiB)")

    tmp_index = args.index_dir is None
    index_dir = Path(tempfile.mkdtemp(prefix="fastplaid-index-")) if tmp_index else args.index_dir
    index_dir.mkdir(parents=True, exist_ok=True)
    search_batch = args.search_batch_size if args.search_batch_size == "auto" else int(args.search_batch_size)
    try:
        with Phase() as build:
            fp = fp_search.FastPlaid(index=str(index_dir), device="cpu")
            t, c = time.perf_counter(), cpu_s()
            fp.create(documents_embeddings=doc_list, kmeans_niters=args.kmeans_niters,
                      max_points_per_centroid=args.max_points_per_centroid, nbits=args.nbits,
                      n_samples_kmeans=args.n_samples_kmeans, batch_size=args.build_batch_size,
                      seed=args.build_seed)
            build_s, build_cpu = time.perf_counter() - t, cpu_s() - c
        log(f"build {build_s:.1f} s (peak RSS {build.peak_rss / GIB:.2f} GiB)")
        planted, scene = data.get("planted"), data.get("scene")
        del doc_list, docs, data
        gc.collect()
        malloc_trim()  # hand the build's freed heap back, so the search phase shows what is live

        kw = {"top_k": args.top_k, "batch_size": search_batch, "n_full_scores": args.n_full_scores,
              "n_ivf_probe": args.n_ivf_probe, "show_progress": False, "n_processes": 1}
        qt = [torch.from_numpy(queries[i:i + 1]) for i in range(nq)]
        with Phase() as srch:
            t = time.perf_counter()
            fp.search(queries_embeddings=qt[0], **kw)  # warm-up: loads the index
            first_ms = (time.perf_counter() - t) * 1e3
            lat, found = [], []
            c = cpu_s()
            for q in qt:
                t = time.perf_counter()
                res = fp.search(queries_embeddings=q, **kw)
                lat.append((time.perf_counter() - t) * 1e3)
                found.append([int(pid) for pid, _ in res[0]])
            search_cpu = cpu_s() - c
            threads_seen = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else None
        index_bytes = dir_bytes(index_dir)
    finally:
        if tmp_index:
            shutil.rmtree(index_dir, ignore_errors=True)

    if planted is not None and scene is not None:
        extra.update(planted_hits(found, planted, scene, k))
    lat_a = np.asarray(lat)
    short = sum(len(f) < k for f in found)
    peak = max(peak_before, build.peak_rss, srch.peak_rss, ru_maxrss())
    result = {
        "peer": "fast-plaid",
        "version": md.version("fast-plaid"),
        "torch": torch.__version__,
        "n_docs": n_docs, "P": p, "d": d, "Pq": int(queries.shape[1]), "queries": nq, "top_k": args.top_k,
        "build_s": round(build_s, 3),
        "build_cpu_s": round(build_cpu, 3),
        "peak_rss_gib": round(peak / GIB, 3),
        "build_peak_rss_gib": round(build.peak_rss / GIB, 3),
        "build_rss_delta_gib": round(max(0, build.peak_rss - build.start_rss) / GIB, 3),
        "search_peak_rss_gib": round(srch.peak_rss / GIB, 3),
        "search_peak_anon_gib": round(srch.peak_anon / GIB, 3),
        "search_peak_file_gib": round(srch.peak_file / GIB, 3),
        "rss_phases_exact": build.exact and srch.exact,
        "index_bytes": index_bytes,
        "first_query_ms": round(first_ms, 2),
        "p50_ms": round(float(np.percentile(lat_a, 50)), 3),
        "p95_ms": round(float(np.percentile(lat_a, 95)), 3),
        "mean_ms": round(float(lat_a.mean()), 3),
        "cpu_ms_per_query": round(search_cpu / nq * 1e3, 3),
        f"recall@{k}": round(recall(found, truth, k), 4),
        "short_result_lists": short,
        **({f"recall_vs_exact_maxsim@{k}": round(recall(found, maxsim_top, k), 4)} if maxsim_top is not None else {}),
        "params": {"device": "cpu", "threads": args.threads, "doc_dtype": "float16",
                   "nbits": args.nbits, "kmeans_niters": args.kmeans_niters,
                   "max_points_per_centroid": args.max_points_per_centroid,
                   "n_samples_kmeans": args.n_samples_kmeans, "build_batch_size": args.build_batch_size,
                   "build_seed": args.build_seed, "n_ivf_probe": args.n_ivf_probe,
                   "n_full_scores": args.n_full_scores, "search_batch_size": search_batch,
                   "torch_threads": torch.get_num_threads(), "process_threads": threads_seen},
        "machine": machine(),
        **extra,
        "argv": sys.argv[1:],
    }
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.setup:
        return setup(args.venv, args.spec)
    if not args.synthetic:
        if args.data is None:
            raise SystemExit("give --data FILE.npz, or --synthetic N (optionally with --data to keep the npz)")
        if not args.data.exists():
            raise SystemExit(f"{args.data} does not exist")
    if args.threads < 1 or args.top_k < 1:
        raise SystemExit("--threads and --top-k must be >= 1")
    set_thread_env(args.threads)  # before torch is imported, and inherited by the re-exec
    ensure_fast_plaid(args.venv)
    result = run(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    rkey = next(key for key in result if key.startswith("recall@"))
    print(f"fast-plaid {result['version']} (cpu, {args.threads} threads): {result['n_docs']} docs x "
          f"{result['P']} x {result['d']}, {result['queries']} queries | build {result['build_s']:.1f} s | "
          f"peak RSS {result['peak_rss_gib']:.2f} GiB | p50 {result['p50_ms']:.1f} ms, "
          f"p95 {result['p95_ms']:.1f} ms | {rkey} {result[rkey]:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
