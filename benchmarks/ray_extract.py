#!/usr/bin/env python
"""Images per second of `retrieval build` with and without `--ray`, on the same images.

    python benchmarks/ray_extract.py --images ../shared/data/ukbench/full --count 200 \\
        --onnx ../shared/weights/mobilenetv2-12-int8.onnx --onnx-output 627 --json out.json

Runs the real command line into fresh indexes and fresh feature stores (so every image
is extracted): the plain local path and `--ray local` (or `--ray ADDRESS`), `--repeat`
times each in ABBA order (local, ray, ray, local, ...). For each run: the wall time of the whole command (process start, Ray start-up, extraction,
publishing) and the seconds `build` reports for its add. Then it checks that both runs
stored the same descriptors (max relative difference) and answer the same queries
(the last run of each mode).
Extra arguments after `--` go to both builds (extractor options).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _build(index: Path, store: Path, listing: Path, flags: list[str]) -> dict:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "retrieval.cli", "build", str(index), f"@{listing}",
                          "--store", str(store), "--json", "--quiet", *flags],
                         capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if out.returncode not in (0, 3):
        raise SystemExit(f"build failed ({out.returncode}): {out.stderr[-2000:]}")
    report = json.loads(out.stdout)
    return {"wall_s": round(wall, 2), "add_s": report["seconds"], "images": report["added"],
            "images_per_s_wall": round(report["added"] / wall, 2),
            "images_per_s_add": round(report["added"] / report["seconds"], 2)}


def _descriptors(store: Path) -> dict:
    with sqlite3.connect(store) as conn:
        rows = conn.execute("SELECT digest, region, data, dtype FROM descriptors").fetchall()
    return {(d, r): np.frombuffer(b, dtype=t).astype(np.float32) for d, r, b, t in rows}


def _query(index: Path, paths: list[str]) -> list:
    out = subprocess.run([sys.executable, "-m", "retrieval.cli", "query", str(index), *paths, "-k", "10",
                          "--json", "--quiet"], capture_output=True, text=True, cwd=ROOT, check=True)
    return [[(h["path"], h["distance"]) for h in r["hits"]] for r in json.loads(out.stdout)["results"]]


def main() -> int:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="folder of images (sorted; the first --count are used)")
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--onnx", help="ONNX model (extractor option passed to both builds)")
    p.add_argument("--onnx-output", help="ONNX tensor (extractor option passed to both builds)")
    p.add_argument("--ray", default="local", help="the cluster of the Ray run (default: local)")
    p.add_argument("--repeat", type=int, default=2, help="runs of each mode, in ABBA order (default 2); medians reported")
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)
    if args.count < 1 or args.repeat < 1:
        p.error("--count and --repeat must be >= 1")
    paths = sorted(str(q.resolve()) for q in Path(args.images).iterdir() if q.is_file())[: args.count]
    flags = [*(["--onnx", str(Path(args.onnx).resolve())] if args.onnx else []),
             *(["--onnx-output", args.onnx_output] if args.onnx_output else []), *extra]
    work = Path(tempfile.mkdtemp(prefix="ray-extract-"))
    try:
        listing = work / "list.txt"
        listing.write_text("\n".join(paths) + "\n")
        runs: dict[str, list[dict]] = {"local": [], "ray": []}
        # ABBA order: a machine whose load drifts favours neither mode.
        order = [m for r in range(args.repeat) for m in (("local", "ray") if r % 2 == 0 else ("ray", "local"))]
        for i, mode in enumerate(order):
            for old in (work / mode, work / f"{mode}.sqlite"):
                shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
            run = _build(work / mode, work / f"{mode}.sqlite", listing,
                         [*flags, "--ray", args.ray] if mode == "ray" else flags)
            run["loadavg_1min_after"] = os.getloadavg()[0]
            runs[mode].append(run)
            print(f"{mode}: {run}", flush=True)
        local = {"runs": runs["local"], "images_per_s_add": round(float(np.median([r["images_per_s_add"] for r in runs["local"]])), 2),
                 "images_per_s_wall": round(float(np.median([r["images_per_s_wall"] for r in runs["local"]])), 2)}
        distributed = {"runs": runs["ray"], "images_per_s_add": round(float(np.median([r["images_per_s_add"] for r in runs["ray"]])), 2),
                       "images_per_s_wall": round(float(np.median([r["images_per_s_wall"] for r in runs["ray"]])), 2)}
        a, b = _descriptors(work / "local.sqlite"), _descriptors(work / "ray.sqlite")
        same_keys = a.keys() == b.keys()
        worst = max(float(np.abs(a[k] - b[k]).max() / max(np.abs(a[k]).max(), 1e-30)) for k in a) if same_keys else None
        queries = paths[:: max(1, len(paths) // 10)][:10]
        same_answers = _query(work / "local", queries) == _query(work / "ray", queries)
        result = {
            "machine": f"{os.cpu_count()} cores", "images": len(paths), "flags": flags, "ray": args.ray,
            "local": local, "ray_run": distributed, "same_descriptor_keys": same_keys,
            "max_relative_difference": worst, "same_top10_for_10_queries": same_answers,
            "ray_over_local_images_per_s_add": round(distributed["images_per_s_add"] / local["images_per_s_add"], 3),
            "ray_over_local_images_per_s_wall": round(distributed["images_per_s_wall"] / local["images_per_s_wall"], 3),
        }
        print(json.dumps(result, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
