#!/usr/bin/env python
"""`Index.duplicates()` at scale, through the public API, on synthetic descriptors.

    python benchmarks/duplicates_scale.py --images 10000,30000 --json out.json

For each N: N files and synthetic raw descriptors (benchmarks/index_scale.py's
generator: groups of `--group` near-duplicates of one scene, levels 1-4, 30 windows)
in a feature store, `Index.create` + `Index.add` (the candidate structures above the
exact limit), then `Index.duplicates()` timed twice: the first run computes every
image's neighbour list (one candidate search per image), the second reuses them; then
`add` of `--more` images and a third run, which searches only those. Reported: seconds
of each, seconds per image of the neighbour lists, and pairwise precision / recall of
the groups against the planted ones.
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
from retrieval.extraction.extractor import Extractor  # noqa: E402


def pair_scores(groups, label) -> tuple[float, float]:
    pairs = {(min(a.id, b.id), max(a.id, b.id)) for g in groups for i, a in enumerate(g) for b in g[i + 1:]}
    tp = sum(label[a] == label[b] for a, b in pairs)
    return tp, len(pairs)


def run(n: int, args, base: Path) -> dict:
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    gen = Generator(args.raw_dim, args.group, hard=False)
    key = Extractor(CONFIG).key
    with FeatureStore.open(base / "store.sqlite") as store:
        store.register_config(key, CONFIG.to_dict())
        images = write_images(base / "images", store, key, gen, range(n), "img")
        more = write_images(base / "more", store, key, gen, range(n, n + args.more), "img")
    row: dict = {"images": n, "load_before": os.getloadavg()}
    t = time.perf_counter()
    idx = Index.create(base / "index", CONFIG, SearchConfig(levels=LEVELS, pca_dim=args.pca_dim), store=base / "store.sqlite")
    idx.add(images, progress=not args.quiet)
    row["build_s"] = round(time.perf_counter() - t, 1)
    row["structure"] = idx.info()["structure"]
    with idx:
        t = time.perf_counter()
        first = idx.duplicates(progress=not args.quiet)
        row["first_s"] = round(time.perf_counter() - t, 1)
        row["neighbours_ms_per_image"] = round(1000 * row["first_s"] / n, 2)
        t = time.perf_counter()
        idx.duplicates()
        row["reuse_s"] = round(time.perf_counter() - t, 2)
        idx.add(more, progress=False)
        t = time.perf_counter()
        idx.duplicates()
        row[f"after_add_{args.more}_s"] = round(time.perf_counter() - t, 1)
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
