"""What the torch backbone's forward pass could gain on its device from settings the product
does not use yet: cuDNN autotuning, channels_last memory and bf16 autocast. A probe to
decide a change, not a product number: the product's own throughput is extract_speed.py's.

    python benchmarks/network_probe.py --device cuda --backbone resnet50 --json probe.json

For each input side (224: a crop window; 448: the pyramid's largest level) and setting it
times the product's backbone call (`TorchBackbone`, random weights) on the same random
uint8 batch and reports inputs per second and the largest difference of the output from
the default setting's, relative to the output's largest value (bf16 and TF32 change
descriptors; the store's float16 keeps about 1e-3).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from retrieval.config import ExtractorConfig  # noqa: E402
from retrieval.extraction.torch_backbone import TorchBackbone  # noqa: E402


def timed(fn, x, rounds: int) -> tuple[float, np.ndarray]:
    out = fn(x)  # warm-up (and cuDNN's autotuning, when on)
    fn(x)
    start = time.perf_counter()
    for _ in range(rounds):
        out = fn(x)
    return rounds * len(x) / (time.perf_counter() - start), out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--sides", default="224,448")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--json")
    args = ap.parse_args()
    import torch

    bb = TorchBackbone(ExtractorConfig(backbone=args.backbone, weights="none"), device=args.device)
    rng = np.random.default_rng(0)
    rows = []
    for side in (int(s) for s in args.sides.split(",")):
        batch = args.batch if side <= 224 else max(1, args.batch // 4)
        x = rng.integers(0, 256, size=(batch, side, side, 3), dtype=np.uint8)
        base_rate, base = timed(bb, x, args.rounds)
        scale = float(np.abs(base).max()) or 1.0
        rows.append({"side": side, "batch": batch, "setting": "product", "inputs_per_s": base_rate, "rel_diff": 0.0})
        settings = []
        torch.backends.cudnn.benchmark = True
        settings.append(("cudnn.benchmark", bb))
        bb.module = bb.module.to(memory_format=torch.channels_last)
        bb.channels_last = True
        settings.append(("cudnn.benchmark + channels_last", bb))

        def bf16(images):
            with torch.autocast(device_type=bb.device.split(":")[0], dtype=torch.bfloat16):
                return bb(images)
        settings.append(("cudnn.benchmark + channels_last + bf16 autocast", bf16))
        for name, fn in settings:
            rate, out = timed(fn, x, args.rounds)
            rows.append({"side": side, "batch": batch, "setting": name, "inputs_per_s": rate,
                         "rel_diff": float(np.abs(out - base).max() / scale)})
        torch.backends.cudnn.benchmark = False
        bb.module = bb.module.to(memory_format=torch.contiguous_format)
        bb.channels_last = bb.device == "cpu"
        if bb.channels_last:
            bb.module = bb.module.to(memory_format=torch.channels_last)
    for r in rows:
        print(f"{args.backbone} {r['side']:4d} px batch {r['batch']:3d} {r['setting']:48s} "
              f"{r['inputs_per_s']:9.1f} inputs/s  rel diff {r['rel_diff']:.1e}", flush=True)
    if args.json:
        env = {"torch": torch.__version__,
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
        Path(args.json).write_text(json.dumps({"environment": env, "device": args.device, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
