#!/usr/bin/env python
"""Database-side augmentation over shards against the unsharded index (benchmarks/results/sharding.md).

    python benchmarks/sharded_dba.py INDEX_DIR OUT_DIR [--shards 2] [--every 20] [-k 10]

Copies INDEX_DIR into OUT_DIR, splits the copy into `--shards` shards, times
`retrieval dba` (`build_neighbours`) on both, then answers every `--every`-th indexed
image as a query with `--dba 3` and with `--dba 3 --qe 2` on both (descriptors come from
the feature store, so ranking and re-ranking are timed) and says whether the hits are the
same images and by how much their distances differ.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from retrieval.engine.index import Index  # noqa: E402
from retrieval.engine.sharded import ShardedIndex, split_index  # noqa: E402

SETTINGS = [{"dba": 3}, {"dba": 3, "qe": 2}]


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("index", metavar="INDEX_DIR", help="an index (copied, never written)")
    p.add_argument("out", metavar="OUT_DIR", help="a new folder for the copy and its shards")
    p.add_argument("--shards", type=int, default=2, help="number of shards (default 2)")
    p.add_argument("--every", type=int, default=20, help="query every N-th indexed image (default 20)")
    p.add_argument("-k", type=int, default=10, help="neighbours per image for `dba` (default 10)")
    args = p.parse_args(argv)
    out = Path(args.out)
    whole = Path(shutil.copytree(args.index, out / "index"))
    split_index(whole, out / "shards", args.shards).close()
    with Index.open(whole) as idx:
        start = time.perf_counter()
        idx.build_neighbours(args.k)
        t_whole = time.perf_counter() - start
    with ShardedIndex.open(out / "shards") as shards:
        start = time.perf_counter()
        shards.build_neighbours(args.k)
        t_shards = time.perf_counter() - start
    print(f"dba -k {args.k}: unsharded {t_whole:.1f} s, {args.shards} shards {t_shards:.1f} s (load {_load()})")
    with Index.open(whole) as idx, ShardedIndex.open(out / "shards") as shards:
        live = idx.view().live_ids()[::args.every].tolist()
        paths = [idx.entry(i).path for i in live]
        for setting in SETTINGS:
            idx.search(paths[:2], k=10, **setting)  # first calls load files: not timed
            shards.search(paths[:2], k=10, **setting)
            start = time.perf_counter()
            want = idx.search(paths, k=10, **setting)
            t_whole = time.perf_counter() - start
            start = time.perf_counter()
            got = shards.search(paths, k=10, **setting)
            t_shards = time.perf_counter() - start
            same = [[h.id for h in r.hits] for r in got] == [[h.id for h in r.hits] for r in want]
            ranked = lambda h: h.distance if h.rerank_distance is None else h.rerank_distance  # noqa: E731
            gap = max(abs(ranked(a) - ranked(b)) for r, s in zip(got, want) for a, b in zip(r.hits, s.hits))
            print(f"{setting}: {len(paths)} queries, same images {same}, largest distance gap {gap:.1e}; "
                  f"unsharded {1000 * t_whole / len(paths):.0f} ms/query, {args.shards} shards "
                  f"{1000 * t_shards / len(paths):.0f} ms/query (load {_load()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
