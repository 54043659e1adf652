"""Backbones: a network that turns a batch of RGB images into conv maps or vectors.

Two kinds, one interface (`Backbone`):

- torch: any `torchvision.models` architecture, cut at a `feature_extraction` node name or
  at `penultimate` (the input of the final Linear classifier); weights from torchvision
  (fetched to the torch cache), a local checkpoint (loaded with `weights_only=True`), or
  `none` (random init, seeded so that every process builds the same network).
- onnx: any .onnx file, cut in memory at any tensor (`--onnx-output`). Batch and spatial
  dimensions of the cut graph are made dynamic when the ops allow it (checked numerically
  against the graph as declared); a graph that stays fixed-batch is run in a loop.

Callers feed uint8 NHWC RGB images already resized to `backbone.input_size` (or any size
when `backbone.dynamic_size`); the backbone applies its `InputSpec` itself.
"""
from __future__ import annotations

import contextlib
import difflib
import os
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from .config import IMAGENET_MEAN, IMAGENET_STD, ConfigError, ExtractorConfig, InputSpec

DEFAULT_SIZE = (224, 224)
# extra pixels used to check that a network accepts other spatial sizes
_PROBE_EXTRA = 32


class WeightsUnavailableError(RuntimeError):
    """Pretrained torchvision weights could not be fetched (offline machine, bad cache)."""


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _cuda_present() -> bool:
    """Cheap check for an NVIDIA GPU without importing torch on the ONNX path."""
    import sys

    if "torch" in sys.modules:
        try:
            return bool(sys.modules["torch"].cuda.is_available())
        except Exception:
            return False
    return os.path.exists("/dev/nvidiactl") or any(Path("/dev").glob("nvidia[0-9]*"))


class Backbone:
    """A network fed with uint8 RGB images [N, H, W, 3]; see the module docstring."""

    input_size: tuple[int, int]
    dynamic_size: bool
    output_kind: str  # "map" (N, C, h, w) or "vector" (N, C)
    spec: InputSpec  # the preprocessing actually applied (size = input_size)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = self._check(images)
        if len(images) == 0:
            h, w = images.shape[1:3]
            return self._forward(np.zeros((1, h, w, 3), np.uint8))[:0]
        return self._forward(images)

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    # -- helpers shared by both kinds -------------------------------------------------
    def _forward(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _check(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"backbone input must be [N, H, W, 3] RGB images, got shape {images.shape}")
        if images.dtype != np.uint8:
            raise ValueError(f"backbone input must be uint8, got {images.dtype}")
        size = tuple(images.shape[1:3])
        if not self.dynamic_size and size != tuple(self.input_size):
            raise ValueError(
                f"this backbone only accepts {self.input_size[0]}x{self.input_size[1]} inputs "
                f"(got {size[0]}x{size[1]}); resize first"
            )
        return images

    def _affine(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel a, b (network channel order) such that input = pixel * a - b."""
        s = 1.0 / 255.0 if self.spec.scale == 1.0 else 1.0
        mean = np.asarray(self.spec.mean, np.float64)
        std = np.asarray(self.spec.std, np.float64)
        return (s / std).astype(np.float32), (mean / std).astype(np.float32)


def preprocess(images: np.ndarray, spec: InputSpec, layout: str = "NCHW") -> np.ndarray:
    """uint8 [N, H, W, 3] RGB -> network input per `spec` (numpy; ONNX path and tests)."""
    x = np.asarray(images, np.float32)
    if spec.order == "bgr":
        x = x[..., ::-1]
    s = 1.0 / 255.0 if spec.scale == 1.0 else 1.0
    mean = np.asarray(spec.mean, np.float64)
    std = np.asarray(spec.std, np.float64)
    x = x * (s / std).astype(np.float32) - (mean / std).astype(np.float32)
    if layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x, dtype=np.dtype(spec.dtype))


# ======================================================================================
# torch
# ======================================================================================

_TORCH_THREADS_SET = False


def _torch():
    global _TORCH_THREADS_SET
    import torch

    if not _TORCH_THREADS_SET:
        _TORCH_THREADS_SET = True
        n = _cpu_count()
        if torch.get_num_threads() > n:  # containers: torch may see the host's cores
            torch.set_num_threads(n)
    return torch


def resolve_device(device: str = "auto") -> str:
    torch = _torch()
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda (got {device!r})")
    return device


def _classification_models() -> list[str]:
    import torchvision

    try:
        return sorted(torchvision.models.list_models(module=torchvision.models))
    except Exception:
        return sorted(torchvision.models.list_models())


def _weights_enum(name: str):
    import torchvision

    try:
        return torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        known = _classification_models()
        close = difflib.get_close_matches(name, known, n=5) or known[:10]
        raise ConfigError(
            f"--backbone {name!r} is not a torchvision model; did you mean: {', '.join(close)}"
        ) from None


def _resolve_weights(name: str, weights: str):
    """-> ("none", None) | ("checkpoint", Path) | ("enum", WeightsEnum member)."""
    text = (weights or "none").strip()
    enum_cls = _weights_enum(name)  # validates the architecture name
    if text.lower() in ("none", "random", "random-init"):
        return "none", None
    path = Path(text).expanduser()
    if path.is_file():
        return "checkpoint", path.resolve()
    key = text.split(".")[-1] if "_Weights." in text else text
    try:
        return "enum", enum_cls[key]
    except KeyError:
        pass
    valid = ["DEFAULT"] + [w.name for w in enum_cls]
    if any(c in text for c in "/\\") or path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        raise ConfigError(f"--weights {text!r}: checkpoint file not found")
    raise ConfigError(
        f"--weights {text!r} is not a weights name of {name} (valid: {', '.join(valid)}), "
        "nor an existing checkpoint file, nor 'none'"
    )


def _seeded_model(name: str, **kwargs):
    """Build an architecture with deterministic random init (seed 0), leaving the caller's RNG alone."""
    torch = _torch()
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return torchvision.models.get_model(name, **kwargs)


def _read_checkpoint(path: Path) -> dict:
    torch = _torch()
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # pickle with globals, corrupt file, ...
        raise ConfigError(
            f"--weights {path}: cannot load as a weights-only torch checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})"
        ) from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict", "net"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise ConfigError(
            f"--weights {path}: not a state_dict (expected a dict of tensors, or a dict with a "
            "'state_dict' or 'model' entry)"
        )
    for prefix in ("module.", "_orig_mod.", "model."):
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def _load_checkpoint_model(name: str, path: Path):
    state = _read_checkpoint(path)
    model = _seeded_model(name, weights=None)
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        # a fine-tuned head with another number of classes: rebuild with that many
        last_linear = _last_linear_name(model)
        head = {f"{last_linear}.weight", f"{last_linear}.bias"} if last_linear else set()
        if last_linear and set(mismatched) <= head and f"{last_linear}.weight" in state:
            model = _seeded_model(name, weights=None, num_classes=int(state[f"{last_linear}.weight"].shape[0]))
            own = model.state_dict()
            mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if mismatched or missing or unexpected:
        raise ConfigError(
            f"--weights {path} does not fit {name}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
            f"shape mismatch {mismatched[:5]}"
        )
    model.load_state_dict(state, strict=True)
    return model


def _last_linear_name(model) -> str | None:
    torch = _torch()
    last = None
    for mod_name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            last = mod_name
    return last


def build_torch_model(config: ExtractorConfig):
    """-> (model in eval mode on cpu, weights description, InputSpec with size set)."""
    name = config.backbone
    kind, value = _resolve_weights(name, config.weights)
    user = config.input_spec
    size = user.size
    if kind == "none":
        model = _seeded_model(name, weights=None)
        desc = "random-init"
        spec = replace(user, size=size or DEFAULT_SIZE, dtype="float32")
    elif kind == "checkpoint":
        model = _load_checkpoint_model(name, value)
        desc = f"checkpoint:{value}"
        spec = replace(user, size=size or DEFAULT_SIZE, dtype="float32")
    else:
        weights = value
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch = _torch()
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(0)
                    import torchvision

                    model = torchvision.models.get_model(name, weights=weights)
        except Exception as err:
            raise WeightsUnavailableError(
                f"could not download or load the torchvision weights {weights} for {name} "
                f"({type(err).__name__}: {err}). This machine may be offline: use --weights none "
                "(random init), --weights PATH (a local state_dict checkpoint), or --onnx FILE "
                "(a local ONNX model)."
            ) from None
        desc = weights.name
        mean, std, crop = IMAGENET_MEAN, IMAGENET_STD, None
        try:
            tf = weights.transforms()
            mean = tuple(float(v) for v in tf.mean)
            std = tuple(float(v) for v in tf.std)
            crop = getattr(tf, "crop_size", None)
            crop = tuple(int(c) for c in crop) if crop is not None else None
            if crop is not None and len(crop) == 1:
                crop = (crop[0], crop[0])
        except Exception:
            pass
        spec = InputSpec(size=size or crop or DEFAULT_SIZE, order="rgb", scale=1.0, mean=mean, std=std)
    return model.eval(), desc, spec


class _Single:  # namespace for the torch wrapper modules (built lazily: torch import)
    pass


def _wrappers():
    torch = _torch()
    if hasattr(_Single, "Output"):
        return _Single

    class Output(torch.nn.Module):
        """Return one entry of a feature extractor's output dict."""

        def __init__(self, extractor, key: str = "out"):
            super().__init__()
            self.extractor = extractor
            self.key = key

        def forward(self, x):
            return self.extractor(x)[self.key]

    class InputOf(torch.nn.Module):
        """Run the whole model, return the input of one submodule (fallback for penultimate)."""

        def __init__(self, model, target: str):
            super().__init__()
            self.model = model
            self.target = target

        def forward(self, x):
            captured = []
            handle = self.model.get_submodule(self.target).register_forward_pre_hook(
                lambda _m, args: captured.append(args[0])
            )
            try:
                self.model(x)
            finally:
                handle.remove()
            return captured[-1]

    _Single.Output = Output
    _Single.InputOf = InputOf
    return _Single


def _node_names(model) -> list[str]:
    from torchvision.models.feature_extraction import get_graph_node_names

    try:
        return list(get_graph_node_names(model, suppress_diff_warning=True)[1])
    except Exception as err:
        raise ConfigError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(err).__name__}: {err}); "
            "use --layer penultimate or an ONNX model"
        ) from None


def _extractor(model, nodes):
    from torchvision.models.feature_extraction import create_feature_extractor

    ret = {n: n for n in nodes} if isinstance(nodes, list) else nodes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fe = create_feature_extractor(model, train_return_nodes={}, eval_return_nodes=ret, suppress_diff_warning=True)
    return fe.eval()


def _matches(layer: str, name: str) -> bool:
    return name == layer or name.startswith(layer + ".")


def _short_name(node: str, names: list[str]) -> str:
    """Shortest module prefix of `node` that still selects `node` (layer4.2.relu_2 -> layer4)."""
    parts = node.split(".")
    for k in range(1, len(parts) + 1):
        prefix = ".".join(parts[:k])
        last = [n for n in names if _matches(prefix, n)][-1:]
        if last == [node]:
            return prefix
    return node


def _sizes(size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    return tuple(size), (size[0] + _PROBE_EXTRA, size[1] + _PROBE_EXTRA)


def _probe(module, size, device, channels_last=False):
    torch = _torch()
    x = torch.zeros(1, 3, size[0], size[1], device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        return module(x)


def _default_layer(model, names: list[str], size, device) -> tuple[str, bool, tuple]:
    """The last 4-D node whose spatial size follows the input size (the last conv map
    before global/adaptive pooling), skipping maps with as many channels as the model has
    outputs (a conv classifier, as in SqueezeNet); falls back to the last 4-D node with
    h, w > 1 for networks that only accept one input size.
    -> (node name, accepts other sizes, output shape at `size` without the batch)."""
    torch = _torch()
    fe = _extractor(model, names).to(device)
    small, big = _sizes(size)
    out_a = _probe(fe, small, device)
    shapes_a = {k: tuple(v.shape) for k, v in out_a.items() if torch.is_tensor(v)}
    del out_a
    try:
        out_b = _probe(fe, big, device)
        shapes_b = {k: tuple(v.shape) for k, v in out_b.items() if torch.is_tensor(v)}
        del out_b
    except Exception:
        shapes_b = None
    del fe
    final = [shapes_a[n] for n in names if n in shapes_a and len(shapes_a[n]) == 2][-1:]
    n_out = final[0][1] if final else None
    candidates = [
        n for n in reversed(names)
        if len(shapes_a.get(n, ())) == 4 and shapes_a[n][1] != n_out
    ] or [n for n in reversed(names) if len(shapes_a.get(n, ())) == 4]
    if shapes_b is not None:
        for n in candidates:
            a, b = shapes_a[n], shapes_b.get(n)
            if b and len(b) == 4 and a[2] != b[2] and a[3] != b[3]:
                return n, True, a[1:]
    for n in candidates:
        a = shapes_a[n]
        if a[2] > 1 and a[3] > 1:
            return n, False, a[1:]
    raise ConfigError(
        f"{type(model).__name__}: found no 4-D feature map to use by default; pass --layer "
        f"(one of ...{', '.join(names[-15:])}) or --layer penultimate"
    )


def _penultimate(model, size, device):
    """Module returning the input of the final Linear layer (in execution order)."""
    torch = _torch()
    W = _wrappers()
    calls: list[tuple[str, Any]] = []
    handles = [
        mod.register_forward_pre_hook(lambda _m, args, _n=n: calls.append((_n, args[0])))
        for n, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear)
    ]
    try:
        _probe(model, size, device)
    finally:
        for h in handles:
            h.remove()
    if not calls:
        raise ConfigError(
            f"--layer penultimate: {type(model).__name__} has no Linear classifier; pass a node "
            f"name with --layer (one of ...{', '.join(_node_names(model)[-15:])})"
        )
    target, expected = calls[-1]
    parent_name, _, attr = target.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    original = getattr(parent, attr)
    setattr(parent, attr, torch.nn.Identity())
    try:
        got = _probe(model, size, device)
        if torch.is_tensor(got) and got.shape == expected.shape and torch.equal(got, expected):
            return model, target, tuple(got.shape[1:])
    except Exception:
        pass
    setattr(parent, attr, original)
    return W.InputOf(model, target), target, tuple(expected.shape[1:])


class TorchBackbone(Backbone):
    def __init__(self, config: ExtractorConfig, device: str = "auto"):
        torch = _torch()
        self.config = config
        self.device = resolve_device(device)
        model, self.weights_desc, self.spec = build_torch_model(config)
        model = model.to(self.device)
        self.input_size = tuple(self.spec.size)
        layer = config.layer
        self.node = None
        shape = dynamic = None  # known from the probes of the default layer / penultimate
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if layer == "penultimate":
                module, self.node, shape = _penultimate(model, self.input_size, self.device)
                self.layer = "penultimate"
            else:
                names = _node_names(model)
                if layer is None:
                    node, dynamic, shape = _default_layer(model, names, self.input_size, self.device)
                    self.node = node
                    self.layer = _short_name(node, names)
                else:
                    if not any(_matches(layer, n) for n in names):
                        close = difflib.get_close_matches(layer, names, n=5)
                        raise ConfigError(
                            f"--layer {layer!r} is not a node of {config.backbone}"
                            + (f"; did you mean {', '.join(close)}?" if close else "")
                            + f" Valid names include (last 15): {', '.join(names[-15:])}; "
                            "or 'penultimate'. See torchvision.models.feature_extraction.get_graph_node_names."
                        )
                    self.layer = layer
                    self.node = [n for n in names if _matches(layer, n)][-1]
                module = _wrappers().Output(_extractor(model, {self.layer: "out"}))
        self.module = module.eval().to(self.device)
        self.channels_last = self.device == "cpu"
        if self.channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        # output kind and whether other sizes are accepted
        small, big = _sizes(self.input_size)
        if shape is None:
            out = _probe(self.module, small, self.device, self.channels_last)
            if not torch.is_tensor(out) or out.ndim not in (2, 4):
                got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
                raise ConfigError(
                    f"--layer {self.layer!r} of {config.backbone} gives {got}; a layer must give a "
                    "4-D map [N, C, h, w] or a 2-D vector [N, C] (try the default layer or 'penultimate')"
                )
            shape = tuple(out.shape[1:])
        if len(shape) not in (1, 3):
            raise ConfigError(
                f"--layer {self.layer!r} of {config.backbone} gives {shape}; need a 4-D map or a 2-D vector"
            )
        self.output_kind = "map" if len(shape) == 3 else "vector"
        self.output_shape = tuple(shape)
        if dynamic is None:
            try:
                out_big = _probe(self.module, big, self.device, self.channels_last)
                dynamic = tuple(out_big.shape[1:2]) == tuple(shape[:1])
            except Exception:
                dynamic = False
        self.dynamic_size = bool(dynamic)
        a, b = self._affine()
        self._a = torch.as_tensor(a, device=self.device).view(1, 3, 1, 1)
        self._b = torch.as_tensor(b, device=self.device).view(1, 3, 1, 1)

    def to_input(self, images: np.ndarray):
        """uint8 NHWC numpy -> normalized float32 NCHW tensor on the device."""
        torch = _torch()
        x = torch.from_numpy(np.require(images, requirements=["C", "W"])).to(self.device)
        x = x.permute(0, 3, 1, 2).float()  # NHWC memory = channels_last strides
        if self.spec.order == "bgr":
            x = x.flip(1)
        x = x * self._a - self._b
        if not self.channels_last:
            x = x.contiguous()
        return x

    def _forward(self, images: np.ndarray) -> np.ndarray:
        torch = _torch()
        with torch.inference_mode():
            out = self.module(self.to_input(images))
            return np.ascontiguousarray(out.float().cpu().numpy(), dtype=np.float32)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "torch",
            "backbone": self.config.backbone,
            "layer": self.layer,
            "node": self.node,
            "weights": self.weights_desc,
            "device": self.device,
            "input_size": list(self.input_size),
            "dynamic_size": self.dynamic_size,
            "output_kind": self.output_kind,
            "output_shape": list(self.output_shape),
            "input_spec": self.spec.to_dict(),
        }


# ======================================================================================
# ONNX
# ======================================================================================

_NP_DTYPES = {1: "float32", 10: "float16", 11: "float64"}


def _subgraph_inputs(graph) -> set[str]:
    """Names a subgraph reads from its enclosing scope."""
    produced = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    needed: set[str] = set()
    for node in graph.node:
        for name in _node_inputs(node):
            if name not in produced:
                needed.add(name)
        produced.update(o for o in node.output if o)
    return needed


def _node_inputs(node) -> list[str]:
    import onnx

    names = [i for i in node.input if i]
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            names.extend(_subgraph_inputs(attr.g))
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for g in attr.graphs:
                names.extend(_subgraph_inputs(g))
    return names


def _tensor_type(model, name: str) -> int | None:
    g = model.graph
    for vi in list(g.value_info) + list(g.output) + list(g.input):
        if vi.name == name and vi.type.tensor_type.elem_type:
            return vi.type.tensor_type.elem_type
    try:
        import onnx

        inferred = onnx.shape_inference.infer_shapes(model)
        for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
            if vi.name == name and vi.type.tensor_type.elem_type:
                return vi.type.tensor_type.elem_type
    except Exception:
        pass
    return None


def cut_onnx(model, output: str, dynamic_batch: bool = False, dynamic_hw: bool = False, out_type: int | None = None):
    """A new ModelProto computing only `output` from the graph's real input.

    Own backwards traversal (works on old opsets, initializers listed as inputs, contrib
    ops, where `onnx.utils.extract_model` may fail). Initializer-inputs are dropped (so
    the runtime can constant-fold them); `dynamic_batch` / `dynamic_hw` replace fixed
    input dims 0 / 2, 3 (NCHW; 1, 2 for NHWC) by symbolic ones.
    """
    import onnx
    from onnx import helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer: dict[str, int] = {}
    for idx, node in enumerate(g.node):
        for o in node.output:
            if o:
                producer[o] = idx
    real_inputs = {i.name: i for i in g.input if i.name not in inits}
    needed_nodes: set[int] = set()
    needed: set[str] = set()
    stack = [output]
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        if name in producer:
            idx = producer[name]
            if idx not in needed_nodes:
                needed_nodes.add(idx)
                stack.extend(_node_inputs(g.node[idx]))
        elif name not in inits and name not in real_inputs:
            raise ValueError(f"tensor {name!r} is neither produced in the graph nor an input/initializer")
    inputs = []
    for name, vi in real_inputs.items():
        if name not in needed:
            continue
        vi = onnx.ValueInfoProto.FromString(vi.SerializeToString())
        dims = vi.type.tensor_type.shape.dim
        if len(dims) == 4:
            layout = _layout(vi)
            hw = (2, 3) if layout == "NCHW" else (1, 2)
            for pos, sym in [(0, "batch")] * dynamic_batch + list(zip(hw, ("height", "width"))) * dynamic_hw:
                if dims[pos].HasField("dim_value"):
                    dims[pos].Clear()
                    dims[pos].dim_param = sym
        inputs.append(vi)
    nodes = [g.node[i] for i in sorted(needed_nodes)]
    initializers = [t for name, t in inits.items() if name in needed]
    if out_type is None:
        out_type = _tensor_type(model, output) or onnx.TensorProto.FLOAT
    out_vi = helper.make_tensor_value_info(output, out_type, None)
    graph = helper.make_graph(nodes, f"{g.name or 'graph'}_cut", inputs, [out_vi], initializer=initializers)
    graph.sparse_initializer.extend(t for t in g.sparse_initializer if t.values.name in needed)
    cut = helper.make_model(graph, opset_imports=list(model.opset_import))
    # IR >= 4 lets initializers be absent from the inputs
    cut.ir_version = max(model.ir_version, 4)
    cut.functions.extend(model.functions)
    cut.producer_name = "retrieval.backbone"
    return cut


def _layout(vi) -> str:
    dims = vi.type.tensor_type.shape.dim
    if len(dims) == 4 and dims[1].HasField("dim_value") and dims[1].dim_value == 3:
        return "NCHW"
    if len(dims) == 4 and dims[3].HasField("dim_value") and dims[3].dim_value == 3:
        return "NHWC"
    return "NCHW"


def _dim(d) -> int | None:
    return d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None


class OnnxBackbone(Backbone):
    def __init__(self, config: ExtractorConfig, device: str = "auto"):
        import onnx
        import onnxruntime as ort

        self.config = config
        self.path = str(Path(config.onnx).expanduser())
        if not Path(self.path).is_file():
            raise ConfigError(f"--onnx {self.path}: file not found")
        try:
            model = onnx.load(self.path)
        except Exception as err:
            raise ConfigError(f"--onnx {self.path}: not a readable ONNX model ({err})") from None
        g = model.graph
        produced = [o for n in g.node for o in n.output if o]
        self.output = config.onnx_output or g.output[0].name
        if self.output not in set(produced):
            close = difflib.get_close_matches(self.output, produced, n=5)
            raise ConfigError(
                f"--onnx-output {self.output!r} is not a tensor of {self.path}"
                + (f"; did you mean {', '.join(close)}?" if close else "")
                + f" Graph outputs: {', '.join(o.name for o in g.output)}; "
                f"some valid tensor names (last 15 of {len(produced)}): {', '.join(produced[-15:])}"
            )
        out_type = _tensor_type(model, self.output)
        base = cut_onnx(model, self.output, out_type=out_type)
        if len(base.graph.input) != 1 or len(base.graph.input[0].type.tensor_type.shape.dim) != 4:
            raise ConfigError(
                f"--onnx {self.path}: the graph up to {self.output!r} needs "
                f"{[i.name for i in base.graph.input]}; only models with one 4-D image input are supported"
            )
        vi = base.graph.input[0]
        self.input_name = vi.name
        self.layout = _layout(vi)
        dims = vi.type.tensor_type.shape.dim
        hw = (dims[2], dims[3]) if self.layout == "NCHW" else (dims[1], dims[2])
        declared = (_dim(hw[0]), _dim(hw[1]))
        declared = declared if None not in declared else None
        elem = vi.type.tensor_type.elem_type
        if elem not in _NP_DTYPES:
            raise ConfigError(f"--onnx {self.path}: input {self.input_name!r} has unsupported element type {elem}")
        # effective input spec: dtype from the graph, size from the user or the graph
        user = config.input_spec
        size = tuple(user.size) if user.size else (declared or DEFAULT_SIZE)
        self.spec = replace(user, size=size, dtype=_NP_DTYPES[elem])
        self.input_size = size
        self.declared_size = declared
        self.declared_batch = _dim(dims[0])

        self.providers = self._providers(device, ort)
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        # reference: the graph as declared
        hw_fixed = declared is not None
        probe_size = declared or size
        rng = np.random.default_rng(0)
        probe = rng.integers(0, 256, size=(2, probe_size[0], probe_size[1], 3), dtype=np.uint8)
        ref_sess = self._session(base, ort)
        ref = self._run_loop(ref_sess, self._prep(probe), self.declared_batch)
        tol = 1e-2 if elem == 10 else 1e-3
        tries = []
        for b, h in ((True, True), (False, True), (True, False)):
            b = b and self.declared_batch is not None
            h = h and hw_fixed
            if (b or h) and (b, h) not in tries:
                tries.append((b, h))
        chosen = (base, ref_sess, False, False)
        for b, h in tries:
            try:
                m = cut_onnx(model, self.output, b, h, out_type=out_type)
                sess = self._session(m, ort)
                got = self._run_loop(sess, self._prep(probe), None if b else self.declared_batch)
                if got.shape != ref.shape or _rel_err(got, ref) > tol:
                    continue
                if h:
                    bigger = (probe_size[0] + _PROBE_EXTRA, probe_size[1] + _PROBE_EXTRA)
                    img = rng.integers(0, 256, size=(1, bigger[0], bigger[1], 3), dtype=np.uint8)
                    big = self._run_loop(sess, self._prep(img), None if b else self.declared_batch)
                    if big.ndim == 4 and big.shape[2:] == ref.shape[2:] and ref.shape[2] > 1:
                        continue  # spatial dims ignored: something is pinned inside the graph
                chosen = (m, sess, b, h)
                break
            except Exception:
                continue
        self.model, self.session, dyn_b, dyn_h = chosen
        self.batch = None if (dyn_b or self.declared_batch is None) else self.declared_batch
        self.dynamic_size = bool(dyn_h) or declared is None
        if not self.dynamic_size and declared is not None and size != declared:
            raise ConfigError(
                f"--input-spec size={size[0]}/{size[1]} but {self.path} only accepts "
                f"{declared[0]}x{declared[1]} inputs"
            )
        out = self(np.zeros((1, size[0], size[1], 3), np.uint8))
        if out.ndim not in (2, 4):
            raise ConfigError(
                f"--onnx-output {self.output!r} has shape {out.shape[1:]}; need a 4-D map "
                "[N, C, h, w] or a 2-D vector [N, C]"
            )
        self.output_kind = "map" if out.ndim == 4 else "vector"
        self.output_shape = tuple(out.shape[1:])

    @staticmethod
    def _providers(device: str, ort) -> list[str]:
        available = ort.get_available_providers()
        want_cuda = device not in ("cpu",) and "CUDAExecutionProvider" in available and _cuda_present()
        if device and device.startswith("cuda") and not want_cuda:
            raise ConfigError("--device cuda: onnxruntime has no usable CUDAExecutionProvider here")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"] if want_cuda else ["CPUExecutionProvider"]

    def _session(self, model, ort):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = _cpu_count()
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        # no busy-waiting between runs: image decoding threads share these cores
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        blob = model.SerializeToString() if model.ByteSize() < (1 << 31) - (1 << 26) else None
        if blob is not None:
            return ort.InferenceSession(blob, sess_options=opts, providers=self.providers)
        import onnx

        with tempfile.TemporaryDirectory(prefix="retrieval-onnx-") as tmp:
            path = os.path.join(tmp, "cut.onnx")
            onnx.save(model, path, save_as_external_data=True, location="cut.onnx.data")
            return ort.InferenceSession(path, sess_options=opts, providers=self.providers)

    def _prep(self, images: np.ndarray) -> np.ndarray:
        return preprocess(images, self.spec, self.layout)

    def _run_loop(self, sess, x: np.ndarray, batch: int | None) -> np.ndarray:
        if batch is None:
            out = sess.run([self.output], {self.input_name: x})[0]
            return np.asarray(out, dtype=np.float32)
        outs = []
        for i in range(0, len(x), batch):
            chunk = x[i : i + batch]
            n = len(chunk)
            if n < batch:  # pad the last chunk of a fixed-batch graph
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
            outs.append(np.asarray(sess.run([self.output], {self.input_name: chunk})[0][:n], dtype=np.float32))
        return np.concatenate(outs)

    def _forward(self, images: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self._run_loop(self.session, self._prep(images), self.batch))

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "onnx",
            "file": self.path,
            "output": self.output,
            "input": self.input_name,
            "provider": self.session.get_providers()[0],
            "device": self.device,
            "weights": "pretrained",
            "input_size": list(self.input_size),
            "dynamic_size": self.dynamic_size,
            "batch": self.batch or "dynamic",
            "output_kind": self.output_kind,
            "output_shape": list(self.output_shape),
            "input_spec": self.spec.to_dict(),
        }


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    scale = float(np.abs(b).max()) if b.size else 0.0
    diff = float(np.abs(a - b).max()) if b.size else 0.0
    return diff / scale if scale > 0 else diff


# ======================================================================================
# entry points
# ======================================================================================


def load_backbone(config: ExtractorConfig, device: str = "auto") -> Backbone:
    """The backbone described by `config` (ONNX when `config.onnx`, else torchvision)."""
    if config.onnx:
        return OnnxBackbone(config, device)
    return TorchBackbone(config, device)


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
        vh, vw = (h + _PROBE_EXTRA, w + _PROBE_EXTRA) if bb.dynamic_size else (h, w)
        x = torch.randn(3, 3, vh, vw, generator=gen)
        with torch.inference_mode():
            ref = module(x).float().numpy()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = _cpu_count()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(tmp, sess_options=opts, providers=["CPUExecutionProvider"])
        got = sess.run(["features"], {"input": x.numpy()})[0]
        if got.shape != ref.shape:
            raise RuntimeError(f"ONNX export of {config.backbone}/{bb.layer}: shape {got.shape} != torch {ref.shape}")
        err = _rel_err(got, ref)
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
