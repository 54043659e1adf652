"""Extraction speed through the product: images per second that `Index.add` describes and
commits (feature store and manifest), per patch mode and backend, against the network-only
limit, with the milliseconds per stage and the hours a million photos would take.

    python benchmarks/extract_speed.py --images ../shared/data/ukbench/full --limit 60 \
        --json benchmarks/results/extract_speed.json
    # the same measurement of another tree (e.g. the code before a change):
    python benchmarks/extract_speed.py --code /path/to/other/checkout --limit 60

For each backend x mode, on the same images:

- product: a throw-away index and feature store in a temporary folder, one warm-up
  extraction of 2 images (not stored), then `Index.add(paths)` timed. `img/s` counts the
  describing part of it (extraction, store and manifest commits); the publish that follows
  (whitening, segments) is timed apart and shown as `publish s`.
- network-only limit: the same backbone called on the prepared uint8 inputs of the same
  images, in the batches the extractor forms (consecutive windows, `--batch-size`, one
  pass per input shape), nothing else running: `limit img/s`; `of limit` = img/s / limit.
- stages, each timed alone over the same images, ms per image: decode (JPEG -> RGB,
  EXIF), cut (crop + resize of every window, or the whole image for roi), network,
  pooling, commit (store put + manifest add of the image's descriptors, one transaction
  each, as `Index.add` does).
- in-pipeline busy time (when the extractor reports `timings`): seconds each stage of the
  pipeline was busy during the product run, per image.

Each backend x mode row runs in a process of its own, as a user's process describes with
one mode: rows run one after the other in one process affect each other (a pyramid row
right after a crop row ran 8-12 % slower than on its own: crop's stage timings leave
about 1.7 GB of freed inputs behind). `--in-process` runs them all in this one.

`--sweep` adds the old table: the bare extractor (no store) over `--batch-sizes` x `--workers`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # also when loaded by path (tests)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from code_root import code_root  # noqa: E402

ROOT = code_root()

import numpy as np  # noqa: E402

from retrieval import config as rconfig  # noqa: E402
from retrieval.config import ExtractorConfig, InputSpec, RuntimeConfig, SearchConfig  # noqa: E402
from retrieval.engine.index import Index  # noqa: E402
from retrieval.engine.manifest import Manifest  # noqa: E402
from retrieval.extraction.extractor import Extractor  # noqa: E402
from retrieval.extraction.inputs import Job, prepare_inputs  # noqa: E402
from retrieval.extraction.pooling import pool_map, pyramid_plan, pyramid_pool, roi_pool  # noqa: E402
from retrieval.extraction.images import expand_inputs, load_rgb  # noqa: E402
from retrieval.extraction.patches import level_names, level_regions  # noqa: E402
from retrieval.extraction.store import FeatureStore  # noqa: E402
from pretrained_torch import SHARED, SQUEEZENET_SPEC  # noqa: E402 - ../shared and its SqueezeNet's Caffe input


def backends(args) -> dict[str, ExtractorConfig]:
    weights = Path(args.weights)

    def torch_weights(arch: str) -> str:
        if not args.torch_weights:
            return "none"
        checkpoint = Path(args.torch_weights) / f"{arch}.pt"
        return str(checkpoint.resolve()) if checkpoint.is_file() else "none"

    known = {
        "onnx-mobilenetv2-int8": lambda: ExtractorConfig(
            onnx=str((weights / "mobilenetv2-12-int8.onnx").resolve()), onnx_output="627"),
        "onnx-squeezenet1.1-fp16": lambda: ExtractorConfig(
            onnx=str((weights / "squeezenet1.1-fp16.onnx").resolve()), onnx_output="fire9/concat_1",
            input_spec=InputSpec.parse(SQUEEZENET_SPEC)),
        # torchvision architectures, fp32, random init (no download here) unless
        # --torch-weights holds the architecture's checkpoint (benchmarks/pretrained_torch.py)
        "torch-mobilenet_v2": lambda: ExtractorConfig(backbone="mobilenet_v2", weights=torch_weights("mobilenet_v2"),
                                                      layer="features"),
        "torch-squeezenet1_1": lambda: ExtractorConfig(backbone="squeezenet1_1", weights=torch_weights("squeezenet1_1"),
                                                       layer="features", input_spec=InputSpec.parse(SQUEEZENET_SPEC)),
        "torch-resnet50": lambda: ExtractorConfig(backbone="resnet50", weights=torch_weights("resnet50")),
    }
    # TORCH-BACKEND-bf16: the same network with --precision bf16 (fast on a CPU with
    # AVX512_BF16 / AMX, or a recent GPU).
    for name in [n for n in known if n.startswith("torch-")]:
        known[f"{name}-bf16"] = lambda fp32=known[name]: dataclasses.replace(fp32(), precision="bf16")
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in wanted if b not in known]
    if unknown:
        raise SystemExit(f"unknown backend(s) {unknown}; choose from {', '.join(known)}")
    return {b: known[b]() for b in wanted}


def with_mode(config: ExtractorConfig, mode: str) -> ExtractorConfig:
    """A patch mode of config.PATCH_MODES, `MODE@N` (that mode with --roi-size N), either
    with `:POOL` (the region pooling, config.POOLS; default the backend's), e.g. `pyramid:gem`."""
    mode, _, pool = mode.partition(":")
    patch_mode, _, size = mode.partition("@")
    if pool and pool not in rconfig.POOLS:
        raise SystemExit(f"unknown pooling {pool!r} in mode {mode}:{pool}; choose from {', '.join(rconfig.POOLS)}")
    return dataclasses.replace(config, patch_mode=patch_mode, roi_size=int(size) if size else None,
                               pool=pool or config.pool)


def product_run(config: ExtractorConfig, paths: list[str], levels, runtime: RuntimeConfig, work: Path) -> dict:
    """`Index.add` over `paths` into a fresh index and store; the publish timed apart."""
    idx = Index.create(work / "idx", config, SearchConfig(levels=levels), store=work / "store.sqlite",
                       runtime=runtime)
    try:
        regions = tuple(level_regions(lv) for lv in levels)
        list(idx.extractor.extract([Job(p, regions) for p in paths[:2]], progress=False))  # warm-up
        spent = {"publish": 0.0}
        publish = idx._publish

        def timed_publish(progress: bool) -> None:
            t0 = time.perf_counter()
            publish(progress)
            spent["publish"] += time.perf_counter() - t0

        idx._publish = timed_publish
        start = time.perf_counter()
        report = idx.add(paths, progress=False)
        total = time.perf_counter() - start
        describe_s = total - spent["publish"]
        timings = dict(getattr(idx.extractor, "timings", {}) or {})
        return {"added": report.added, "skipped": len(report.skipped), "add_s": total,
                "publish_s": spent["publish"], "describe_s": describe_s,
                "images_per_s": report.added / describe_s, "pipeline_busy_s": timings,
                "backbone": idx.extractor.backbone, "store": idx.store.path, "key": idx.extractor.key}
    finally:
        idx.close()


def stages(backbone, config: ExtractorConfig, paths: list[str], levels, batch: int, product: dict,
           work: Path) -> dict:
    """Each stage alone over the same images (ms per image) and the network-only limit."""
    size = tuple(int(v) for v in backbone.input_size)
    regions = tuple(level_regions(lv) for lv in levels)
    t0 = time.perf_counter()
    for p in paths:
        load_rgb(p)
    decode = time.perf_counter() - t0
    t0 = time.perf_counter()
    inputs = []
    for p in paths:
        inputs.extend(prepare_inputs(Job(p, regions), size, config.patch_mode, config.roi_size)[1])
    cut = max(0.0, time.perf_counter() - t0 - decode)
    # The extractor's batches: consecutive inputs, `batch` at a time, one pass per shape.
    batches = [inputs[i:i + batch] for i in range(0, len(inputs), batch)]
    shaped = []
    for b in batches:
        groups: dict[tuple, list] = {}
        for arr in b:
            groups.setdefault(arr.shape, []).append(arr)
        shaped.extend(np.stack(g) for g in groups.values())
    backbone(shaped[0][:1])  # warm-up
    t0 = time.perf_counter()
    feats = [backbone(x) for x in shaped]
    network = time.perf_counter() - t0
    maps = [f for chunk in feats for f in chunk]
    if config.patch_mode == "pyramid":
        # The product's pooling of each image's maps together (`pyramid_pool`). Without
        # mirrored windows an image's inputs are the network's size, then the larger one,
        # and the extractor's batches keep each size in image order.
        if pyramid_plan(regions)[0] != [(0, False), (1, False)]:
            raise SystemExit("extract_speed.py times pyramid pooling for two unmirrored inputs per image")
        side = min(f.shape[-1] for f in maps)
        maps = list(zip([f for f in maps if f.shape[-1] == side], [f for f in maps if f.shape[-1] != side]))
    t0 = time.perf_counter()
    for f in maps:
        if config.patch_mode == "roi":
            for rs in regions:
                for box in rs.boxes:
                    roi_pool(f, box, config.pool)
        elif config.patch_mode == "pyramid":
            pyramid_pool(regions, list(f), config.pool, config.pyramid_average)
        else:
            pool_map(f, config.pool)
    pooling = time.perf_counter() - t0
    # Commit: the product's descriptors, put again into a fresh store + manifest, one
    # transaction each per image, as Index.add does.
    names = level_names(levels)
    with FeatureStore.open(product["store"]) as src:
        digests = [r[0] for r in src.conn.execute("SELECT digest FROM images")]
        rows = [(d, src.image_size(d), src.get(d, product["key"], names)) for d in digests]
    commit_dir = work / "commit"
    commit_dir.mkdir()
    store = FeatureStore.open(commit_dir / "store.sqlite")
    manifest = Manifest(commit_dir / "manifest.sqlite")
    t0 = time.perf_counter()
    for i, (d, (w, h), arrays) in enumerate(rows):
        store.put(d, product["key"], w, h, arrays)
        manifest.add(f"/img/{i}.jpg", d, w, h)
    commit = time.perf_counter() - t0
    store.close()
    manifest.close()
    n = len(paths)
    return {
        "decode_ms": 1000 * decode / n,
        "cut_ms": 1000 * cut / n,
        "network_ms": 1000 * network / n,
        "pooling_ms": 1000 * pooling / n,
        "commit_ms": 1000 * commit / max(1, len(rows)),
        "network_inputs_per_image": len(inputs) / n,
        "network_passes": len(shaped),
        "limit_images_per_s": n / network,
    }


def measure_row(name: str, config: ExtractorConfig, mode: str, every: list[str], levels, runtime: RuntimeConfig,
                args) -> dict:
    """One backend x mode: the product run, then each stage alone, in this process."""
    paths = every[: args.roi_limit if config.patch_mode == "roi" else args.limit]
    with tempfile.TemporaryDirectory(prefix="extract-speed-") as tmp:
        work = Path(tmp)
        product = product_run(config, paths, levels, runtime, work)
        parts = stages(product.pop("backbone"), config, paths, levels, args.batch_size, product, work)
    product.pop("store"), product.pop("key")
    ips = product["images_per_s"]
    weights = Path(config.onnx).name if config.onnx else config.weights
    return {"backend": name, "mode": mode, "weights": weights, "images": len(paths), **product, **parts,
            "fraction_of_limit": ips / parts["limit_images_per_s"],
            "hours_per_million": 1e6 / ips / 3600, "load_after": os.getloadavg()[0]}


def row_in_child(name: str, mode: str) -> dict:
    """`measure_row` in a fresh process: this command line, for that one row (argparse
    keeps the last of a repeated option, so the row's own options are appended; the
    sweep stays with this process)."""
    keep = [arg for arg in sys.argv[1:] if arg != "--sweep"]
    with tempfile.TemporaryDirectory(prefix="extract-speed-row-") as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *keep, "--backends", name, "--modes", mode,
               "--in-process", "--json", str(out)]
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL)
        if done.returncode != 0:
            raise SystemExit(f"the row {name} {mode} failed (exit {done.returncode}): {' '.join(cmd)}")
        return json.loads(out.read_text())["rows"][0]


def timed_run(config: ExtractorConfig, mode: str, paths: list[str], levels, batch: int, workers: int) -> float:
    """The bare extractor (no store), for the --sweep table."""
    ex = Extractor(with_mode(config, mode), RuntimeConfig("cpu", batch, workers))
    regions = tuple(level_regions(lv) for lv in levels)
    list(ex.extract([Job(p, regions) for p in paths[:4]], progress=False))  # warm-up
    start = time.perf_counter()
    n = sum(1 for _ in ex.extract([Job(p, regions) for p in paths], progress=False))
    return n / (time.perf_counter() - start)


def revision(root: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(root), "log", "-1", "--format=%h %s"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip()[:70] + (" (+ uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--code", default=str(ROOT), help="checkout whose retrieval package is measured")
    ap.add_argument("--images", default=str(SHARED / "data" / "ukbench" / "full"))
    ap.add_argument("--limit", type=int, default=60, help="images per configuration (the first ones, sorted)")
    ap.add_argument("--roi-limit", type=int, default=256,
                    help="images for the roi modes (one network input per image: a few batches need many images)")
    ap.add_argument("--weights", default=str(SHARED / "weights"), help="folder of the ONNX files")
    ap.add_argument("--torch-weights", metavar="DIR",
                    help="folder of <architecture>.pt checkpoints for the torch backends (those absent: random "
                         "init); benchmarks/pretrained_torch.py writes mobilenet_v2.pt and squeezenet1_1.pt")
    ap.add_argument("--backends",
                    default="onnx-mobilenetv2-int8,onnx-squeezenet1.1-fp16,torch-mobilenet_v2,torch-resnet50")
    ap.add_argument("--modes", default="all",
                    help="all (config.PATCH_MODES), or a list of them, MODE@N (with --roi-size N) and MODE:POOL (e.g. pyramid:gem)")
    ap.add_argument("--levels", default="1,2,3,4")
    ap.add_argument("--batch-size", type=int, default=RuntimeConfig().batch_size)
    ap.add_argument("--workers", type=int, default=RuntimeConfig().workers, help="decode threads")
    ap.add_argument("--device", default="cpu", choices=rconfig.DEVICES,
                    help="where the network runs (cuda: the network-only limit is measured there too)")
    ap.add_argument("--sweep", action="store_true", help="also the bare extractor over --batch-sizes x --sweep-workers")
    ap.add_argument("--batch-sizes", default="8,32,64")
    ap.add_argument("--sweep-workers", default="1,2")
    ap.add_argument("--in-process", action="store_true",
                    help="run every row in this process (default: each in a fresh one)")
    ap.add_argument("--json", metavar="OUT")
    args = ap.parse_args()
    every = sorted(expand_inputs([args.images]))
    paths = every[: args.limit]
    if not paths:
        ap.error(f"no images under {args.images}")
    levels = tuple(int(v) for v in args.levels.split(","))
    modes = list(rconfig.PATCH_MODES) if args.modes == "all" else args.modes.split(",")
    runtime = RuntimeConfig(args.device, args.batch_size, args.workers)
    load_before = os.getloadavg()
    print(f"code: {ROOT} ({revision(ROOT)}); {len(paths)} images ({args.roi_limit} for roi), levels {args.levels}, batch {args.batch_size}, "
          f"{args.workers} decode threads, device {args.device}; load average {load_before[0]:.2f}", flush=True)
    rows = []
    head = (f"{'backend':24s} {'mode':6s} {'images':>6s} {'img/s':>6s} {'limit':>6s} {'of lim':>6s} {'h/1M':>6s} "
            f"{'decode':>6s} {'cut':>6s} {'net':>7s} {'pool':>5s} {'commit':>6s} {'publish s':>9s} {'load':>5s}")
    print(head, flush=True)
    for name, base in backends(args).items():
        for mode in modes:
            if args.in_process:
                row = measure_row(name, with_mode(base, mode), mode, every, levels, runtime, args)
            else:
                row = row_in_child(name, mode)
            rows.append(row)
            print(f"{name:24s} {mode:6s} {row['images']:6d} {row['images_per_s']:6.2f} {row['limit_images_per_s']:6.2f} "
                  f"{row['fraction_of_limit']:6.0%} {row['hours_per_million']:6.1f} {row['decode_ms']:6.1f} "
                  f"{row['cut_ms']:6.1f} {row['network_ms']:7.1f} {row['pooling_ms']:5.1f} "
                  f"{row['commit_ms']:6.1f} {row['publish_s']:9.2f} {row['load_after']:5.2f}", flush=True)
    busy = [r for r in rows if r["pipeline_busy_s"]]
    if busy:
        print("\nin-pipeline busy time during Index.add (ms per image; prepare summed over decode threads)")
        for r in busy:
            t = r["pipeline_busy_s"]
            per = {k: 1000 * t.get(k, 0.0) / r["added"] for k in
                   ("prepare", "network", "pool", "network_waits_input", "assemble", "caller_waits")}
            print(f"{r['backend']:24s} {r['mode']:6s} " + "  ".join(f"{k} {v:.1f}" for k, v in per.items())
                  + f"  ({int(t.get('batches', 0))} network passes)")
    for r in rows:
        print(f"1,000,000 photos, {r['backend']} {r['mode']}: {r['hours_per_million']:.1f} h on this machine")
    sweep = []
    if args.sweep:
        for name, base in backends(args).items():
            for mode in modes:
                for b in (int(v) for v in args.batch_sizes.split(",")):
                    for w in (int(v) for v in args.sweep_workers.split(",")):
                        ips = timed_run(base, mode, paths, levels, b, w)
                        sweep.append({"backend": name, "mode": mode, "batch": b, "workers": w, "images_per_s": ips})
                        print(f"{name:24s} {mode:6s} batch {b:3d} workers {w}: {ips:7.2f} img/s (no store)", flush=True)
    result = {
        "code": str(ROOT), "revision": revision(ROOT), "images": args.limit, "roi_images": args.roi_limit, "levels": list(levels),
        "batch_size": args.batch_size, "workers": args.workers, "device": args.device, "rows": rows, "sweep": sweep,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_before": [round(v, 2) for v in load_before],
                    "load_after": [round(v, 2) for v in os.getloadavg()]},
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
