"""Network-only speed: ONNX Runtime session options, int8 against float ONNX models, and
torch CPU settings (channels_last, bf16/fp16 autocast), on prepared input tensors.

    # session options on the int8 MobileNetV2 (batch 32, 224 x 224)
    python benchmarks/network_speed.py sessions
    # float against int8 exports (retrieval export-onnx [--int8 --calibrate DIR])
    python benchmarks/network_speed.py models mnv2-fp32=/tmp/mnv2.onnx mnv2-int8=/tmp/mnv2-int8.onnx
    # torch settings
    python benchmarks/network_speed.py torch --backbone mobilenet_v2 --layer features
    # int8 agreement on pretrained weights: the fp16 SqueezeNet of ../shared made float32,
    # quantized by the product's own quantize_int8, compared on held-out images
    python benchmarks/network_speed.py squeezenet-int8

The inputs are the level-1 windows of real images (ukbench by default), cut by the
extractor's own `prepare_inputs` and normalized by the backbone's own preprocessing; the
timed call is `session.run` (ONNX: sessions made by OnnxBackbone._session, the product's
session factory, with one option changed at a time) or the torch backbone's module.
Variants run in interleaved rounds (A B C ... A B C ...) so that the load of a shared
machine spreads over all of them; the median per batch is reported.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from retrieval.config import ExtractorConfig, InputSpec, RuntimeConfig  # noqa: E402
from retrieval.extraction.backbones import load_backbone  # noqa: E402
from retrieval.extraction.extractor import Extractor  # noqa: E402
from retrieval.extraction.inputs import Job, prepare_inputs  # noqa: E402
from retrieval.extraction.pooling import pool_map  # noqa: E402
from retrieval.extraction.images import expand_inputs  # noqa: E402
from retrieval.extraction.patches import level_regions  # noqa: E402

SHARED = ROOT.parent / "shared"
MOBILENET = SHARED / "weights" / "mobilenetv2-12-int8.onnx"

# One option changed at a time against the defaults (onnx_backbone.SESSION_OPTIONS).
SESSION_VARIANTS = {
    "defaults": {},
    "intra_op_threads=1": {"intra_op_threads": 1},
    "graph_optimization=extended": {"graph_optimization": "extended"},
    "graph_optimization=basic": {"graph_optimization": "basic"},
    "execution_mode=parallel": {"execution_mode": "parallel", "inter_op_threads": 2},
    "allow_spinning=1": {"allow_spinning": True},
    "mem_pattern=0": {"mem_pattern": False},
    "cpu_mem_arena=0": {"cpu_mem_arena": False},
}


def windows(images: str, n: int, size: tuple[int, int]) -> np.ndarray:
    """Level-1 windows (whole images resized as the extractor resizes them) of n images."""
    paths = expand_inputs([images])[:n]
    if len(paths) < n:
        raise SystemExit(f"need {n} images under {images}, found {len(paths)}")
    return np.stack([prepare_inputs(Job(p, (level_regions(1),)), size, "crop")[1][0] for p in paths])


def interleaved(fns: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds of each call, `rounds` times, the variants interleaved; one warm-up each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def summary(times: dict[str, list[float]], batch: int, base: str) -> list[dict]:
    rows = []
    ref = statistics.median(times[base])
    for k, ts in times.items():
        med = statistics.median(ts)
        rows.append({"variant": k, "median_ms": round(1000 * med, 1), "min_ms": round(1000 * min(ts), 1),
                     "inputs_per_s": round(batch / med, 1), "vs_" + base: round(ref / med, 3)})
        print(f"  {k:30s} median {1000 * med:8.1f} ms  min {1000 * min(ts):8.1f} ms  "
              f"{batch / med:7.1f} inputs/s  {ref / med:5.2f}x", flush=True)
    return rows


def run_sessions(args) -> dict:
    import onnxruntime as ort

    bb = load_backbone(ExtractorConfig(onnx=args.onnx, onnx_output=args.onnx_output), "cpu")
    x = bb._prep(windows(args.images, args.batch, tuple(bb.input_size)))
    names = args.variants.split(",") if args.variants else list(SESSION_VARIANTS)
    fns = {}
    for name in names:
        sess = bb._session(bb.model, ort, **SESSION_VARIANTS[name])
        fns[name] = lambda s=sess: s.run([bb.tensor], {bb.input_name: x})
    print(f"session options, {Path(args.onnx).name} at {bb.output}, batch {args.batch} "
          f"{x.shape[2]}x{x.shape[3]}, {args.rounds} rounds")
    out = {"model": args.onnx, "output": bb.output, "batch": args.batch,
           "rows": summary(interleaved(fns, args.rounds), args.batch, names[0])}
    if args.extract:
        # the whole extractor (decoding threads + network), spinning on/off
        paths = expand_inputs([args.images])[: args.extract]
        regions = tuple(level_regions(lv) for lv in (1, 2))
        print(f"extractor, {len(paths)} images, levels 1,2, batch 32, 2 decoding threads")
        runs = {}
        for name in ("defaults", "allow_spinning=1"):
            ex = Extractor(bb.config, RuntimeConfig("cpu", 32, 2))
            ex._backbone = bb
            sess = bb._session(bb.model, ort, **SESSION_VARIANTS[name])
            runs[name] = (ex, sess)
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.extract_rounds):
            for name, (ex, sess) in runs.items():
                bb.session = sess
                t0 = time.perf_counter()
                sum(1 for _ in ex.extract([Job(p, regions) for p in paths], progress=False))
                times[name].append(time.perf_counter() - t0)
        out["extract"] = []
        for name, ts in times.items():
            med = statistics.median(ts)
            out["extract"].append({"variant": name, "images_per_s": round(len(paths) / med, 2)})
            print(f"  {name:30s} {len(paths) / med:7.2f} images/s (median of {len(ts)})")
    return out


def run_models(args) -> dict:
    """Network-only speed of several ONNX models (e.g. float and int8 exports) and the
    agreement of their pooled descriptors with the first one's."""
    bbs = {}
    for item in args.models:
        name, _, rest = item.partition("=")
        path, _, output = rest.partition(":")
        spec = InputSpec.parse(args.input_spec)
        bbs[name] = load_backbone(ExtractorConfig(onnx=path, onnx_output=output or None, input_spec=spec), "cpu")
    first = next(iter(bbs.values()))
    imgs = windows(args.images, args.batch, tuple(first.input_size))
    x = first._prep(imgs)
    fns = {k: (lambda b=b: b.session.run([b.tensor], {b.input_name: x})) for k, b in bbs.items()}
    print(f"models, batch {args.batch} {x.shape[2]}x{x.shape[3]}, {args.rounds} rounds")
    rows = summary(interleaved(fns, args.rounds), args.batch, next(iter(bbs)))
    ref = np.stack([pool_map(f, "avg") for f in first(imgs)]).astype(np.float64)
    for row, b in zip(rows, bbs.values()):
        v = np.stack([pool_map(f, "avg") for f in b(imgs)]).astype(np.float64)
        cos = (v * ref).sum(1) / (np.linalg.norm(v, axis=1) * np.linalg.norm(ref, axis=1))
        row["mean_cosine"], row["min_cosine"] = round(float(cos.mean()), 5), round(float(cos.min()), 5)
        print(f"  {row['variant']:30s} cosine with {rows[0]['variant']}: mean {cos.mean():.5f} min {cos.min():.5f}")
    out = {"batch": args.batch, "rows": rows}
    if args.extract:
        out["extract"] = extract_speed(bbs, args)
    return out


def extract_speed(bbs: dict, args) -> list[dict]:
    """The whole extractor (decoding threads, cutting, network, pooling) with each backbone:
    N images, levels 1-2, batch 32, 2 decoding threads, interleaved rounds."""
    paths = expand_inputs([args.images])[: args.extract]
    regions = tuple(level_regions(lv) for lv in (1, 2))
    print(f"extractor, {len(paths)} images, levels 1,2, batch 32, 2 decoding threads")
    runs = {}
    for name, bb in bbs.items():
        ex = Extractor(bb.config, RuntimeConfig("cpu", 32, 2))
        ex._backbone = bb
        runs[name] = ex
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.extract_rounds):
        for name, ex in runs.items():
            t0 = time.perf_counter()
            sum(1 for _ in ex.extract([Job(p, regions) for p in paths], progress=False))
            times[name].append(time.perf_counter() - t0)
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"variant": name, "images_per_s": round(len(paths) / med, 2)})
        print(f"  {name:30s} {len(paths) / med:7.2f} images/s (median of {len(ts)})")
    return rows


def run_torch(args) -> dict:
    from retrieval.extraction.torch_backbone import import_torch

    torch = import_torch()
    spec = InputSpec.parse(args.input_spec)
    config = ExtractorConfig(backbone=args.backbone, weights="none", layer=args.layer, input_spec=spec)
    bb = load_backbone(config, "cpu")
    imgs = windows(args.images, args.batch, tuple(bb.input_size))
    cl = bb.module  # channels_last on CPU: TorchBackbone's default
    x_cl = bb.to_input(imgs)
    # the same seeded network, contiguous (NCHW) weights and input
    contig = load_backbone(config, "cpu").module.to(memory_format=torch.contiguous_format)
    x_c = x_cl.contiguous()
    print(f"torch {args.backbone}/{bb.layer}, batch {args.batch} {imgs.shape[1]}x{imgs.shape[2]}, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")

    def call(module, x, dtype=None):
        def fn():
            with torch.inference_mode():
                if dtype is None:
                    return module(x).float()
                with torch.autocast("cpu", dtype=dtype):
                    return module(x).float()
        return fn

    fns = {
        "channels_last fp32 (default)": call(cl, x_cl),
        "contiguous fp32": call(contig, x_c),
        "channels_last bf16 autocast": call(cl, x_cl, torch.bfloat16),
        "channels_last fp16 autocast": call(cl, x_cl, torch.float16),
    }
    rows = summary(interleaved(fns, args.rounds), args.batch, "channels_last fp32 (default)")
    ref = fns["channels_last fp32 (default)"]()
    ref_v = ref.flatten(2).mean(2).double() if ref.ndim == 4 else ref.double()
    for row, fn in zip(rows, fns.values()):
        out = fn()
        v = out.flatten(2).mean(2).double() if out.ndim == 4 else out.double()
        cos = torch.nn.functional.cosine_similarity(v, ref_v, dim=1)
        row["max_rel_error"] = float((out - ref).abs().max() / ref.abs().max())
        row["min_cosine"] = round(float(cos.min()), 6)
        print(f"  {row['variant']:30s} max rel error {row['max_rel_error']:.2e}  min cosine {row['min_cosine']:.6f}")
    return {"backbone": args.backbone, "layer": bb.layer, "batch": args.batch,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "rows": rows}


def run_squeezenet_int8(args) -> dict:
    """The export's int8 steps (calibration sample, quantize_int8, descriptor_agreement) on
    pretrained weights: SqueezeNet 1.1 (fp16, opset 7, ../shared) cut at fire9/concat_1,
    made float32 / opset 13 / dynamic batch, then quantized and compared, and timed."""
    import tempfile

    import onnx
    from onnx import numpy_helper, version_converter

    from retrieval.extraction.onnx_backbone import cut_onnx
    from retrieval.extraction.onnx_export import _calibration_sample, descriptor_agreement, quantize_int8

    src = onnx.load(args.squeezenet)
    for t in src.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    for vi in list(src.graph.input) + list(src.graph.output) + list(src.graph.value_info):
        if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16:
            vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    cut = cut_onnx(src, "fire9/concat_1", dynamic_batch=True, out_type=onnx.TensorProto.FLOAT)
    cut = version_converter.convert_version(cut, 13)
    # the export's input name, so that quantize_int8's calibration reader fits
    old = cut.graph.input[0].name
    cut.graph.input[0].name = "input"
    for node in cut.graph.node:
        node.input[:] = ["input" if i == old else i for i in node.input]
    spec = InputSpec(size=(224, 224), order="bgr", scale=255.0, mean=(104.0, 117.0, 123.0), std=(1.0, 1.0, 1.0))
    out = {"model": "squeezenet1.1 (fp16 -> fp32) at fire9/concat_1", "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = f"{tmp}/sq-fp32.onnx"
        onnx.save(cut, fp32)
        sample = _calibration_sample(args.images, args.calibrate_images, (224, 224))
        for fmt, rr in [(f, r == "1") for f in args.formats.split(",") for r in args.reduce_range.split(",")]:
            q = f"{tmp}/sq-{fmt}-{rr}.onnx"
            info = quantize_int8(fp32, q, spec, sample["calib"], fmt, reduce_range=rr)
            agr = descriptor_agreement(fp32, q, spec, sample["heldout"], "avg")
            row = {"format": fmt, "reduce_range": rr, **info, **sample["agreement"], **agr,
                   "calibration_images": sample["calibration"]["images"],
                   "calibration_windows": sample["calibration"]["windows"]}
            out["runs"].append(row)
            print(f"  {fmt:10s} reduce_range={int(rr)} calibrated on {row['calibration_windows']} windows "
                  f"in {info['seconds']:.1f} s; "
                  f"{row['windows']} held-out windows: mean cosine {agr['mean_cosine']:.4f} "
                  f"min {agr['min_cosine']:.4f}; float {agr['float_seconds']:.2f} s, int8 "
                  f"{agr['int8_seconds']:.2f} s ({agr['speedup']:.2f}x)", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("sessions", "models", "torch", "squeezenet-int8"))
    ap.add_argument("models", nargs="*", metavar="NAME=FILE.onnx[:OUTPUT]",
                    help="models: the ONNX models, baseline first")
    ap.add_argument("--images", default=str(SHARED / "data" / "ukbench" / "full"))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--onnx", default=str(MOBILENET), help="sessions: the model (default: the int8 MobileNetV2)")
    ap.add_argument("--onnx-output", default="627", help="sessions: the tensor cut at (default 627)")
    ap.add_argument("--variants", help=f"sessions: comma-separated subset of {', '.join(SESSION_VARIANTS)}")
    ap.add_argument("--extract", type=int, default=0, metavar="N",
                    help="sessions / models: also time the whole extractor on N images (sessions: "
                    "spinning on and off; models: each model)")
    ap.add_argument("--extract-rounds", type=int, default=3)
    ap.add_argument("--backbone", default="mobilenet_v2", help="torch: architecture (random init)")
    ap.add_argument("--layer", default="features", help="torch: layer")
    ap.add_argument("--input-spec", help="torch / models: --input-spec (e.g. size=224)")
    ap.add_argument("--squeezenet", default=str(SHARED / "weights" / "squeezenet1.1-fp16.onnx"))
    ap.add_argument("--calibrate-images", type=int, default=32, help="squeezenet-int8: as export-onnx's")
    ap.add_argument("--formats", default="qdq,qoperator", help="squeezenet-int8: int8 formats")
    ap.add_argument("--reduce-range", default="1,0", help="squeezenet-int8: 1 (7-bit weights), 0 or both")
    ap.add_argument("--json", metavar="OUT")
    args = ap.parse_args()
    result = {"sessions": run_sessions, "models": run_models, "torch": run_torch,
              "squeezenet-int8": run_squeezenet_int8}[args.what](args)
    result["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": len(os.sched_getaffinity(0)),
                         "load_average": os.getloadavg()}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
