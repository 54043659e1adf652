"""torchvision checkpoints with pretrained weights, made from the shared ONNX models.

This machine cannot download torchvision's weights, so the torch backbones' accuracy could
not be measured here (issue 20 asks for it "for ONNX and torch backbones"). The two
pretrained ONNX models in `../shared/weights` are torchvision architectures:

- `squeezenet1.1-fp16.onnx` (Caffe2's SqueezeNet 1.1: torchvision's `squeezenet1_1`
  layer for layer; Caffe's input: BGR, 0-255, mean 104/117/123, std 1);
- `mobilenetv2-12-int8.onnx` (torchvision's `mobilenet_v2` exported and quantized: batch
  norm folded into the convolutions, int8 weights per channel). Its weights are
  dequantized; the batch norms become identities that add the folded bias, so the torch
  model computes in float what the ONNX graph computes in int8.

Each checkpoint is a plain state_dict for `--weights PATH`, checked against ONNX Runtime
on real images at the layer the benchmarks cut (cosine of the two conv maps per image),
and written with the `--input-spec` its network expects:

    python benchmarks/pretrained_torch.py --out /tmp/pretrained
    retrieval build --backbone squeezenet1_1 --weights /tmp/pretrained/squeezenet1_1.pt \\
        --layer features --input-spec order=bgr,scale=255,mean=104/117/123,std=1 ...
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # also when loaded by path (tests)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from code_root import code_root  # noqa: E402

code_root()

import numpy as np  # noqa: E402

from retrieval.config import ExtractorConfig, InputSpec  # noqa: E402
from retrieval.extraction.backbones import load_backbone  # noqa: E402
from retrieval.extraction.images import expand_inputs  # noqa: E402
from retrieval.extraction.inputs import Job, prepare_inputs  # noqa: E402
from retrieval.extraction.patches import level_regions  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
if not SHARED.is_dir():
    SHARED = Path("/work/shared")
SQUEEZENET_SPEC = "order=bgr,scale=255,mean=104/117/123,std=1"

# torchvision architecture -> (ONNX file, tensor at the cut, torch layer at the same place, input spec)
MODELS = {
    "squeezenet1_1": ("squeezenet1.1-fp16.onnx", "fire9/concat_1", "features", SQUEEZENET_SPEC),
    "mobilenet_v2": ("mobilenetv2-12-int8.onnx", "627", "features", ""),
}


def _initializers(model) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def squeezenet_state(onnx_model) -> dict:
    """Caffe2 names (conv1, fireN/squeeze1x1, ..., conv10) -> torchvision's squeezenet1_1."""
    import torch
    import torchvision

    init = _initializers(onnx_model)
    target = torchvision.models.squeezenet1_1().state_dict()
    fires = {3: 2, 4: 3, 6: 4, 7: 5, 9: 6, 10: 7, 11: 8, 12: 9}  # features index -> fire number
    names = {"features.0": "conv1", "classifier.1": "conv10"}
    for index, fire in fires.items():
        for torch_part, caffe_part in (("squeeze", "squeeze1x1"), ("expand1x1", "expand1x1"), ("expand3x3", "expand3x3")):
            names[f"features.{index}.{torch_part}"] = f"fire{fire}/{caffe_part}"
    state = {}
    for key, ref in target.items():
        module, kind = key.rsplit(".", 1)
        value = init[f"{names[module]}_{kind[0]}_0"].astype(np.float32)
        if value.shape != tuple(ref.shape):
            raise SystemExit(f"{key}: ONNX {value.shape} against torchvision {tuple(ref.shape)}")
        state[key] = torch.from_numpy(value)
    return state


def _dequantize(init: dict, name: str, axis: int = 0) -> np.ndarray:
    """An int8 initializer and its (per-channel) scale and zero point -> float32."""
    q = init[f"{name}_quantized"].astype(np.float32)
    scale, zero = init[f"{name}_scale"].astype(np.float32), init[f"{name}_zero_point"].astype(np.float32)
    shape = [1] * q.ndim
    if scale.ndim:
        shape[axis] = -1
    return (q - zero.reshape(shape)) * scale.reshape(shape)


def mobilenet_v2_state(onnx_model) -> dict:
    """The int8 graph's QLinearConv weights, in graph order, -> torchvision's mobilenet_v2
    convolutions, in module order; each conv's folded bias goes to the batch norm after it."""
    import torch
    import torchvision

    init = _initializers(onnx_model)
    model = torchvision.models.mobilenet_v2()
    convs = [n for n in onnx_model.graph.node if n.op_type == "QLinearConv"]
    modules = [(name, m) for name, m in model.features.named_modules() if isinstance(m, torch.nn.Conv2d)]
    if len(convs) != len(modules):
        raise SystemExit(f"{len(convs)} QLinearConv nodes against {len(modules)} torchvision convolutions")
    state = {}
    bn_of = {}
    names = [name for name, _ in model.features.named_modules()]
    for (name, conv), node in zip(modules, convs):
        x_scale, w_name, bias_name = node.input[1], node.input[3], node.input[8]
        weight = _dequantize(init, w_name.removesuffix("_quantized"))
        if weight.shape != tuple(conv.weight.shape):
            raise SystemExit(f"features.{name}: ONNX {weight.shape} against torchvision {tuple(conv.weight.shape)}")
        w_scale = init[w_name.replace("_quantized", "_scale")].astype(np.float32)
        bias = init[bias_name].astype(np.float32) * init[x_scale].astype(np.float32) * w_scale
        state[f"features.{name}.weight"] = torch.from_numpy(weight)
        bn_of[names[names.index(name) + 1]] = bias  # the BatchNorm2d right after the conv
    for name, module in model.features.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            bias = bn_of[name]
            state[f"features.{name}.weight"] = torch.ones(len(bias))
            state[f"features.{name}.bias"] = torch.from_numpy(bias)
            state[f"features.{name}.running_mean"] = torch.zeros(len(bias))
            # (x - 0) / sqrt(var + eps) is x exactly
            state[f"features.{name}.running_var"] = torch.full((len(bias),), 1.0 - module.eps)
            state[f"features.{name}.num_batches_tracked"] = torch.tensor(0)
    state["classifier.1.weight"] = torch.from_numpy(_dequantize(init, "classifier.1.weight", axis=1).T.copy())
    state["classifier.1.bias"] = torch.from_numpy(_dequantize(init, "classifier.1.bias"))
    missing = set(model.state_dict()) - set(state)
    if missing:
        raise SystemExit(f"mobilenet_v2: no value for {sorted(missing)[:5]}")
    return state


def torch_state(name: str, weights: Path) -> dict:
    """The state_dict of torchvision's `name` made from its ONNX model in folder `weights`."""
    import onnx

    build = {"squeezenet1_1": squeezenet_state, "mobilenet_v2": mobilenet_v2_state}[name]
    return build(onnx.load(str(Path(weights) / MODELS[name][0])))


def agreement(name: str, onnx_path: Path, checkpoint: Path, images: list[str]) -> dict:
    """Cosine between the ONNX and the torch conv maps at the cut, per image (the whole
    image at the network's size, as the extractor prepares level 1)."""
    _, output, layer, spec = MODELS[name]
    spec = InputSpec.parse(spec) if spec else InputSpec()
    reference = load_backbone(ExtractorConfig(onnx=str(onnx_path), onnx_output=output, input_spec=spec), "cpu")
    torch_bb = load_backbone(ExtractorConfig(backbone=name, weights=str(checkpoint), layer=layer,
                                             input_spec=spec), "cpu")
    whole = (level_regions(1),)
    batch = np.stack([prepare_inputs(Job(p, whole), reference.input_size, "crop")[1][0] for p in images])
    a = reference(batch).reshape(len(batch), -1).astype(np.float64)
    b = torch_bb(batch).reshape(len(batch), -1).astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"images": len(images), "min_cosine": round(float(cos.min()), 5),
            "mean_cosine": round(float(cos.mean()), 5), "input_spec": spec.to_dict()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for the <architecture>.pt checkpoints")
    ap.add_argument("--weights", default=str(SHARED / "weights"), help="folder of the shared ONNX models")
    ap.add_argument("--check-images", default=str(SHARED / "data" / "ukbench"),
                    help="images whose conv maps are compared (the first --check-count, sorted)")
    ap.add_argument("--check-count", type=int, default=16)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    args = ap.parse_args(argv)
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images = sorted(expand_inputs([args.check_images]))[: args.check_count]
    if not images:
        raise SystemExit(f"no images under {args.check_images}")
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
        checkpoint = out / f"{name}.pt"
        torch.save(torch_state(name, Path(args.weights)), checkpoint)
        onnx_path = Path(args.weights) / MODELS[name][0]
        row = {"checkpoint": str(checkpoint), "from": onnx_path.name, **agreement(name, onnx_path, checkpoint, images)}
        print(json.dumps({name: row}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
