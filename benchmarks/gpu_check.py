"""The GPU paths, checked and timed through `Index`: CUDA against CPU extraction, and FAISS.

    python benchmarks/gpu_check.py --images ../shared/data/ukbench/full --limit 200 --json gpu.json

For each torchvision backbone (random weights: nothing is downloaded) and patch mode it
builds the same index twice, `--device cuda` and `--device cpu`, each into its own
feature store, and reports images per second, the largest difference between the two
devices' stored descriptors (smallest window cosine, largest difference relative to the
largest value), and whether the two indexes rank the same top 5
for every indexed image used as a query. It also reports what the machine offers: the
GPU, ONNX Runtime's providers (with `--onnx`, the same comparison through ONNX Runtime
when it has CUDAExecutionProvider), FAISS's GPU count, and the native kernel's
instruction set. Where a component is missing it says so in the output, not silently.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from retrieval import ExtractorConfig, Index, RuntimeConfig, SearchConfig  # noqa: E402
from retrieval.config import file_digest  # noqa: E402
from retrieval.extraction.images import expand_inputs  # noqa: E402
from retrieval.extraction.patches import level_names  # noqa: E402

LEVELS = (1, 2, 3, 4)


def environment() -> dict:
    import faiss
    import onnxruntime
    import torch

    from retrieval.engine import kernel

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers": onnxruntime.get_available_providers(),
        "faiss": faiss.__version__,
        "faiss_gpus": faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0,
        "kernel": getattr(kernel, "describe", lambda: "?")(),
    }
    return env


def build(config: ExtractorConfig, device: str, paths: list[str], folder: Path, batch: int) -> tuple[Index, float]:
    index = Index.create(folder / "index", config, SearchConfig(levels=LEVELS), store=folder / "store.sqlite",
                         runtime=RuntimeConfig(device=device, batch_size=batch))
    index.add(paths[:8], progress=False)  # warm-up: model load, CUDA context, cuDNN autotune
    start = time.perf_counter()
    index.add(paths[8:], progress=False)
    return index, (len(paths) - 8) / (time.perf_counter() - start)


def compare(config: ExtractorConfig, devices: list[str], paths: list[str], work: Path, batch: int) -> dict:
    row: dict = {"config": config.summary(), "devices": devices}
    first, row["a_img_s"] = build(config, devices[0], paths, work / "a", batch)
    second, row["b_img_s"] = build(config, devices[1], paths, work / "b", batch)
    names = level_names(LEVELS)
    digests = [file_digest(p) for p in paths]
    a = first.store.get_many(digests, first.extractor.key, names)
    b = second.store.get_many(digests, second.extractor.key, names)
    worst, rel = 1.0, 0.0
    for d in digests:
        x, y = a[d].astype(np.float64), b[d].astype(np.float64)
        rel = max(rel, float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-12)))
        norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
        live = norms > 0  # a random-weight network leaves some windows all zero on both devices
        if live.any():
            worst = min(worst, float(((x * y).sum(1)[live] / norms[live]).min()))
    row["min_window_cosine"] = round(worst, 6)
    row["max_rel_diff"] = float(f"{rel:.3g}")
    queries = paths[:50]
    tops = [[[h.path for h in r.hits] for r in idx.search(queries, k=5)] for idx in (first, second)]
    row["same_top5_share"] = float(np.mean([g == c for g, c in zip(*tops)]))
    row["speedup"] = round(row["a_img_s"] / row["b_img_s"], 2)  # first device over second
    first.close()
    second.close()
    shutil.rmtree(work / "a")
    shutil.rmtree(work / "b")
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", required=True, help="folder of images (e.g. ../shared/data/ukbench/full)")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--backbones", default="resnet50,mobilenet_v2", help="torchvision names (random weights)")
    p.add_argument("--modes", default="crop,roi")
    p.add_argument("--onnx", help="also compare this ONNX model (CUDAExecutionProvider against CPU)")
    p.add_argument("--onnx-output", help="the tensor to cut the ONNX model at")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--devices", default="cuda,cpu", help="the two devices compared (cpu,cpu checks the script)")
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)
    env = environment()
    print(json.dumps(env), flush=True)
    paths = sorted(expand_inputs([args.images]))[: args.limit]
    configs = []
    devices = args.devices.split(",")
    if env["cuda_available"] or "cuda" not in devices:
        configs = [ExtractorConfig(backbone=b, weights="none", patch_mode=m)
                   for b in args.backbones.split(",") for m in args.modes.split(",")]
    if args.onnx:
        if "CUDAExecutionProvider" in env["onnxruntime_providers"]:
            configs += [ExtractorConfig(onnx=args.onnx, onnx_output=args.onnx_output, patch_mode=m)
                        for m in args.modes.split(",")]
        else:
            print("onnx: onnxruntime here has no CUDAExecutionProvider (install onnxruntime-gpu): not compared",
                  flush=True)
    rows = []
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        for config in configs:
            row = compare(config, devices, paths, work, args.batch_size)
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "images": len(paths), "rows": rows}, indent=1))
    return 0 if env["cuda_available"] or "cuda" not in devices else 3


if __name__ == "__main__":
    sys.exit(main())
