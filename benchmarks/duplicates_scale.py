#!/usr/bin/env python
"""`retrieval duplicates` at scale, through the public API, on synthetic descriptors.

    python benchmarks/duplicates_scale.py --images 10000,30000 --raw-dim 256 --json out.json

For each N: N files and synthetic raw descriptors (benchmarks/index_scale.py's
generator: groups of `--group` near-duplicates of one scene, levels 1-4, 30 windows)
in a feature store, `Index.create` + `Index.add` (the candidate structures above the
exact limit). Above the exact limit the writer keeps the neighbour lists only once they
are asked for, so the build's neighbour stage (the writer's `_neighbours`, timed around
it) is ~0 and the first `Index.duplicates()` computes them (its seconds include the
lists); then `add` of `--more` images (the writer's neighbour stage now keeps the lists,
searching only those) and `duplicates()` again (reads them); and pairwise precision /
recall of the groups against the planted ones.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from index_scale import CONFIG, LEVELS, Generator, write_images  # noqa: E402
from retrieval import FeatureStore, Index, SearchConfig  # noqa: E402
from retrieval.engine import writer  # noqa: E402
from retrieval.extraction.extractor import Extractor  # noqa: E402


def pair_scores(groups, label) -> tuple[float, float]:
    pairs = {(min(a.id, b.id), max(a.id, b.id)) for g in groups for i, a in enumerate(g) for b in g[i + 1:]}
    tp = sum(label[a] == label[b] for a, b in pairs)
    return tp, len(pairs)


class NeighbourStageClock:
    """Seconds spent in the writer's neighbour stage (load, update, save of the lists),
    summed over the publishes made while it is installed."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._inner = writer._Writer._neighbours

    def __enter__(self) -> "NeighbourStageClock":
        clock, inner = self, self._inner

        def timed(self, state) -> None:
            t = time.perf_counter()
            try:
                inner(self, state)
            finally:
                clock.seconds += time.perf_counter() - t
        writer._Writer._neighbours = timed
        return self

    def __exit__(self, *exc) -> None:
        writer._Writer._neighbours = self._inner


def run(n: int, args, base: Path) -> dict:
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    gen = Generator(args.raw_dim, args.group, hard=False)
    key = Extractor(CONFIG).key
    with FeatureStore.open(base / "store.sqlite") as store:
        store.register_config(key, CONFIG.to_dict())
        images = write_images(base / "images", store, key, gen, range(n), "img")
        more = write_images(base / "more", store, key, gen, range(n, n + args.more), "img")
    row: dict = {"images": n, "raw_dim": args.raw_dim, "load_before": os.getloadavg()}
    with NeighbourStageClock() as clock:
        t = time.perf_counter()
        idx = Index.create(base / "index", CONFIG, SearchConfig(levels=LEVELS, pca_dim=args.pca_dim), store=base / "store.sqlite")
        idx.add(images, progress=not args.quiet)
        row["build_s"] = round(time.perf_counter() - t, 1)
        row["build_neighbours_s"] = round(clock.seconds, 1)
        row["build_without_lists_s"] = round(row["build_s"] - clock.seconds, 1)
        row["neighbours_ms_per_image"] = round(1000 * clock.seconds / n, 2)
        row["structure"] = idx.info()["structure"]
        with idx:
            t = time.perf_counter()
            first = idx.duplicates()
            row["duplicates_s"] = round(time.perf_counter() - t, 2)
            before = clock.seconds
            t = time.perf_counter()
            idx.add(more, progress=False)
            row[f"add_{args.more}_s"] = round(time.perf_counter() - t, 1)
            row[f"add_{args.more}_neighbours_s"] = round(clock.seconds - before, 1)
            t = time.perf_counter()
            idx.duplicates()
            row["duplicates_after_add_s"] = round(time.perf_counter() - t, 2)
            label = {e.id: int(Path(e.path).stem[3:]) // args.group for e in idx.manifest.entries()}
    tp, predicted = pair_scores(first.groups, label)
    truth = (n // args.group) * args.group * (args.group - 1) // 2
    row.update(groups=len(first.groups), max_distance=round(first.max_distance, 4),
               precision=round(tp / max(predicted, 1), 4), recall=round(tp / max(truth, 1), 4),
               load_after=os.getloadavg())
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default="10000", help="comma-separated collection sizes")
    parser.add_argument("--work", type=Path, default=Path("/tmp/duplicates-scale"))
    parser.add_argument("--group", type=int, default=4, help="images per planted group (default 4)")
    parser.add_argument("--more", type=int, default=1000, help="images added after the first run (default 1000)")
    parser.add_argument("--raw-dim", type=int, default=1280)
    parser.add_argument("--pca-dim", type=int, default=256)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    rows = []
    for n in (int(v) for v in args.images.split(",")):
        rows.append(run(n, args, args.work / str(n)))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
