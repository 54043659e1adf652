#!/usr/bin/env python
"""Where one query's time goes, how large its candidate pool is, and what it finds, per
candidate setting, on a kept index (read only).

    python benchmarks/query_profile.py /tmp/scale/n100000/index /tmp/scale/n100000/queries \
        --grid 16:64:128,8:16:128,16:0:128:0 --json out.json
    python benchmarks/query_profile.py /tmp/ukb/index ../shared/data/ukbench/full --groups 4 \
        --grid 16:64:128,8:16:128 --every 5

Each query goes through `Index.search([q], k)` alone (one client), once per setting
`NPROBE:PER_PATCH:LAYOUT_K[:SHORTLIST]` (NPROBE or PER_PATCH 0, or no SHORTLIST: the
library's default; SHORTLIST 0: every image the windows nominate). The
stages are timed by wrapping the engine functions that run them, for the duration of
the run only: the FAISS window search, the layout search (`VectorIndex.search` on each
structure), locating the pool's images in the segments (`View.locate`) and the kernel
(`kernel.patch_distances_each`); `other` is the rest of `Index.search` (reading the
query's descriptors from the store, whitening, Python, hits). Pool size is the number of
images the kernel scores per query.

recall@k is against exact scoring of every image (`exact_limit` above the collection).
With `--groups G` the queries are the indexed images themselves and consecutive groups of
G files (sorted by name) show one object, as in UKBench: `N-S` is the mean number of
the query's group in its top G (UKBench's score, 0..4).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # last: a PYTHONPATH checkout wins

import numpy as np  # noqa: E402

from retrieval import Index  # noqa: E402
from retrieval.engine import ann, kernel, search, snapshot  # noqa: E402

STAGES = ("faiss_windows", "faiss_layout", "locate", "kernel", "other")


def faiss_structure(index: ann.VectorIndex) -> str:
    """Which of an index's FAISS structures this is: "layout" (the flat "PQ..." one) or
    "windows" (the window index, with IVF lists)."""
    return "layout" if index.factory.startswith("PQ") else "windows"


class StageClock:
    """Wall seconds per stage and pool sizes, gathered by wrapping the engine's functions
    while it is entered (one thread: the wrapped calls are the query's own)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.pools: list[int] = []

    def _timed(self, owner, name: str, stage) -> None:
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[stage(args) if callable(stage) else stage] += time.perf_counter() - t

        self._stack.callback(setattr, owner, name, original)
        setattr(owner, name, wrapper)

    def __enter__(self) -> "StageClock":
        self._stack = contextlib.ExitStack()
        self._timed(ann.VectorIndex, "search", lambda args: f"faiss_{faiss_structure(args[0])}")
        self._timed(snapshot.View, "locate", "locate")
        self._timed(kernel, "patch_distances_each", "kernel")
        pool_distances = search.pool_distances

        def counted(queries, view, pools, aggregate):
            self.pools.extend(len(p) for p in pools)
            return pool_distances(queries, view, pools, aggregate)

        self._stack.callback(setattr, search, "pool_distances", pool_distances)
        search.pool_distances = counted
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()


def _group_of(paths: list[str], size: int) -> dict[str, int]:
    return {os.path.realpath(p): i // size for i, p in enumerate(paths)}


def profile(index: Index, queries: list[str], setting: tuple[int, ...], k: int, exact: list,
            groups: dict[str, int] | None) -> dict:
    """One setting over every query: latency, stages, pool size, recall@k, N-S."""
    nprobe, per_patch, layout_k, shortlist = (setting + (None,))[:4]
    options = {"nprobe": nprobe or None, "per_patch": per_patch or None, "layout_k": layout_k, "shortlist": shortlist,
               "exact_limit": 0}
    times, found, ns = [], [], []
    with StageClock() as clock:
        for q, e in zip(queries, exact):
            t = time.perf_counter()
            hits = index.search([q], k=k, **options)[0].hits
            times.append(time.perf_counter() - t)
            found.append(len({h.id for h in hits} & {h.id for h in e.hits}) / k)
            if groups is not None:
                g = groups[os.path.realpath(q)]
                size = sum(v == g for v in groups.values())
                ns.append(sum(groups.get(os.path.realpath(h.path)) == g for h in hits[:size]))
    per_query = {s: 1000 * clock.seconds[s] / len(queries) for s in STAGES[:-1]}
    per_query["other"] = 1000 * sum(times) / len(queries) - sum(per_query.values())
    used = index.search_options(k, None, {"per_patch": per_patch or None, "shortlist": shortlist})
    row = {"nprobe": nprobe or index.view().ann.default_nprobe, "per_patch": search.windows_per_window(used),
           "layout_k": layout_k,
           "shortlist": search.shortlist_size(used) or "all",
           f"recall@{k}": round(float(np.mean(found)), 4),
           "p50_ms": round(1000 * float(np.percentile(times, 50)), 2),
           "mean_ms": round(1000 * float(np.mean(times)), 2),
           "stages_ms": {s: round(v, 2) for s, v in per_query.items()},
           "pool_mean": round(float(np.mean(clock.pools)), 1), "pool_max": int(np.max(clock.pools))}
    if groups is not None:
        row["N-S"] = round(float(np.mean(ns)), 3)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("index", type=Path, help="a kept index")
    p.add_argument("queries", type=Path, help="folder of query images (their descriptors in the index's store)")
    p.add_argument("--grid", default="0:0:128", metavar="NPROBE:PER_PATCH:LAYOUT_K[:SHORTLIST],...",
                   help="candidate settings (NPROBE or PER_PATCH 0, or no SHORTLIST: the library's default; "
                   "SHORTLIST 0: score every image the windows nominate); default 0:0:128")
    p.add_argument("--groups", type=int, default=0, help="queries are the indexed images, in groups of this many")
    p.add_argument("--every", type=int, default=1, help="use every n-th query file")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    try:
        grid = [tuple(int(v) for v in item.split(":")) for item in args.grid.split(",") if item]
        if any(len(g) not in (3, 4) or min(g) < 0 for g in grid):
            raise ValueError
    except ValueError:
        p.error(f"--grid takes NPROBE:PER_PATCH:LAYOUT_K[:SHORTLIST] integers >= 0 (got {args.grid!r})")
    paths = [str(q) for q in sorted(args.queries.iterdir()) if q.is_file()]
    queries = paths[::args.every]
    groups = _group_of(paths, args.groups) if args.groups else None
    rows = []
    with Index.open(args.index) as index:
        index.warm(wait=True)
        index.search(queries[:1], k=args.k)  # loads the view and the FAISS structures
        exact = index.search(queries, k=args.k, exact_limit=10**12)
        info = index.info()
        print(f"{info['images']} images, {info['structure'].get('factory')}, {len(queries)} queries", flush=True)
        for setting in grid:
            row = profile(index, queries, setting, args.k, exact, groups)
            row["load"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"machine": f"{platform.node()} {os.cpu_count()} CPUs", "command": " ".join(sys.argv),
             "images": info["images"], "structure": info["structure"], "queries": len(queries), "rows": rows},
            indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
