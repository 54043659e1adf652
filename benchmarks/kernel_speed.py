"""Speed of the native patch-distance kernel vs NumPy, FAISS flat and torch (CPU).

    python benchmarks/kernel_speed.py [--json OUT] [--images 20000] [--patches 30]
                                      [--dims 128,256,512] [--query-patches 30]

All methods see the same random unit-norm data in one run; every time is the median of
--reps repetitions. The machine bound printed next to them is measured here: streaming-read
bandwidth of the db array (retrieval._kernel.stream_read, all threads) and the multiply-add
peak of the selected ISA path (retrieval._kernel.fma_peak, all threads);
bound_time = max(db_bytes / bandwidth, flops / peak), fraction_of_bound = bound / native.

FAISS baseline: IndexFlatIP.search(query_patches, k=1) over the same patch vectors. It does
the same arithmetic (all nq x N inner products, via BLAS sgemm for nq >= 20) plus the
cheapest possible reduction (a global top-1 per query patch), so it is a lower bound on what
any FAISS flat formulation of the per-image min costs: larger k only adds heap work, and
faiss.pairwise_distances would materialise the full nq x N matrix (2.4 GB here) and then
still need the per-image reduction.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from retrieval import _kernel  # noqa: E402
from retrieval.engine import kernel as K  # noqa: E402

CHUNK_ROWS = 1 << 16  # NumPy / torch work in chunks of this many db rows (~8 MB of scores)


def median_time(fn, reps):
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def unit_rows(rng, n, d, chunk=1 << 18):
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, chunk):
        x = rng.standard_normal((min(chunk, n - s), d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[s:s + len(x)] = x
    return out


def chunks(offsets):
    """Image ranges [i0, i1) whose rows total about CHUNK_ROWS."""
    n = len(offsets) - 1
    i0 = 0
    while i0 < n:
        i1 = int(np.searchsorted(offsets, offsets[i0] + CHUNK_ROWS, side="right")) - 1
        i1 = min(max(i1, i0 + 1), n)
        yield i0, i1
        i0 = i1


def numpy_min(q, db, offsets):
    """Reference: matrix product + per-image reductions, in chunks of images."""
    out = np.empty(len(offsets) - 1, dtype=np.float32)
    for i0, i1 in chunks(offsets):
        r0 = offsets[i0]
        s = q @ db[r0:offsets[i1]].T                                   # [nq, rows]
        best = np.maximum.reduceat(s, offsets[i0:i1] - r0, axis=1).max(axis=0)
        out[i0:i1] = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * best))
    return out


def reference64(q, db, offsets, n_images, aggregate):
    """Float64 reference on the first n_images (for the error column)."""
    rows = offsets[n_images]
    dd = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * (q.astype(np.float64) @ db[:rows].astype(np.float64).T)))
    if aggregate == "min":
        return np.minimum.reduceat(dd.min(axis=0), offsets[:n_images])
    return np.minimum.reduceat(dd, offsets[:n_images], axis=1).mean(axis=0)


def torch_min(torch, q_t, db_t, offsets, img_of_row):
    out = torch.empty(len(offsets) - 1, dtype=torch.float32)
    for i0, i1 in chunks(offsets):
        r0, r1 = int(offsets[i0]), int(offsets[i1])
        s = (q_t @ db_t[r0:r1].T).amax(dim=0)                          # [rows]
        best = torch.full((i1 - i0,), -np.inf).scatter_reduce_(
            0, img_of_row[r0:r1] - i0, s, reduce="amax")
        out[i0:i1] = torch.sqrt(torch.clamp(2.0 - 2.0 * best, min=0.0))
    return out


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--patches", type=int, default=30)
    ap.add_argument("--dims", default="128,256,512")
    ap.add_argument("--query-patches", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16, help="queries in the batched test")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import faiss
    import torch

    threads = os.cpu_count() or 1
    faiss.omp_set_num_threads(threads)
    torch.set_num_threads(threads)
    rng = np.random.default_rng(args.seed)
    n_img, P, nq = args.images, args.patches, args.query_patches
    offsets = (np.arange(n_img + 1, dtype=np.int64) * P)
    img_of_row = torch.from_numpy(np.repeat(np.arange(n_img, dtype=np.int64), P))
    load = os.getloadavg()
    peak = statistics.median(_kernel.fma_peak(20_000_000) for _ in range(3))
    result = {
        "machine": {"cpu": cpu_model(), "logical_cpus": threads, "kernel": K.summary(),
                    "numpy": np.__version__, "faiss": faiss.__version__,
                    "torch": torch.__version__, "loadavg_at_start": load,
                    "fma_peak_gflops": peak / 1e9},
        "config": vars(args), "dims": {},
    }
    print(f"# {result['machine']['cpu']}, {threads} threads, {K.summary()}; "
          f"load average at start {load[0]:.1f}; measured FMA peak {peak / 1e9:.1f} GFLOP/s")

    for d in [int(x) for x in args.dims.split(",")]:
        db = unit_rows(rng, n_img * P, d)
        q = unit_rows(rng, nq, d)
        flops = 2.0 * nq * db.shape[0] * d
        bw = statistics.median(
            db.nbytes / median_time(lambda: _kernel.stream_read(db), 1) for _ in range(args.reps))

        native = lambda: K.patch_distances(q, db, offsets)  # noqa: E731
        native_s = median_time(native, args.reps)
        dist = native()[0]
        numpy_s = median_time(lambda: numpy_min(q, db, offsets), args.reps)
        np_dist = numpy_min(q, db, offsets)

        index = faiss.IndexFlatIP(d)
        index.add(db)
        faiss_s = median_time(lambda: index.search(q, 1), args.reps)
        del index

        q_t, db_t = torch.from_numpy(q), torch.from_numpy(db)
        with torch.inference_mode():
            torch_s = median_time(lambda: torch_min(torch, q_t, db_t, offsets, img_of_row), args.reps)
            t_dist = torch_min(torch, q_t, db_t, offsets, img_of_row).numpy()

        # Accuracy (first 500 images, float64 reference), both aggregates.
        n_chk = min(500, n_img)
        errs = {}
        for agg in ("min", "mean-min"):
            got = K.patch_distances(q, db, offsets, np.arange(n_chk), agg)[0]
            want = reference64(q, db, offsets, n_chk, agg)
            errs[agg] = float(np.max(np.abs(got - want) / want))
        mean_min_s = median_time(lambda: K.patch_distances(q, db, offsets, aggregate="mean-min"),
                                 args.reps)

        # float16 storage.
        db16 = db.astype(np.float16)
        f16_s = median_time(lambda: K.patch_distances(q, db16, offsets), args.reps)
        want16 = reference64(q, db16, offsets, min(500, n_img), "min")
        got16 = K.patch_distances(q, db16, offsets, np.arange(min(500, n_img)))[0]
        f16_err = float(np.max(np.abs(got16 - want16) / want16))
        f16_vs_f32 = float(np.max(np.abs(K.patch_distances(q, db16, offsets)[0] - dist)))
        del db16

        # Batched queries: one pass over the db vs a loop of single queries.
        qs = unit_rows(rng, args.batch * nq, d)
        qoff = np.arange(args.batch + 1, dtype=np.int64) * nq
        batch_s = median_time(lambda: K.patch_distances_batch(qs, qoff, db, offsets),
                              max(1, args.reps // 2))
        loop_s = median_time(lambda: [K.patch_distances(qs[a:b], db, offsets)
                                      for a, b in zip(qoff[:-1], qoff[1:])], max(1, args.reps // 2))

        bound_s = max(db.nbytes / bw, flops / peak)
        bound16_s = max(db.nbytes / 2 / bw, flops / peak)
        batch_bound_s = max(db.nbytes / bw, args.batch * flops / peak)
        r = {
            "n_patches": int(db.shape[0]), "db_bytes": int(db.nbytes), "flops": flops,
            "native_s": native_s, "native_mean_min_s": mean_min_s, "numpy_s": numpy_s,
            "faiss_s": faiss_s, "torch_s": torch_s,
            "native_vs_numpy": numpy_s / native_s, "native_vs_faiss_flat": faiss_s / native_s,
            "native_vs_torch": torch_s / native_s,
            "bandwidth_GBps": bw / 1e9, "fma_peak_gflops": peak / 1e9,
            "bound_s": bound_s, "bound_is": "memory" if db.nbytes / bw > flops / peak else "compute",
            "fraction_of_bound": bound_s / native_s,
            "native_gflops": flops / native_s / 1e9, "native_GBps": db.nbytes / native_s / 1e9,
            "max_rel_error": errs["min"], "max_rel_error_mean_min": errs["mean-min"],
            "max_abs_diff_vs_numpy": float(np.max(np.abs(dist - np_dist))),
            "max_abs_diff_vs_torch": float(np.max(np.abs(dist - t_dist))),
            "float16": {"native_s": f16_s, "speedup_vs_float32": native_s / f16_s,
                        "bound_s": bound16_s, "fraction_of_bound": bound16_s / f16_s,
                        "max_rel_error_vs_f16_reference": f16_err,
                        "max_abs_diff_vs_float32_db": f16_vs_f32},
            "batch": {"queries": args.batch, "batch_s": batch_s, "loop_s": loop_s,
                      "per_query_batch_s": batch_s / args.batch,
                      "per_query_loop_s": loop_s / args.batch, "speedup": loop_s / batch_s,
                      "bound_s": batch_bound_s, "fraction_of_bound": batch_bound_s / batch_s},
        }
        result["dims"][str(d)] = r
        print(f"d={d}: native {native_s:.4f}s ({r['native_gflops']:.0f} GFLOP/s, "
              f"{r['native_GBps']:.1f} GB/s) | numpy {numpy_s:.4f}s (x{r['native_vs_numpy']:.2f}) | "
              f"faiss flat k=1 {faiss_s:.4f}s (x{r['native_vs_faiss_flat']:.2f}) | torch "
              f"{torch_s:.4f}s (x{r['native_vs_torch']:.2f}) | bound {bound_s:.4f}s "
              f"({r['bound_is']}; bw {bw / 1e9:.1f} GB/s, peak {peak / 1e9:.0f} GFLOP/s) "
              f"fraction {r['fraction_of_bound']:.2f} | max rel err {errs['min']:.2g}/"
              f"{errs['mean-min']:.2g}")
        print(f"      float16 db {f16_s:.4f}s (x{r['float16']['speedup_vs_float32']:.2f} vs f32, "
              f"fraction {r['float16']['fraction_of_bound']:.2f}, rel err {f16_err:.2g}) | "
              f"batch {args.batch} queries {batch_s:.4f}s vs loop {loop_s:.4f}s "
              f"(x{r['batch']['speedup']:.2f}, fraction {r['batch']['fraction_of_bound']:.2f}) | "
              f"mean-min {mean_min_s:.4f}s", flush=True)
        del db, qs, q_t, db_t

    result["loadavg_at_end"] = os.getloadavg()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
