"""The tensors / nodes a network can be cut at (`retrieval layers`), with their shapes.

Shapes are measured by one forward pass of a black image at the network's input size
(224 x 224 unless `--input-spec size=` or the ONNX graph says otherwise). A 4-D output
[N, C, h, w] is a conv map: usable with `--pool` and `--patch-mode roi`; a 2-D one is a
vector (`--patch-mode crop` only); anything else (shape tensors, masks) cannot be used.
`depth` is the position of the producing node in the graph's execution order, 0..1; it
is the x axis of the factor-study plots.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from .backbone import DEFAULT_SIZE
from ..config import ConfigError, ExtractorConfig

__all__ = ["Layer", "list_layers", "layer_depths"]

_NP_NAMES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool", 10: "float16", 11: "float64"}


@dataclass(frozen=True)
class Layer:
    """One place a network can be cut: `name` is what `--onnx-output` / `--layer` take."""

    name: str
    op: str
    shape: tuple[int, ...]  # without the batch dimension
    dtype: str
    kind: str  # "map" (conv map), "vector", or "other" (not usable as a descriptor)
    depth: float
    quantized: bool = False  # read through a DequantizeLinear at the cut

    def to_dict(self) -> dict:
        data = asdict(self)
        data["shape"] = list(self.shape)
        return data


def _kind(shape: tuple[int, ...], dtype: str) -> str:
    if not (dtype.startswith("float") or dtype in ("uint8", "int8")):
        return "other"
    return {3: "map", 1: "vector"}.get(len(shape), "other")


def list_layers(config: ExtractorConfig) -> list[Layer]:
    """Every tensor (ONNX) or node (torch) of the network of `config`, in execution order."""
    return _onnx_layers(config) if config.onnx else _torch_layers(config)


def layer_depths(config: ExtractorConfig, names: list[str]) -> dict[str, float]:
    """Depth (0..1) of each of `names` in the network of `config`, without running it.

    A torch `--layer` may be a module prefix (`layer3`): its depth is that of the last
    node it selects, the one the backbone reads. Unknown names raise ConfigError.
    """
    if config.onnx:
        import onnx

        nodes = onnx.load(str(Path(config.onnx).expanduser()), load_external_data=False).graph.node
        position = {o: (i + 1) / len(nodes) for i, node in enumerate(nodes) for o in node.output if o}
        found = {name: position.get(name) for name in names}
    else:
        from .torch_backbone import build_torch_model, layer_matches, node_names

        order = node_names(build_torch_model(config)[0])
        found = {}
        for name in names:
            hits = [i for i, n in enumerate(order) if layer_matches(name, n)]
            found[name] = 1.0 if name == "penultimate" else (hits[-1] + 1) / len(order) if hits else None
    for name, depth in found.items():
        if depth is None:
            flag = "--onnx-output" if config.onnx else "--layer"
            raise ConfigError(f"{flag} {name!r} is not in the network (see `retrieval layers`)")
    return found


def _onnx_layers(config: ExtractorConfig) -> list[Layer]:
    import onnx
    import onnxruntime as ort
    from onnx import helper

    from .backbone import cpu_count, preprocess
    from .onnx_backbone import NP_DTYPES, QUANTIZED_TYPES, input_layout, tensor_types

    path = str(Path(config.onnx).expanduser())
    if not Path(path).is_file():
        raise ConfigError(f"--onnx {path}: file not found")
    try:
        model = onnx.load(path)
    except Exception as err:
        raise ConfigError(f"--onnx {path}: not a readable ONNX model ({err})") from None
    g = model.graph
    inits = {t.name for t in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    if len(inputs) != 1 or len(inputs[0].type.tensor_type.shape.dim) != 4:
        raise ConfigError(f"--onnx {path}: only models with one 4-D image input are supported")
    vi = inputs[0]
    layout = input_layout(vi)
    dims = vi.type.tensor_type.shape.dim
    hw = (dims[2], dims[3]) if layout == "NCHW" else (dims[1], dims[2])
    declared = tuple(d.dim_value for d in hw) if all(d.dim_value > 0 for d in hw) else None
    size = tuple(config.input_spec.size or declared or DEFAULT_SIZE)
    batch = dims[0].dim_value if dims[0].dim_value > 0 else 1
    types = tensor_types(model)
    position = {}
    names = []
    for i, node in enumerate(g.node):
        for o in node.output:
            if o and o not in position and types.get(o):
                position[o] = (i, node.op_type)
                names.append(o)
    # One run with every typed tensor as an output: the shapes at this input size.
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_tensor_value_info(n, types[n], None) for n in names)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = cpu_count()
    opts.log_severity_level = 3
    # Optimisations may fuse away the intermediate tensors we ask for.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(probe.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
    spec = replace(config.input_spec, dtype=NP_DTYPES.get(vi.type.tensor_type.elem_type, "float32"))
    x = preprocess(np.zeros((batch, size[0], size[1], 3), np.uint8), spec, layout)
    outs = sess.run(names, {vi.name: x})
    layers = []
    for name, out in zip(names, outs):
        idx, op = position[name]
        shape = tuple(int(s) for s in np.shape(out)[1:])
        dtype = _NP_NAMES.get(types[name], str(np.asarray(out).dtype))
        layers.append(Layer(name, op, shape, dtype, _kind(shape, dtype), (idx + 1) / len(g.node),
                            quantized=types[name] in QUANTIZED_TYPES))
    return layers


def _torch_layers(config: ExtractorConfig) -> list[Layer]:
    from .torch_backbone import build_torch_model, feature_extractor, find_penultimate, import_torch, node_names, probe_outputs

    torch = import_torch()
    model, _, spec = build_torch_model(config)
    names = node_names(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outs = probe_outputs(feature_extractor(model, names), tuple(spec.size), "cpu")
    layers = []
    for i, name in enumerate(names):
        out = outs.get(name)
        if not torch.is_tensor(out):
            continue
        shape = tuple(int(s) for s in out.shape[1:])
        dtype = str(out.dtype).replace("torch.", "")
        op = name.rsplit(".", 1)[-1].rstrip("_0123456789") or name
        layers.append(Layer(name, op, shape, dtype, _kind(shape, dtype), (i + 1) / len(names)))
    try:
        _, target, shape = find_penultimate(model, tuple(spec.size), "cpu")
        layers.append(Layer("penultimate", f"input of {target}", tuple(shape), "float32",
                            _kind(tuple(shape), "float32"), 1.0))
    except ConfigError:
        pass  # no Linear classifier: no penultimate layer
    return layers
