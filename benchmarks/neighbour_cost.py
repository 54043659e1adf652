#!/usr/bin/env python
"""What keeping the neighbour lists costs `add` and `remove` (benchmarks/results/reranking.md).

    python benchmarks/neighbour_cost.py INDEX_DIR [--images 50] [--repeats 3]

On a copy of INDEX_DIR, removes the `--images` last-listed images and adds them back
(their descriptors are in the store: nothing is extracted), `--repeats` times, and prints
the fastest `Index.remove` and `Index.add` (the writer's whole pass: segments,
tombstones, FAISS and, where the code keeps them, the neighbour lists). Run it with
PYTHONPATH at two checkouts, one after the other, to compare them.
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

from retrieval.engine.index import Index  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("index", metavar="INDEX_DIR")
    p.add_argument("--images", type=int, default=50, help="images removed and added back (default 50)")
    p.add_argument("--repeats", type=int, default=3, help="cycles; the fastest is kept (default 3)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "idx"
        shutil.copytree(args.index, copy)
        with Index.open(copy) as idx:
            idx.view()  # publish what is pending first: the cycles time only their own work
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


if __name__ == "__main__":
    sys.exit(main())
