"""Export a torch backbone cut at a layer to ONNX, checked against torch with onnxruntime."""
from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Any

from .backbone import PROBE_EXTRA, cpu_count, rel_err
from ..config import ConfigError, ExtractorConfig, InputSpec
from .torch_backbone import TorchBackbone, _torch

def export_onnx(config: ExtractorConfig, out_path: str, opset: int = 17) -> dict[str, Any]:
    """Export the torch backbone cut at `config.layer` to ONNX and check it with onnxruntime.

    The ONNX input `input` is the normalized float32 NCHW tensor (see the returned
    "input_spec" for the preprocessing to pass as --input-spec); batch and, when the
    network allows, height/width are dynamic; the output is `features`. Raises
    RuntimeError when onnxruntime's output differs from torch's by more than 1e-4
    (max abs diff / max abs value).
    """
    if config.onnx:
        raise ConfigError("export-onnx exports a torch backbone; drop --onnx")
    torch = _torch()
    import onnx
    import onnxruntime as ort

    bb = TorchBackbone(config, device="cpu")
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
    try:
        # grad mode on: keeps eval-time fast paths (fused attention) that ONNX cannot express out
        with warnings.catch_warnings(), torch.inference_mode(False), torch.enable_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, (dummy,), tmp, dynamo=False, opset_version=opset,
                input_names=["input"], output_names=["features"],
                dynamic_axes={"input": dyn_in, "features": dyn_out}, do_constant_folding=True,
            )
        m = onnx.load(tmp)
        meta = {
            "retrieval.backbone": config.backbone,
            "retrieval.layer": bb.layer,
            "retrieval.weights": bb.weights_desc,
            "retrieval.input_spec": _spec_text(bb.spec),
        }
        for k, v in meta.items():
            entry = m.metadata_props.add()
            entry.key, entry.value = k, str(v)
        onnx.save(m, tmp)
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
        if got.shape != ref.shape:
            raise RuntimeError(f"ONNX export of {config.backbone}/{bb.layer}: shape {got.shape} != torch {ref.shape}")
        err = rel_err(got, ref)
        if not err <= 1e-4:
            raise RuntimeError(
                f"ONNX export of {config.backbone}/{bb.layer}: onnxruntime differs from torch "
                f"(max rel error {err:.3g} > 1e-4)"
            )
        os.replace(tmp, out_path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    return {
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
