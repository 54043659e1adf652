#!/usr/bin/env python
"""Query-time cost of the re-ranking and rotation options (benchmarks/results/reranking.md).

    python benchmarks/rerank_cost.py INDEX_DIR QUERY_ROOT [--every 5] [--repeats 3] [--margins 0.2]

Times `Index.search([query], k=4, **setting)` for each setting (the default command
second, after the plain ranking), one query at a time, on every `--every`-th image of
QUERY_ROOT (descriptors should already be in the index's feature store, so only ranking
and re-ranking are timed), the settings interleaved `--repeats` times and each query's
fastest run kept, since a shared machine only ever slows a run down; prints the mean,
p50 and p95 per setting.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from retrieval.extraction.images import expand_inputs  # noqa: E402
from retrieval.engine.index import Index, IndexUsageError  # noqa: E402

ROTATIONS = (0, 90, 180, 270)
# {} is the default command (re-ranked up to 2,000 images with lists, plain above);
# {"rerank": False} is the plain ranking, the default before re-ranking was on.
SETTINGS = [{"rerank": False}, {}, {"rerank": True}, {"qe": 5}, {"dba": 5}, {"qe": 5, "dba": 5}]
# Their first run describes the query three more times (unless stored): minutes, not ms.
ROTATED = [{"query_rotations": ROTATIONS, "rerank": False}, {"query_rotations": ROTATIONS, "rerank": True}]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("index", metavar="INDEX_DIR", help="an index (its writer keeps the neighbour lists)")
    p.add_argument("queries", metavar="QUERY_ROOT", help="folder of query images")
    p.add_argument("--every", type=int, default=5, help="use every N-th query image (default 5)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs per setting (default 3)")
    p.add_argument("--rotations", action="store_true", help="also time four query rotations, plain and adaptive")
    p.add_argument("--margins", metavar="M,...", default="",
                   help="also time --rerank at these margins (e.g. 0.2 beside the default)")
    args = p.parse_args(argv)
    margins = [{"rerank": True, "rerank_margin": float(m)} for m in args.margins.split(",") if m]
    settings = SETTINGS + margins + (ROTATED if args.rotations else [])
    queries = expand_inputs([args.queries])[:: max(1, args.every)]
    with Index.open(args.index) as idx:
        idx.search(queries[:5], k=4)  # load the network, the view and the neighbours first
        usable = []
        for setting in settings:
            try:
                idx.search(queries[:1], k=4, **setting)
                usable.append(setting)
            except IndexUsageError as err:  # e.g. --dba on an index whose lists were never asked for
                print(f"{setting}: not timed: {err}")
        settings = usable
        best = np.full((len(settings), len(queries)), np.inf)
        for _ in range(args.repeats):
            for i, setting in enumerate(settings):
                for j, query in enumerate(queries):
                    start = time.perf_counter()
                    idx.search([query], k=4, **setting)
                    best[i, j] = min(best[i, j], time.perf_counter() - start)
    base = best[0].mean()
    for setting, seconds in zip(settings, best):
        p50, p95 = np.percentile(seconds, [50, 95])
        print(f"{setting or 'default'}: mean {1000 * seconds.mean():.1f} ms, p50 {1000 * p50:.1f} ms, p95 {1000 * p95:.1f} ms "
              f"({seconds.mean() / base:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
