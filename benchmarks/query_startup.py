"""Where a one-shot `retrieval query INDEX new.jpg` spends its time: each query in a fresh
process, timed by phase, and the same queries through the real CLI.

    python benchmarks/query_startup.py INDEX IMAGE... [--code CHECKOUT] [--json OUT]

Phases (one fresh Python process per image, images not yet in the feature store):
interpreter (process start to the first line), imports (`retrieval.cli.app` and the
engine, as the CLI imports them), open (Index.open), network load (the backbone: for ONNX
the graph cut and probed, or restored from the prepared-graph cache, and its session),
query (describe: 30 windows through the network and a store commit, then the search).
Then `retrieval query INDEX IMAGE --json --quiet` as a subprocess, on other images of the
list, for the end-to-end wall time. Use images that are new to the store: a stored image
costs no network time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PHASES = r"""
import time, json, sys
t0 = time.perf_counter()
import retrieval.cli.app  # noqa: F401
from retrieval.engine.index import Index
t1 = time.perf_counter()
idx = Index.open(sys.argv[1])
t2 = time.perf_counter()
idx.extractor.load()
t3 = time.perf_counter()
res = idx.search([sys.argv[2]], 10)
t4 = time.perf_counter()
print(json.dumps({"imports": t1 - t0, "open": t2 - t1, "network_load": t3 - t2, "query": t4 - t3,
                  "modules": sorted(m for m in ("torch", "onnx", "onnxruntime", "faiss", "ray", "fastapi")
                                    if m in sys.modules), "hits": len(res[0].hits)}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("index", type=lambda p: str(Path(p).resolve()))
    ap.add_argument("images", nargs="+", type=lambda p: str(Path(p).resolve()), help="query images new to the store; half by phase, half by the CLI")
    ap.add_argument("--code", default=str(Path(__file__).resolve().parents[1]))
    ap.add_argument("--json", metavar="OUT")
    args = ap.parse_args()
    # cwd too: `python -c` and `-m` put the working directory first on sys.path
    args.code = str(Path(args.code).resolve())
    env = {**os.environ, "PYTHONPATH": args.code}
    half = len(args.images) // 2 or 1
    phased, cli = [], []
    for image in args.images[:half]:
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", PHASES, args.index, image], capture_output=True, text=True,
                             env=env, cwd=args.code, timeout=600)
        if out.returncode != 0:
            raise SystemExit(out.stderr)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["process"] = time.perf_counter() - start
        row["interpreter"] = row["process"] - sum(row[k] for k in ("imports", "open", "network_load", "query"))
        phased.append(row)
    for image in args.images[half:]:
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "retrieval.cli", "query", args.index, image, "--json", "--quiet"],
                             capture_output=True, text=True, env=env, cwd=args.code, timeout=600)
        if out.returncode != 0:
            raise SystemExit(out.stderr)
        cli.append(time.perf_counter() - start)
    med = {k: statistics.median(r[k] for r in phased)
           for k in ("interpreter", "imports", "open", "network_load", "query", "process")}
    print(f"code: {args.code}; load average {os.getloadavg()[0]:.2f}")
    print("median seconds: " + "  ".join(f"{k} {v:.2f}" for k, v in med.items()))
    print(f"modules imported by a query: {', '.join(phased[0]['modules'])}")
    if cli:
        print(f"`retrieval query` wall, median of {len(cli)}: {statistics.median(cli):.2f} s "
              f"(min {min(cli):.2f}, max {max(cli):.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps({"code": args.code, "phases": phased, "median": med, "cli_s": cli,
                                               "load": os.getloadavg()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
