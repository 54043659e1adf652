#!/usr/bin/env python
"""Query-time cost of the re-ranking and rotation options (benchmarks/results/reranking.md).

    python benchmarks/rerank_cost.py INDEX_DIR QUERY_ROOT [--every 5] [--repeats 3]

Times `Index.search(queries, k=4, **setting)` for each setting on every `--every`-th image
of QUERY_ROOT (descriptors should already be in the index's feature store, so only
ranking and re-ranking are timed), the settings interleaved `--repeats` times and the
fastest run kept, since a shared machine only ever slows a run down.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from retrieval.extraction.images import expand_inputs  # noqa: E402
from retrieval.engine.index import Index  # noqa: E402

ROTATIONS = (0, 90, 180, 270)
SETTINGS = [{}, {"qe": 5}, {"dba": 5}, {"qe": 5, "dba": 5}, {"query_rotations": ROTATIONS},
            {"query_rotations": ROTATIONS, "qe": 5, "dba": 5}]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("index", metavar="INDEX_DIR", help="an index whose neighbours `retrieval dba -k 5` computed")
    p.add_argument("queries", metavar="QUERY_ROOT", help="folder of query images")
    p.add_argument("--every", type=int, default=5, help="use every N-th query image (default 5)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs per setting (default 3)")
    args = p.parse_args(argv)
    queries = expand_inputs([args.queries])[:: max(1, args.every)]
    with Index.open(args.index) as idx:
        idx.search(queries[:5], k=4)  # load the network, the view and the neighbours first
        best = [float("inf")] * len(SETTINGS)
        for _ in range(args.repeats):
            for i, setting in enumerate(SETTINGS):
                start = time.perf_counter()
                idx.search(queries, k=4, **setting)
                best[i] = min(best[i], (time.perf_counter() - start) / len(queries))
    for setting, seconds in zip(SETTINGS, best):
        print(f"{setting or 'none'}: {1000 * seconds:.1f} ms/query ({seconds / best[0]:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
