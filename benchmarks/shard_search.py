#!/usr/bin/env python
"""Search latency of a sharded index against the unsharded one, through the public API.

    python benchmarks/index_scale.py --images 100000 --raw-dim 256 --peer-max 0 \\
        --workdir /tmp/scale --keep --quiet           # the index, its store, 100 queries
    python benchmarks/shard_search.py --workdir /tmp/scale/n100000 --shards 1,2,4 --ray local

For each shard count it splits the index (`split_index`, the code of `retrieval split`),
then measures `ShardedIndex.search` one query at a time (k=10, default settings, after
one warm-up query) with the shards in threads and, with `--ray`, in Ray actors, beside
`Index.search` on the unsharded index with the same queries. Recall@10 is against the
unsharded index's exact top 10 (`exact_limit=10**12`); `--exact-check N` queries are
also searched exactly through the shards and must give the very same hits.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from retrieval import Index  # noqa: E402
from retrieval.engine.sharded import ShardedIndex, split_index  # noqa: E402

EXACT = 10**12


def _latency(search, queries: list[str]) -> tuple[dict, list]:
    search(queries[:1])  # warm: structures loaded once, as a server would
    times, results = [], []
    for q in queries:
        t = time.perf_counter()
        results.append(search([q])[0])
        times.append(time.perf_counter() - t)
    ms = sorted(1000 * t for t in times)
    return {"p50_ms": round(statistics.median(ms), 2), "p95_ms": round(ms[int(0.95 * (len(ms) - 1))], 2)}, results


def _recall(results, truth) -> float:
    return round(float(np.mean([len({h.id for h in r.hits} & {h.id for h in t.hits}) / 10
                                for r, t in zip(results, truth)])), 4)


def _same(a, b) -> bool:
    return [[(h.id, h.distance) for h in r.hits] for r in a] == [[(h.id, h.distance) for h in r.hits] for r in b]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="an N folder kept by index_scale.py (index/, queries/)")
    p.add_argument("--shards", default="1,2,4", help="comma list of shard counts")
    p.add_argument("--ray", help="also serve the shards from Ray actors on this cluster (local, auto, ADDRESS)")
    p.add_argument("--truth-queries", type=int, default=30, help="queries with exact ground truth (recall)")
    p.add_argument("--exact-check", type=int, default=5, help="queries searched exactly through the shards too")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    try:
        counts = [int(v) for v in args.shards.split(",")]
    except ValueError:
        p.error(f"--shards takes a comma list of integers (got {args.shards!r})")
    work = Path(args.workdir)
    queries = sorted(str(q) for q in (work / "queries").iterdir())
    rows = []
    with Index.open(work / "index") as whole:
        base, base_results = _latency(lambda q: whole.search(q, k=10), queries)
        truth = [whole.search([q], k=10, exact_limit=EXACT)[0] for q in queries[: args.truth_queries]]
        base["recall@10"] = _recall(base_results, truth)
        base.update(images=whole.info()["images"], structure=whole.info()["structure"]["factory"])
        print(f"unsharded: {base}", flush=True)
        for n in counts:
            out = work / f"shards-{n}"
            shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            split_index(work / "index", out, n).close()
            row = {"shards": n, "split_s": round(time.perf_counter() - t, 1)}
            modes = [("threads", None)] + ([("ray", args.ray)] if args.ray else [])
            for mode, address in modes:
                with ShardedIndex.open(out, ray=address) as sharded:
                    info = sharded.info()
                    stats, results = _latency(lambda q: sharded.search(q, k=10), queries)
                    stats["recall@10"] = _recall(results, truth)
                    check = queries[: args.exact_check]
                    stats["exact_equal"] = _same(sharded.search(check, k=10, exact_limit=EXACT), truth[: len(check)])
                    stats["structures"] = [s["structure"]["factory"] for s in info["shards"]]
                    row[mode] = stats
            rows.append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(out, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(["shard_search.py", *(argv or sys.argv[1:])]),
                                               "unsharded": base, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
