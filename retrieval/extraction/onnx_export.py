"""Export a torch backbone cut at a layer to ONNX, checked against torch with onnxruntime;
optionally quantized to int8 (static, calibrated on the user's images) with
onnxruntime.quantization, its descriptors compared with the float model's."""
from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .backbone import PROBE_EXTRA, cpu_count, rel_err
from ..config import LEVELS, ConfigError, ExtractorConfig, InputSpec
from .torch_backbone import TorchBackbone, import_torch

# int8 export (`--int8`); benchmarks/results/describe.md has the measurements behind the choices
INT8_FORMATS = ("qdq", "qoperator")
DEFAULT_INT8_FORMAT = "qdq"
CALIBRATE_IMAGES = 32  # images of --calibrate DIR whose windows calibrate the activation ranges
HELDOUT_IMAGES = 16  # further images of DIR on which the int8 and float descriptors are compared
_CALIB_BATCH = 8  # network inputs per calibration run; each range is the mean of the per-run ones
# Mean cosine to the float model under which `export-onnx` suggests comparing rankings:
# random weights and the pretrained SqueezeNet read >= 0.997, a pretrained MobileNetV2
# 0.97 yet ranks as its float model (benchmarks/results/describe.md).
AGREEMENT_NOTE_BELOW = 0.98


def export_onnx(
    config: ExtractorConfig,
    out_path: str,
    opset: int = 17,
    *,
    int8: bool = False,
    calibrate: str | None = None,
    calibrate_images: int = CALIBRATE_IMAGES,
    int8_format: str = DEFAULT_INT8_FORMAT,
    reduce_range: bool = True,
    log=None,
) -> dict[str, Any]:
    """Export the torch backbone cut at `config.layer` to ONNX and check it with onnxruntime.

    The ONNX input `input` is the normalized float32 NCHW tensor (see the returned
    "input_spec" for the preprocessing to pass as --input-spec); batch and, when the
    network allows, height/width are dynamic; the output is `features`. Raises
    RuntimeError when onnxruntime's output differs from torch's by more than 1e-4
    (max abs diff / max abs value).

    `int8`: the float export is then quantized statically with onnxruntime.quantization
    (uint8 activations, int8 per-channel weights, 7-bit when `reduce_range`, QDQ or
    QOperator per `int8_format`), its activation ranges calibrated on windows of
    `calibrate_images` images of `calibrate` (the whole image and one window of each of
    levels 2-4, cut and resized as the extractor cuts them, normalized per the input
    spec). The result then carries "int8": the calibration, and the agreement (mean / min
    cosine) of the pooled descriptors (the config's --pool) of the int8 and float models on
    the windows of held-out images of that folder. Usage errors (ConfigError) are raised
    before anything is written. `log(text)` reports progress.
    """
    if config.onnx:
        raise ConfigError("export-onnx exports a torch backbone; drop --onnx")
    if config.precision != "fp32":
        raise ConfigError(f"export-onnx writes a float32 model (--int8: int8); drop --precision {config.precision}")
    check_int8_args(int8, calibrate, calibrate_images, int8_format)
    log = log or (lambda _text: None)
    torch = import_torch()
    import onnx  # noqa: F401 - missing: fail before the network is built
    import onnxruntime as ort

    bb = TorchBackbone(config, device="cpu")
    sample = _calibration_sample(calibrate, calibrate_images, bb.input_size) if int8 else None
    module = bb.module.to(memory_format=torch.contiguous_format).eval()
    h, w = bb.input_size
    gen = torch.Generator().manual_seed(0)
    dummy = torch.randn(2, 3, h, w, generator=gen)
    dyn_in = {0: "batch"}
    dyn_out = {0: "batch"}
    if bb.dynamic_size:
        dyn_in.update({2: "height", 3: "width"})
        if bb.output_kind == "map":
            dyn_out.update({2: "h", 3: "w"})
    out_path = str(Path(out_path).expanduser())
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{out_path}.tmp-{os.getpid()}"
    tmp_q = f"{out_path}.tmp-int8-{os.getpid()}"
    meta = {
        "retrieval.backbone": config.backbone,
        "retrieval.layer": bb.layer,
        "retrieval.weights": bb.weights_desc,
        "retrieval.input_spec": _spec_text(bb.spec),
    }
    int8_info = None
    try:
        # grad mode on: keeps eval-time fast paths (fused attention) that ONNX cannot express out
        with warnings.catch_warnings(), torch.inference_mode(False), torch.enable_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, (dummy,), tmp, dynamo=False, opset_version=opset,
                input_names=["input"], output_names=["features"],
                dynamic_axes={"input": dyn_in, "features": dyn_out}, do_constant_folding=True,
            )
        _set_metadata(tmp, meta)
        # parity on a fresh batch (another size when the graph is dynamic)
        vh, vw = (h + PROBE_EXTRA, w + PROBE_EXTRA) if bb.dynamic_size else (h, w)
        x = torch.randn(3, 3, vh, vw, generator=gen)
        with torch.inference_mode():
            ref = module(x).float().numpy()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = cpu_count()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(tmp, sess_options=opts, providers=["CPUExecutionProvider"])
        got = sess.run(["features"], {"input": x.numpy()})[0]
        del sess
        if got.shape != ref.shape:
            raise RuntimeError(f"ONNX export of {config.backbone}/{bb.layer}: shape {got.shape} != torch {ref.shape}")
        err = rel_err(got, ref)
        if not err <= 1e-4:
            raise RuntimeError(
                f"ONNX export of {config.backbone}/{bb.layer}: onnxruntime differs from torch "
                f"(max rel error {err:.3g} > 1e-4)"
            )
        if int8:
            log(f"calibrating on {sample['calibration']['windows']} windows of "
                f"{sample['calibration']['images']} images of {calibrate}")
            int8_info = quantize_int8(tmp, tmp_q, bb.spec, sample["calib"], int8_format, reduce_range)
            int8_info["calibration"] = sample["calibration"]
            _set_metadata(tmp_q, {**meta, "retrieval.int8": (
                f"{int8_format}, per-channel{', reduce-range' if reduce_range else ''}, calibrated on "
                f"{sample['calibration']['images']} images of {sample['calibration']['dir']}")})
            log(f"comparing with the float model on {len(sample['heldout'])} windows")
            int8_info["agreement"] = {
                **sample["agreement"],
                **descriptor_agreement(tmp, tmp_q, bb.spec, sample["heldout"], config.pool),
            }
            int8_info["float_bytes"] = os.path.getsize(tmp)
            int8_info["bytes"] = os.path.getsize(tmp_q)
            os.replace(tmp_q, out_path)
        else:
            os.replace(tmp, out_path)
    finally:
        for leftover in (tmp, tmp_q):
            with contextlib.suppress(FileNotFoundError):
                os.remove(leftover)
    result = {
        "path": out_path,
        "max_rel_error": err,
        "input": "input",
        "output": "features",
        "shape": list(got.shape),
        "opset": opset,
        "layer": bb.layer,
        "dynamic_size": bb.dynamic_size,
        "input_spec": _spec_text(bb.spec),
    }
    if int8_info is not None:
        result["int8"] = int8_info
    return result


def check_int8_args(int8: bool, calibrate: str | None, calibrate_images: int, int8_format: str) -> None:
    """Raise ConfigError for an inconsistent set of int8 flags (nothing is read or written)."""
    if int8 and not calibrate:
        raise ConfigError(
            "--int8 needs --calibrate DIR: a folder of your own images (a few dozen are enough) on "
            "which the int8 activation ranges are calibrated and the descriptors checked against "
            "the float model"
        )
    if calibrate and not int8:
        raise ConfigError("--calibrate DIR only applies to an int8 export; add --int8")
    if int8 and calibrate_images < 1:
        raise ConfigError(f"--calibrate-images must be >= 1 (got {calibrate_images})")
    if int8 and int8_format not in INT8_FORMATS:
        raise ConfigError(f"--int8-format must be one of {', '.join(INT8_FORMATS)} (got {int8_format!r})")


def _set_metadata(path: str, meta: dict[str, str]) -> None:
    import onnx

    m = onnx.load(path)
    keep = [(p.key, p.value) for p in m.metadata_props if p.key not in meta]
    del m.metadata_props[:]
    for k, v in keep + list(meta.items()):
        entry = m.metadata_props.add()
        entry.key, entry.value = k, str(v)
    onnx.save(m, path)


def _calibration_sample(folder: str, n_calib: int, size: tuple[int, int]) -> dict[str, Any]:
    """Windows (uint8 [H, W, 3] at `size`) of up to `n_calib` readable images of `folder` for
    calibration and of up to HELDOUT_IMAGES others for the agreement check, cut as the
    extractor cuts them (crop mode): per image, the whole image (level 1) and one window
    drawn from each of levels 2-4 (4 windows). Images are drawn in a seeded random order;
    unreadable ones are skipped. With too few images, at least one is held out (a quarter,
    up to HELDOUT_IMAGES); a single image serves both (then "heldout" is false).
    Raises ConfigError when `folder` holds no readable image."""
    from .inputs import Job, prepare_inputs
    from .images import ImageError, expand_inputs
    from .patches import RegionSet, level_regions

    if not os.path.exists(folder):
        raise ConfigError(f"--calibrate {folder}: no such folder")
    try:
        paths = expand_inputs([folder])
    except (FileNotFoundError, OSError) as err:
        raise ConfigError(f"--calibrate {folder}: {err}") from None
    if not paths:
        raise ConfigError(f"--calibrate {folder}: no image files in it (looked for .jpg, .png, ... recursively)")
    rng = np.random.default_rng(0)
    order = rng.permutation(len(paths))
    want = n_calib + HELDOUT_IMAGES
    images: list[list[np.ndarray]] = []
    skipped: list[dict[str, str]] = []
    for i in order:
        if len(images) == want:
            break
        # the whole image (level 1) and one window drawn from each other level
        regions = [level_regions(LEVELS[0])]
        for lv in LEVELS[1:]:
            rs = level_regions(lv)
            j = int(rng.integers(len(rs)))
            regions.append(RegionSet(rs.name, rs.boxes[j : j + 1], rs.flips[j : j + 1]))
        try:
            images.append(prepare_inputs(Job(paths[i], tuple(regions)), tuple(size), "crop")[1])
        except ImageError as err:
            skipped.append({"path": paths[i], "reason": str(err)})
    if not images:
        reasons = "; ".join(f"{Path(s['path']).name}: {s['reason']}" for s in skipped[:3])
        raise ConfigError(
            f"--calibrate {folder}: no readable image among its {len(paths)} image files ({reasons}); "
            "point it at a folder of your own JPEG/PNG images"
        )
    if len(images) > n_calib:
        calib, held = images[:n_calib], images[n_calib:]
    elif len(images) > 1:
        k = max(1, min(HELDOUT_IMAGES, len(images) // 4))
        calib, held = images[:-k], images[-k:]
    else:
        calib, held = images, images
    flat = lambda groups: [w for g in groups for w in g]  # noqa: E731
    return {
        "calib": flat(calib),
        "heldout": flat(held),
        "calibration": {
            "dir": str(Path(folder).resolve()), "images": len(calib), "windows": sum(map(len, calib)),
            "levels": list(LEVELS), "skipped": skipped,
        },
        "agreement": {"images": len(held), "windows": sum(map(len, held)), "heldout": held is not calib},
    }


def quantize_int8(
    float_path: str, out_path: str, spec: InputSpec, windows: list[np.ndarray],
    int8_format: str = DEFAULT_INT8_FORMAT, reduce_range: bool = True,
) -> dict[str, Any]:
    """Static int8 quantization of the float model at `float_path` (input `input`) with
    onnxruntime.quantization, calibrated on `windows` (uint8 images preprocessed per `spec`;
    MinMax, each range the mean of the per-batch ranges); the model is first run through
    ORT's quant_pre_process (shape inference and graph optimisation), as ORT recommends.
    -> what was done."""
    from onnxruntime.quantization import (
        CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from .backbone import preprocess

    class Windows(CalibrationDataReader):
        def __init__(self) -> None:
            self.at = 0

        def get_next(self):
            if self.at >= len(windows):
                return None
            chunk = windows[self.at : self.at + _CALIB_BATCH]
            self.at += len(chunk)
            return {"input": preprocess(np.stack(chunk), spec, "NCHW")}

        def rewind(self) -> None:
            self.at = 0

    start = time.perf_counter()
    pre = f"{out_path}.pre"
    source, preprocessed = float_path, True
    try:
        with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quant_pre_process(float_path, pre)
        source = pre
    except Exception:  # noqa: BLE001 - optional step: quantize the model as exported
        preprocessed = False
    try:
        with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings(), _quiet_ort_logger():
            warnings.simplefilter("ignore")
            quantize_static(
                source, out_path, Windows(),
                quant_format=QuantFormat.QDQ if int8_format == "qdq" else QuantFormat.QOperator,
                per_channel=True,
                reduce_range=reduce_range,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                # the calibrator keeps only each tensor's min and max per batch: no memory cap needed
                # (and CalibMaxIntermediateOutputs drops batches in onnxruntime 1.31)
                calibrate_method=CalibrationMethod.MinMax,
                # each range is the mean of the per-batch (_CALIB_BATCH windows) ranges, not the
                # extremes over all batches: a rare extreme activation no longer widens the
                # step for every input (pretrained MobileNetV2: mean cosine to float 0.950 ->
                # 0.958, min 0.75 -> 0.77; SqueezeNet 0.992 -> 0.995, 0.85 -> 0.91; describe.md)
                extra_options={"CalibMovingAverage": True},
            )
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(pre)
    return {
        "format": int8_format,
        "activations": "uint8",
        "weights": "int8 per-channel" + (" (7-bit, reduce_range)" if reduce_range else ""),
        "calibration_method": "minmax (mean of per-batch ranges)",
        "pre_processed": preprocessed,
        "seconds": round(time.perf_counter() - start, 3),
    }


@contextlib.contextmanager
def _quiet_ort_logger():
    """The quantizer logs through `logging` at WARNING on things that are fine here."""
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def descriptor_agreement(
    float_path: str, int8_path: str, spec: InputSpec, windows: list[np.ndarray], pool: str = "avg", batch: int = 32,
) -> dict[str, Any]:
    """Cosine between the pooled descriptors of the float and int8 models on `windows`,
    both run as the product runs them (OnnxBackbone, CPU); and their network time."""
    from .backbones import load_backbone
    from .pooling import pool_map

    out: dict[str, Any] = {"pool": pool}
    vecs = {}
    for name, path in (("float", float_path), ("int8", int8_path)):
        bb = load_backbone(ExtractorConfig(onnx=str(Path(path).resolve()), input_spec=spec), "cpu")
        bb(np.stack(windows[:1]))  # warm-up
        start = time.perf_counter()
        feats = [bb(np.stack(windows[i : i + batch])) for i in range(0, len(windows), batch)]
        out[f"{name}_seconds"] = round(time.perf_counter() - start, 3)
        vecs[name] = np.stack([pool_map(f, pool) for chunk in feats for f in chunk]).astype(np.float64)
    cos = cosines(vecs["float"], vecs["int8"])
    out["mean_cosine"] = round(float(cos.mean()), 6)
    out["min_cosine"] = round(float(cos.min()), 6)
    out["speedup"] = round(out["float_seconds"] / max(out["int8_seconds"], 1e-9), 2)
    return out


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two [N, D] arrays, scale-free (tiny activations of a random-init
    network are fine); 1 where both rows are zero, 0 where one is."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both = (na > 0) & (nb > 0)
    out = np.where((na == 0) & (nb == 0), 1.0, 0.0)
    out[both] = (a[both] / na[both, None] * (b[both] / nb[both, None])).sum(1)
    return out


def _spec_text(spec: InputSpec) -> str:
    """The --input-spec string reproducing `spec` (for an exported model)."""
    fmt = lambda vals: "/".join(f"{v:.10g}" for v in vals)  # noqa: E731
    parts = []
    if spec.size:
        parts.append(f"size={spec.size[0]}/{spec.size[1]}")
    parts += [
        f"order={spec.order}",
        f"scale={spec.scale:g}",
        f"mean={fmt(spec.mean)}",
        f"std={fmt(spec.std)}",
        f"dtype={spec.dtype}",
    ]
    return ",".join(parts)
