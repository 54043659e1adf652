#!/usr/bin/env python
"""Many client threads searching one kept index, through the public API.

    python benchmarks/concurrency.py /tmp/scale/n100000/index /tmp/scale/n100000/queries \
        --threads 1,2,4,8 --seconds 20 --json out.json

The index and its query images come from `benchmarks/index_scale.py --keep` (the
queries' descriptors are in the index's store, so a search is ranking, not network).
For each client count, each mode runs `--seconds` of closed-loop clients (a client asks
its next query as soon as it has its answer; client c starts at query c and steps
through them all), after `Index.warm(wait=True)` as `retrieval serve` does:

- `shared`: one `Index`, every client calls `Index.search([query], k=10)`;
- `batched`: one `Index` and one `SearchBatcher`, every client calls `batcher.search`;
- `per-thread`: one `Index` per client thread, opened in that thread (the only way before
  an `Index` could be shared; run it with PYTHONPATH at an older checkout to measure that
  code: the script puts its own checkout last on sys.path).

`--open-rates R,...` adds open-loop rows: queries arrive at random (Poisson) at R per
second whether or not earlier ones are answered, as independent users of a service do,
and go to one `SearchBatcher` (its callers never "come back", so what the batcher waits
for them is paid in latency). `--wait-fractions F,...` runs the batcher rows, closed and
open, once per `SearchBatcher(wait_fraction=F)`.

`--memo-faiss windows[,layout]` answers those FAISS searches (`VectorIndex.search` on the
window index, on the layout index) from a memo, row by row, filled by the sequential
pass: every answer stays the same and the stage costs next to nothing, so the rows show
how far the other stages let batching go (an upper bound, not a setting).

Reports queries/s, p50 / p95 / p99 latency and this process's CPU time per answer, per
mode and client count; whether every answer equals the sequential one (ids and
distances); and recall@10 of the sequential answers against exact scoring of every image
on `--recall-queries` of the queries.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # last: a PYTHONPATH checkout wins
if str(ROOT / "benchmarks") not in sys.path:  # also when loaded by path (tests)
    sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402

from retrieval import Index  # noqa: E402

MODES = ("shared", "batched", "per-thread")
FAISS_STAGES = ("windows", "layout")


def _answer(result) -> list:
    return [(h.id, round(h.distance, 5)) for h in result.hits]


def _batcher(index, wait_fraction: float | None):
    from retrieval import SearchBatcher

    return SearchBatcher(index, **({} if wait_fraction is None else {"wait_fraction": wait_fraction}))


def run_mode(mode: str, index_dir: Path, queries: list[str], clients: int, seconds: float, k: int,
             expected: dict[str, list], options: dict, wait_fraction: float | None = None) -> dict:
    """`clients` closed-loop threads for `seconds`: throughput, latency percentiles and
    how many answers differ from the sequential ones; `options`: search keywords beside k."""
    shared = Index.open(index_dir) if mode != "per-thread" else None
    batcher = _batcher(shared, wait_fraction) if mode == "batched" else None
    if shared is not None:
        shared.warm(wait=True)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    differ = [0] * clients
    errors: list[str] = []
    ready = threading.Barrier(clients + 1)
    stop = threading.Event()

    def client(c: int) -> None:
        own = Index.open(index_dir) if mode == "per-thread" else None
        try:
            if own is not None:
                own.warm(wait=True)
                own.search(queries[:1], k=k, **options)  # loads this thread's view and FAISS structure
            ask = ((lambda q: batcher.search(q, k=k, **options)) if batcher is not None else
                   (lambda q: (own or shared).search([q], k=k, **options)[0]))
            ready.wait()
            i = c
            while not stop.is_set():
                q = queries[i % len(queries)]
                t = time.perf_counter()
                result = ask(q)
                latencies[c].append(time.perf_counter() - t)
                differ[c] += _answer(result) != expected[q]
                i += clients
        except BaseException as err:  # noqa: BLE001 - reported in the row
            errors.append(f"{type(err).__name__}: {err}")
            if not ready.broken:
                ready.abort()
        finally:
            if own is not None:
                own.close()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    try:
        ready.wait()
    except threading.BrokenBarrierError:
        pass
    start, cpu = time.perf_counter(), time.process_time()
    time.sleep(seconds if not errors else 0)
    stop.set()
    for t in threads:
        t.join()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    if batcher is not None:
        batches = list(batcher.batches)
        batcher.close()
    if shared is not None:
        shared.close()
    times = [x for per in latencies for x in per]
    row = {"mode": mode, "clients": clients, **_measures(times, elapsed, cpu, sum(differ), errors)}
    if batcher is not None:
        row.update(_batching(batches, wait_fraction))
    return row


@contextlib.contextmanager
def memoize_faiss(stages: set[str]):
    """While entered, `VectorIndex.search` on the named structures (`query_profile.faiss_structure`)
    answers each query row from a memo once it has searched that row; yields the memo."""
    from query_profile import faiss_structure
    from retrieval.engine import ann

    search, memo = ann.VectorIndex.search, {}

    def remembered(self, queries, k, nprobe=None):
        if faiss_structure(self) not in stages:
            return search(self, queries, k, nprobe)
        rows = np.ascontiguousarray(queries, dtype=np.float32)
        keys = [(id(self), k, nprobe, row.tobytes()) for row in rows]
        if all(key in memo for key in keys):
            return np.stack([memo[key][0] for key in keys]), np.stack([memo[key][1] for key in keys])
        sims, ids = search(self, rows, k, nprobe)
        memo.update((key, (s, i)) for key, s, i in zip(keys, sims.copy(), ids.copy()))
        return sims, ids

    ann.VectorIndex.search = remembered
    try:
        yield memo
    finally:
        ann.VectorIndex.search = search


def _measures(times: list[float], elapsed: float, cpu: float, differ: int, errors: list[str]) -> dict:
    """A row's answers: how many, a second, latency percentiles, CPU per answer."""
    ms = lambda q: round(1000 * float(np.percentile(times, q)), 1) if times else None  # noqa: E731
    return {"queries": len(times), "qps": round(len(times) / elapsed, 1),
            "p50_ms": ms(50), "p95_ms": ms(95), "p99_ms": ms(99),
            # CPU of this process per answer: what bounds throughput on the cores, and less
            # sensitive than queries/s to other jobs taking turns on them.
            "cpu_ms_per_query": round(1000 * cpu / len(times), 1) if times else None,
            "differ_from_sequential": differ, "errors": errors[:3]}


def _batching(batches: list[int], wait_fraction: float | None) -> dict:
    return {"mean_batch": round(float(np.mean(batches)), 2) if batches else None, "wait_fraction": wait_fraction}


def run_open(index_dir: Path, queries: list[str], rate: float, seconds: float, k: int, expected: dict[str, list],
             options: dict, wait_fraction: float | None = None, seed: int = 0) -> dict:
    """Open loop: queries arriving at random (exponential gaps, `rate` a second) for
    `seconds`, each submitted to one `SearchBatcher` on arrival, whether or not earlier
    ones are answered; latency is from arrival to answer."""
    from retrieval import SearchOptions

    search = SearchOptions(k=k, **options)
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=int(rate * seconds * 2) + 16)
    arrivals = np.cumsum(gaps)
    arrivals = arrivals[arrivals < seconds]
    latencies: list[float] = []
    differ = 0
    errors: list[str] = []
    lock = threading.Lock()
    with Index.open(index_dir) as shared:
        shared.warm(wait=True)
        batcher = _batcher(shared, wait_fraction)

        def done(q: str, arrived: float, future: cf.Future) -> None:
            nonlocal differ
            took = time.perf_counter() - arrived
            with lock:
                try:
                    differ += _answer(future.result()) != expected[q]
                    latencies.append(took)
                except Exception as err:  # noqa: BLE001 - reported in the row
                    errors.append(f"{type(err).__name__}: {err}")

        futures = []
        cpu = time.process_time()
        start = time.perf_counter()
        for i, at in enumerate(arrivals):
            time.sleep(max(0.0, start + at - time.perf_counter()))
            q = queries[i % len(queries)]
            arrived = time.perf_counter()
            future = batcher.submit(q, search)
            future.add_done_callback(lambda f, q=q, arrived=arrived: done(q, arrived, f))
            futures.append(future)
        cf.wait(futures)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        batches = list(batcher.batches)
        batcher.close()
    return {"mode": "open", "offered_qps": rate, **_measures(latencies, elapsed, cpu, differ, errors),
            **_batching(batches, wait_fraction)}


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("index", type=Path, help="a kept index (benchmarks/index_scale.py --keep)")
    p.add_argument("queries", type=Path, help="folder of query images whose descriptors are in the index's store")
    p.add_argument("--threads", default="1,2,4,8", help="client thread counts (default 1,2,4,8)")
    p.add_argument("--modes", default=",".join(MODES), help=f"modes to run, from {','.join(MODES)}")
    p.add_argument("--seconds", type=float, default=20.0, help="closed-loop run per mode and client count")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--recall-queries", type=int, default=20, help="queries scored exactly for recall@k (0: skip)")
    p.add_argument("--nprobe", type=int, help="IVF lists searched per query window (default: the index's)")
    p.add_argument("--shortlist", type=int,
                   help="images the kernel scores of those the windows nominate (default: the library's; 0: all)")
    p.add_argument("--open-rates", default="",
                   help="also open-loop rows at these arrival rates, queries a second (e.g. 40,70,90)")
    p.add_argument("--wait-fractions", default="",
                   help="SearchBatcher wait_fraction values for the batcher rows, closed and open (default: the library's)")
    p.add_argument("--memo-faiss", default="",
                   help="answer these FAISS searches from a memo after their first time: windows, layout or "
                        "windows,layout (an upper bound with the stage free, not a setting)")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    memo = set(v for v in args.memo_faiss.split(",") if v)
    if not memo <= set(FAISS_STAGES):
        p.error(f"--memo-faiss takes {','.join(FAISS_STAGES)} (got {args.memo_faiss!r})")
    options = {"nprobe": args.nprobe} if args.nprobe else {}
    if args.shortlist is not None:
        options["shortlist"] = args.shortlist
    modes = args.modes.split(",")
    if not set(modes) <= set(MODES):
        p.error(f"--modes takes {','.join(MODES)} (got {args.modes!r})")
    counts = [int(v) for v in args.threads.split(",") if v]
    try:
        rates = [float(v) for v in args.open_rates.split(",") if v]
        fractions = [float(v) for v in args.wait_fractions.split(",") if v] or [None]
    except ValueError:
        p.error(f"--open-rates and --wait-fractions take numbers separated by commas "
                f"(got {args.open_rates!r}, {args.wait_fractions!r})")
    if any(r <= 0 for r in rates) or any(f is not None and f < 0 for f in fractions):
        p.error("--open-rates must be > 0 and --wait-fractions >= 0")
    with memoize_faiss(memo) if memo else contextlib.nullcontext():
        return _run(args, options, modes, counts, rates, fractions, memo)


def _run(args, options: dict, modes: list[str], counts: list[int], rates: list[float], fractions: list,
         memo: set[str]) -> int:
    """The sequential pass, then the rows."""
    queries = [str(q) for q in sorted(args.queries.iterdir())]
    with Index.open(args.index) as idx:
        idx.warm(wait=True)
        sequential = {q: idx.search([q], k=args.k, **options)[0] for q in queries}
        recall = None
        if args.recall_queries:
            some = queries[:args.recall_queries]
            exact = idx.search(some, k=args.k, exact_limit=10**12)
            recall = round(float(np.mean([len({h.id for h in sequential[q].hits} & {h.id for h in e.hits}) / args.k
                                          for q, e in zip(some, exact)])), 3)
        info = idx.info()
    expected = {q: _answer(r) for q, r in sequential.items()}
    rows = []
    print(f"{info['images']} images, {info['structure']['search']} {info['structure'].get('factory') or ''}, "
          f"recall@{args.k} {recall}", flush=True)
    for clients in counts:
        for mode in modes:
            for fraction in fractions if mode == "batched" else [None]:
                before = _load()
                row = run_mode(mode, args.index, queries, clients, args.seconds, args.k, expected, options, fraction)
                row["load_before"], row["load_after"] = before, _load()
                rows.append(row)
                print(json.dumps(row), flush=True)
    for rate in rates:
        for fraction in fractions:
            before = _load()
            row = run_open(args.index, queries, rate, args.seconds, args.k, expected, options, fraction)
            row["load_before"], row["load_after"] = before, _load()
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"machine": f"{platform.node()} {os.cpu_count()} CPUs", "command": " ".join(sys.argv),
              "pythonpath": os.environ.get("PYTHONPATH", ""), "memo_faiss": sorted(memo), "images": info["images"],
              "structure": info["structure"], f"recall@{args.k}": recall, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
