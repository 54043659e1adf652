#!/usr/bin/env python
"""The neighbour lists' candidate search on a sample of a kept index, for comparing code
versions and candidate settings where a full `retrieval duplicates` run would not fit.

    PYTHONPATH=CHECKOUT python benchmarks/neighbour_lists_sample.py time INDEX_DIR --sample 256 --save lists.npz
    python benchmarks/neighbour_lists_sample.py agree INDEX_DIR --sample 256 --settings 84:16:128,8:16:32

`time`: seconds of the function `Index.duplicates` / `retrieval dba` run on an index with
no lists (`neighbour_lists._candidate_lists`) for the first `--sample` images, wall and
CPU (the process's, OpenMP and FAISS threads included), with the lists it found saved
for comparing two checkouts (`compare A.npz B.npz`). The public API computes every
image's list or none; a sample is what makes the code before a change measurable here.

`kernel`: the scoring of the lists' pools alone, one `image_distances` (one kernel call)
per image against one `pool_distances` (one call per segment for all), alternating.

`agree`: the lists found with other candidate settings (`per_patch:nprobe:layout_k`)
against exact kernel scoring of every image, on a random sample: overlap of the k-lists,
of their first 3, recall of the exact neighbours within 1.15 (duplicate range), and the
median k-th distance (the default `--max-distance` follows it); with `--truth-by-name`
on real photos (`list_candidates_real.py`), the share of the true group mates kept.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # last: a PYTHONPATH checkout wins

import numpy as np  # noqa: E402

from retrieval import Index  # noqa: E402
from retrieval.config import NEIGHBOURS_K, SearchOptions  # noqa: E402
from retrieval.engine import neighbour_lists as nl  # noqa: E402
from retrieval.engine import search  # noqa: E402
from retrieval.engine.policy import WritePolicy  # noqa: E402


def _open(index_dir: Path, exact_limit: int | None = None):
    """The index (built with FAISS above `exact_limit` images, if given), its view and list settings."""
    idx = Index.open(index_dir, policy=None if exact_limit is None else WritePolicy(ann_min_images=exact_limit))
    return idx, idx.view(), idx._neighbour_settings(NEIGHBOURS_K)


def time_lists(args) -> dict:
    idx, view, settings = _open(args.index)
    live = view.live_ids()
    near = np.full((len(live), settings.k), -1, np.int64)
    dist = np.full((len(live), settings.k), np.inf, np.float32)
    load = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), time.process_time()
    nl._candidate_lists(view, live, np.arange(args.sample), near, dist, settings, False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if args.save:
        np.savez(args.save, near=near[:args.sample], dist=dist[:args.sample])
    return {"images": int(view.images), "sample": args.sample, "s": round(wall, 1),
            "ms_per_image": round(1000 * wall / args.sample, 1), "cpu_ms_per_image": round(1000 * cpu / args.sample, 1),
            "load_before": round(load, 1), "load_after": round(os.getloadavg()[0], 1)}


def compare(a: Path, b: Path) -> dict:
    x, y = np.load(a), np.load(b)
    k = x["near"].shape[1]
    return {"identical_lists": round(float((x["near"] == y["near"]).all(1).mean()), 4),
            "overlap": round(float(np.mean([len(set(p) & set(q)) / k for p, q in zip(x["near"], y["near"])])), 4),
            "first_3": round(float(np.mean([len(set(p[:3]) & set(q[:3])) / 3 for p, q in zip(x["near"], y["near"])])), 4),
            "mean_distance_per_rank": [np.round(x["dist"].mean(0), 4).tolist(), np.round(y["dist"].mean(0), 4).tolist()]}


def kernel_calls(args) -> list[dict]:
    idx, view, settings = _open(args.index)
    live = view.live_ids()
    queries = [view.windows(int(live[j]), settings.rows) for j in range(args.sample)]
    pools = search.candidate_pools(queries, view, nl.list_options(settings), settings.rows)
    ways = {"per image": lambda: [search.image_distances(q, view, p, settings.aggregate) for q, p in zip(queries, pools)],
            "per segment": lambda: search.pool_distances(queries, view, pools, settings.aggregate)}
    rows, answers = [], {}
    for rep in range(args.repeat):
        for name, way in ways.items():
            wall, cpu = time.perf_counter(), time.process_time()
            answers[name] = way()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            rows.append({"calls": name, "repeat": rep, "mean_pool": round(float(np.mean([len(p) for p in pools])), 1),
                         "ms_per_image": round(1000 * wall / args.sample, 2), "cpu_ms_per_image": round(1000 * cpu / args.sample, 2),
                         "load": round(os.getloadavg()[0], 1)})
            print(json.dumps(rows[-1]), flush=True)
    same = all(np.array_equal(a, b) for x, y in zip(*answers.values()) for a, b in zip(x, y))
    print(json.dumps({"identical": same}))
    return rows


def agree(args) -> list[dict]:
    idx, view, settings = _open(args.index, args.exact_limit)
    k, live = settings.k, view.live_ids()
    pick = np.sort(np.random.default_rng(0).choice(len(live), min(args.sample, len(live)), replace=False))
    d = nl._exact_distances(view, live[pick], live, settings)
    d[np.arange(len(pick)), pick] = np.inf
    order = np.lexsort((np.broadcast_to(live, d.shape), d), axis=-1)[:, :k]
    exact_ids, exact_d = live[order], np.take_along_axis(d, order, 1)
    near_exact = [set(e[dd <= 1.15]) for e, dd in zip(exact_ids, exact_d)]
    mates = _true_mates(idx, live[pick], exact_ids) if args.truth_by_name else None
    queries = [view.windows(int(live[j]), settings.rows) for j in pick]
    rows = []
    for spec in args.settings.split(","):
        per_patch, nprobe, layout_k = (int(v) for v in spec.split(":"))
        options = SearchOptions(k=nl.REVERSE_DEPTH * k + 1, aggregate=settings.aggregate, exact_limit=settings.exact_limit,
                                per_patch=per_patch, nprobe=nprobe, layout_k=layout_k)
        wall = time.perf_counter()
        found = [r for a in range(0, len(queries), nl.QUERY_BATCH)
                 for r in search.rank_many(queries[a:a + nl.QUERY_BATCH], view, options, settings.rows)]
        wall = time.perf_counter() - wall
        lists = [(r.ids[r.ids != live[j]][:k], r.distances[r.ids != live[j]][:k]) for j, r in zip(pick, found)]
        rows.append({"per_patch": per_patch, "nprobe": nprobe, "layout_k": layout_k,
                     "ms_per_image": round(1000 * wall / len(pick), 1),
                     "overlap": round(float(np.mean([len(set(g) & set(e)) / k for (g, _), e in zip(lists, exact_ids)])), 4),
                     "first_3": round(float(np.mean([len(set(g[:3]) & set(e[:3])) / 3 for (g, _), e in zip(lists, exact_ids)])), 4),
                     "near_recall": round(sum(len(set(g) & n) for (g, _), n in zip(lists, near_exact))
                                          / max(1, sum(map(len, near_exact))), 4),
                     "near_pairs": sum(map(len, near_exact)),
                     **({} if mates is None else
                        {"mates_kept": round(sum(len(set(g) & m) for (g, _), m in zip(lists, mates))
                                             / max(1, sum(map(len, mates))), 4), "mates": sum(map(len, mates))}),
                     "median_kth": round(float(np.median([dd[-1] for _, dd in lists])), 4),
                     "exact_median_kth": round(float(np.median(exact_d[:, -1])), 4),
                     "load": round(os.getloadavg()[0], 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _true_mates(idx, queries: np.ndarray, exact_ids: np.ndarray) -> list[set]:
    """Per query image, the images of its exact list in its true group (by file name,
    `list_candidates_real.name_group`)."""
    from list_candidates_real import name_group

    entries = idx.manifest.get_many(np.unique(np.concatenate([queries, exact_ids.ravel()])).tolist())
    group = {i: name_group(e.path) for i, e in entries.items()}
    return [{j for j in row if group[j] == group[q]} for q, row in zip(queries.tolist(), exact_ids.tolist())]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("time", help="time the lists of the first --sample images")
    t.add_argument("index", type=Path)
    t.add_argument("--sample", type=int, default=256)
    t.add_argument("--save", type=Path, help="write the lists found here (.npz), for `compare`")
    c = sub.add_parser("compare", help="two saved samples of lists, e.g. two checkouts'")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    k = sub.add_parser("kernel", help="the lists' pools scored per image against per segment")
    k.add_argument("index", type=Path)
    k.add_argument("--sample", type=int, default=256)
    k.add_argument("--repeat", type=int, default=2)
    a = sub.add_parser("agree", help="candidate settings against exact lists")
    a.add_argument("index", type=Path)
    a.add_argument("--sample", type=int, default=256)
    a.add_argument("--settings", default="84:16:128,8:16:32",
                   help="comma-separated per_patch:nprobe:layout_k")
    a.add_argument("--exact-limit", type=int, help="the index was built with FAISS above this many images "
                   "(benchmarks/list_candidates_real.py's small limit)")
    a.add_argument("--truth-by-name", action="store_true",
                   help="also the share of the true group mates of the exact lists kept (UKBench / copies-set names)")
    args = p.parse_args()
    if args.cmd == "time":
        print(json.dumps(time_lists(args)))
    elif args.cmd == "kernel":
        kernel_calls(args)
    elif args.cmd == "compare":
        print(json.dumps(compare(args.a, args.b)))
    else:
        agree(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
