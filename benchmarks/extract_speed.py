"""Extraction speed: images per second, crop against roi, torch against ONNX Runtime,
batch sizes and decode threads, and where the time goes.

    python benchmarks/extract_speed.py --images ../shared/data/ukbench/full --limit 120 \
        --json results/extract_speed.json

Each configuration runs the real extractor (threads, batching, pooling) over the same
images with no feature store, after one warm-up batch. The breakdown times each stage on
its own over the same images: decode (JPEG -> RGB, EXIF), cut (crop + resize of every
window, or of the whole image for roi), network (backbone forward on the batches the
extractor would form) and pooling.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from retrieval.config import ExtractorConfig, InputSpec, RuntimeConfig  # noqa: E402
from retrieval.extraction.extractor import Extractor, Job, _area_pool_many, _pool, _prepare, _roi_pool  # noqa: E402
from retrieval.extraction.images import expand_inputs, load_rgb  # noqa: E402
from retrieval.extraction.patches import level_regions  # noqa: E402

SHARED = ROOT.parent / "shared"


def backends(args) -> dict[str, ExtractorConfig]:
    out = {}
    if "onnx" in args.backends:
        out["onnx-mobilenetv2-int8"] = ExtractorConfig(onnx=str(Path(args.onnx).resolve()), onnx_output="627")
    if "torch" in args.backends:
        # Same architecture as the ONNX model, fp32, random init (no download here).
        out["torch-mobilenet_v2-fp32"] = ExtractorConfig(backbone="mobilenet_v2", weights="none", layer="features")
    return out


def with_mode(config: ExtractorConfig, mode: str) -> ExtractorConfig:
    """`crop`, `roi` or `roi@N` (roi with the long side at N pixels)."""
    patch_mode, _, size = mode.partition("@")
    return dataclasses.replace(config, patch_mode=patch_mode, roi_size=int(size) if size else None)


def timed_run(config: ExtractorConfig, mode: str, paths: list[str], levels, batch: int, workers: int) -> float:
    ex = Extractor(with_mode(config, mode), RuntimeConfig("cpu", batch, workers))
    regions = tuple(level_regions(lv) for lv in levels)
    list(ex.extract([Job(p, regions) for p in paths[:4]], progress=False))  # warm-up
    start = time.perf_counter()
    n = sum(1 for _ in ex.extract([Job(p, regions) for p in paths], progress=False))
    return n / (time.perf_counter() - start)


def breakdown(config: ExtractorConfig, mode: str, paths: list[str], levels, batch: int) -> dict:
    config = with_mode(config, mode)
    ex = Extractor(config, RuntimeConfig("cpu", batch, 1))
    bb = ex.backbone
    size = tuple(int(v) for v in bb.input_size)
    regions = tuple(level_regions(lv) for lv in levels)
    t0 = time.perf_counter()
    for p in paths:
        load_rgb(p)
    decode = time.perf_counter() - t0
    t0 = time.perf_counter()
    inputs = []
    for p in paths:
        inputs.extend(_prepare(Job(p, regions), size, config.patch_mode, config.roi_size)[1])
    cut = time.perf_counter() - t0 - decode
    # roi@N inputs keep their aspect ratio: batch equal shapes, as the extractor does.
    groups: dict[tuple, list[np.ndarray]] = {}
    for arr in inputs:
        groups.setdefault(arr.shape, []).append(arr)
    bb(np.stack(inputs[:1]))  # warm-up
    t0 = time.perf_counter()
    feats = [bb(np.stack(g[i : i + batch])) for g in groups.values() for i in range(0, len(g), batch)]
    network = time.perf_counter() - t0
    t0 = time.perf_counter()
    for chunk in feats:
        for f in chunk:
            if config.patch_mode == "pyramid":  # every window from both maps: an upper bound
                for rs in regions:
                    _area_pool_many(f, rs.boxes, config.pool)
            elif config.patch_mode == "roi":
                for rs in regions:
                    for box in rs.boxes:
                        _roi_pool(f, box, config.pool)
            else:
                _pool(f, config.pool)
    pooling = time.perf_counter() - t0
    n = len(paths)
    return {
        "decode_ms": 1000 * decode / n,
        "cut_ms": 1000 * cut / n,
        "network_ms": 1000 * network / n,
        "pooling_ms": 1000 * pooling / n,
        "network_inputs_per_image": len(inputs) / n,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default=str(SHARED / "data" / "ukbench" / "full"))
    ap.add_argument("--limit", type=int, default=120)
    ap.add_argument("--onnx", default=str(SHARED / "weights" / "mobilenetv2-12-int8.onnx"))
    ap.add_argument("--backends", default="onnx,torch")
    ap.add_argument("--levels", default="1,2,3,4")
    ap.add_argument("--batch-sizes", default="8,32,64")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--modes", default="crop,roi,roi@448,roi@640",
                    help="crop, roi, roi@N (roi with --roi-size N), pyramid")
    ap.add_argument("--rounds", type=int, default=1,
                    help="time every configuration this many times, the modes interleaved, and keep the best "
                    "(on a shared machine: the others' load hits every mode alike)")
    ap.add_argument("--no-breakdown", action="store_true", help="skip the per-stage breakdown")
    ap.add_argument("--json", metavar="OUT")
    args = ap.parse_args()
    paths = expand_inputs([args.images])[: args.limit]
    if not paths:
        ap.error(f"no images under {args.images}")
    levels = tuple(int(v) for v in args.levels.split(","))
    batches = [int(v) for v in args.batch_sizes.split(",")]
    workers = [int(v) for v in args.workers.split(",")]
    rows, parts = [], []
    for name, config in backends(args).items():
        for mode in args.modes.split(","):
            if not args.no_breakdown:
                parts.append({"backend": name, "mode": mode, **breakdown(config, mode, paths, levels, 32)})
        for rnd in range(args.rounds):
            for mode in args.modes.split(","):
                for b in batches:
                    for w in workers:
                        load = os.getloadavg()[0]
                        ips = timed_run(config, mode, paths, levels, b, w)
                        rows.append({"backend": name, "mode": mode, "batch": b, "workers": w, "round": rnd,
                                     "images_per_s": ips, "load_before": load})
                        print(f"{name:26s} {mode:7s} batch {b:3d} workers {w} round {rnd}: {ips:7.2f} img/s "
                              f"(load {load:.1f})", flush=True)
    best = {}
    for r in rows:
        key = (r["backend"], r["mode"])
        best[key] = max(best.get(key, 0.0), r["images_per_s"])
    ratios = {f"{b} {m}": best[(b, m)] / best[(b, "crop")] for b, m in best if m != "crop" and (b, "crop") in best}
    print("\nwhere the time goes (ms per image, batch 32, one thread of decoding)")
    for p in parts:
        print(f"{p['backend']:26s} {p['mode']:7s} decode {p['decode_ms']:6.1f}  cut {p['cut_ms']:6.1f}  "
              f"network {p['network_ms']:7.1f}  pooling {p['pooling_ms']:5.1f}  "
              f"({p['network_inputs_per_image']:.0f} network inputs/image)")
    for b, r in ratios.items():
        print(f"{b} vs crop: {r:.1f}x faster (best configuration of each)")
    result = {
        "images": len(paths), "levels": list(levels), "rows": rows, "breakdown": parts,
        "roi_vs_crop": ratios,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
