#!/usr/bin/env python
"""What keeping the neighbour lists costs `add` and `remove` (benchmarks/results/reranking.md).

    python benchmarks/neighbour_cost.py INDEX_DIR [--images 50] [--repeats 3]

On a copy of INDEX_DIR, removes the `--images` last-listed images and adds them back
(their descriptors are in the store: nothing is extracted), `--repeats` times, and prints
the fastest `Index.remove` and `Index.add` (the writer's whole pass: segments,
tombstones, FAISS and, where the code keeps them, the neighbour lists). Run it with
PYTHONPATH at two checkouts, one after the other, to compare them.

`--in-place` works on INDEX_DIR itself (a scratch index too large to copy; it ends with
the same images). `--synthetic-lists` first writes lists of the index's size whose
entries are random live images, marked as asked for, so that the writer keeps them: it
times the writer at a size where `retrieval dba` would take hours. What the writer does
does not depend on the entries: each added image gets a candidate search, each list that
names a removed image is searched again (random lists name each image about k times, as
real lists do on average), and the lists file is read and written whole.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from retrieval.engine.index import Index  # noqa: E402
from retrieval.engine.neighbours import ASKED, Neighbours  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("index", metavar="INDEX_DIR")
    p.add_argument("--images", type=int, default=50, help="images removed and added back (default 50)")
    p.add_argument("--repeats", type=int, default=3, help="cycles; the fastest is kept (default 3)")
    p.add_argument("--in-place", action="store_true", help="time on INDEX_DIR itself, not on a copy")
    p.add_argument("--synthetic-lists", type=int, metavar="K", default=0,
                   help="first write K random neighbours per image, kept by the writer (timing only)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(args.index)
        if not args.in_place:
            copy = Path(tmp) / "idx"
            shutil.copytree(args.index, copy)
        with Index.open(copy) as idx:
            idx.view()  # publish what is pending first: the cycles time only their own work
            if args.synthetic_lists:
                write_random_lists(idx, args.synthetic_lists)
            paths = sorted(e.path for e in idx.manifest.entries())[-args.images:]
            removing, adding = [], []
            for _ in range(args.repeats):
                start = time.perf_counter()
                idx.remove(paths)
                removing.append(time.perf_counter() - start)
                start = time.perf_counter()
                idx.add(paths, progress=False)
                adding.append(time.perf_counter() - start)
            print(f"{args.images} of {idx.manifest.count()} images: remove {min(removing):.2f} s, "
                  f"add {min(adding):.2f} s (fastest of {args.repeats}); neighbours {idx.info()['neighbours']}")
    return 0


def write_random_lists(idx: Index, k: int) -> None:
    """Lists of k random live images per image, in the current generation's format,
    marked as asked for (so kept by every later add and remove)."""
    view = idx.view()
    live = view.live_ids()
    rng = np.random.default_rng(0)
    near = live[rng.integers(0, len(live), (len(live), k))]
    dist = np.sort(rng.uniform(0.5, 1.2, (len(live), k)).astype(np.float32), axis=1)
    meta = {**idx._neighbour_settings(k).meta(view), "images": int(len(live)),
            "generation": view.state.generation, ASKED: True}
    Neighbours(live, near, dist, meta).save(idx.path)


if __name__ == "__main__":
    sys.exit(main())
