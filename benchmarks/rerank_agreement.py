#!/usr/bin/env python
"""Whether a change to re-ranking keeps its answers: every setting's top k for every query,
through `Index.search`, saved from one code tree and compared with another's
(benchmarks/results/reranking.md).

    python benchmarks/rerank_agreement.py INDEX_DIR QUERY_ROOT --code /path/to/main --json before.json
    python benchmarks/rerank_agreement.py INDEX_DIR QUERY_ROOT --json after.json --against before.json

Prints, per setting, the share of lists that equal the other run's (ids and order), the
largest distance difference among equal lists, and the share of lists that re-ranking
changes against the plain search (so that an agreement is seen to exercise re-ranking).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # also when loaded by path (tests)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from code_root import code_root  # noqa: E402

ROOT = code_root()

from retrieval.engine.index import Index  # noqa: E402
from retrieval.extraction.images import expand_inputs  # noqa: E402

SETTINGS = {"plain": {"rerank": False}, "rerank": {"rerank": True}, "qe5": {"qe": 5}, "dba5": {"dba": 5},
            "qe5_dba5": {"qe": 5, "dba": 5}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("index", metavar="INDEX_DIR")
    ap.add_argument("queries", metavar="QUERY_ROOT")
    ap.add_argument("--code", default=str(ROOT), help="checkout whose retrieval package answers")
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--json", required=True, help="write this run's lists here")
    ap.add_argument("--against", help="an earlier run's --json to compare with")
    args = ap.parse_args()
    queries = sorted(expand_inputs([args.queries]))
    lists, seconds = {}, {}
    with Index.open(args.index) as idx:
        idx.search(queries[:2], k=args.k)  # the view, the neighbours and the descriptors, loaded once
        for name, setting in SETTINGS.items():
            start = time.perf_counter()
            results = idx.search(queries, k=args.k, **setting)
            seconds[name] = (time.perf_counter() - start) / len(queries)
            # The distance that orders the hits (re-ranked where re-ranking ran), as earlier runs stored it.
            lists[name] = [[[h.path, float(h.distance if h.rerank_distance is None else h.rerank_distance)]
                            for h in r.hits] for r in results]
    Path(args.json).write_text(json.dumps({"code": str(ROOT), "k": args.k, "lists": lists, "seconds": seconds}))
    other = json.loads(Path(args.against).read_text())["lists"] if args.against else None
    for name, got in lists.items():
        changed = sum(a != b for a, b in zip(([p for p, _ in q] for q in got),
                                              ([p for p, _ in q] for q in lists["plain"])))
        line = f"{name:9s} {1000 * seconds[name]:8.1f} ms/query  re-ranked lists {changed}/{len(got)} differ from plain"
        if other is not None:
            same = [[p for p, _ in a] == [p for p, _ in b] for a, b in zip(got, other[name])]
            gap = max((abs(x - y) for a, b, s in zip(got, other[name], same) if s
                       for (_, x), (_, y) in zip(a, b)), default=0.0)
            line += f"  equal to the other run: {sum(same)}/{len(same)}, largest distance difference {gap:.2e}"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
