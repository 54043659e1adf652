"""torchvision backbones: any architecture, cut at a feature_extraction node or at
`penultimate`; weights from torchvision, a local checkpoint, or `none` (seeded random init).
"""
from __future__ import annotations

import difflib
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from .backbone import DEFAULT_SIZE, PROBE_EXTRA, Backbone, cpu_count, input_affine
from ..config import IMAGENET_MEAN, IMAGENET_STD, ConfigError, ExtractorConfig, InputSpec


class WeightsUnavailableError(RuntimeError):
    """Pretrained torchvision weights could not be fetched (offline machine, bad cache)."""


_TORCH_THREADS_SET = False


def import_torch():
    global _TORCH_THREADS_SET
    import torch

    if not _TORCH_THREADS_SET:
        _TORCH_THREADS_SET = True
        n = cpu_count()
        if torch.get_num_threads() > n:  # containers: torch may see the host's cores
            torch.set_num_threads(n)
    return torch


def resolve_device(device: str = "auto") -> str:
    torch = import_torch()
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
    torch = import_torch()
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return torchvision.models.get_model(name, **kwargs)


def _read_checkpoint(path: Path) -> dict:
    torch = import_torch()
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
    torch = import_torch()
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
                torch = import_torch()
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
    torch = import_torch()
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


def node_names(model) -> list[str]:
    from torchvision.models.feature_extraction import get_graph_node_names

    try:
        return list(get_graph_node_names(model, suppress_diff_warning=True)[1])
    except Exception as err:
        raise ConfigError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(err).__name__}: {err}); "
            "use --layer penultimate or an ONNX model"
        ) from None


def feature_extractor(model, nodes):
    from torchvision.models.feature_extraction import create_feature_extractor

    ret = {n: n for n in nodes} if isinstance(nodes, list) else nodes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fe = create_feature_extractor(model, train_return_nodes={}, eval_return_nodes=ret, suppress_diff_warning=True)
    return fe.eval()


def layer_matches(layer: str, name: str) -> bool:
    return name == layer or name.startswith(layer + ".")


def _short_name(node: str, names: list[str]) -> str:
    """Shortest module prefix of `node` that still selects `node` (layer4.2.relu_2 -> layer4)."""
    parts = node.split(".")
    for k in range(1, len(parts) + 1):
        prefix = ".".join(parts[:k])
        last = [n for n in names if layer_matches(prefix, n)][-1:]
        if last == [node]:
            return prefix
    return node


def _sizes(size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    return tuple(size), (size[0] + PROBE_EXTRA, size[1] + PROBE_EXTRA)


def native_bf16(device: str = "cpu") -> bool:
    """Whether `device` computes bf16 natively: a GPU that supports it, or a CPU with
    AVX512_BF16 or AMX (read from /proc/cpuinfo; False where that is not readable)."""
    if device.startswith("cuda"):
        return bool(import_torch().cuda.is_bf16_supported())
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _autocast_dtype(precision: str, device: str):
    """The autocast dtype of `precision` (None for fp32). Without native bf16 the network
    still runs, with the same descriptors (an index built in bf16 must be queried in bf16),
    but an order of magnitude slower than fp32, so it says so."""
    if precision == "fp32":
        return None
    if not native_bf16(device):
        need = "compute capability 8.0 or later" if device.startswith("cuda") else "AVX512_BF16 or AMX"
        warnings.warn(
            f"--precision bf16 on {device}: no native bf16 here ({need}), so the network runs several times "
            "slower than in fp32 (10x on an AVX2 CPU); build indexes here with --precision fp32",
            RuntimeWarning, stacklevel=3)
    return import_torch().bfloat16


def probe_outputs(module, size, device, channels_last=False):
    torch = import_torch()
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
    torch = import_torch()
    fe = feature_extractor(model, names).to(device)
    small, big = _sizes(size)
    out_a = probe_outputs(fe, small, device)
    shapes_a = {k: tuple(v.shape) for k, v in out_a.items() if torch.is_tensor(v)}
    del out_a
    try:
        out_b = probe_outputs(fe, big, device)
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


def find_penultimate(model, size, device):
    """Module returning the input of the final Linear layer (in execution order)."""
    torch = import_torch()
    W = _wrappers()
    calls: list[tuple[str, Any]] = []
    handles = [
        mod.register_forward_pre_hook(lambda _m, args, _n=n: calls.append((_n, args[0])))
        for n, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear)
    ]
    try:
        probe_outputs(model, size, device)
    finally:
        for h in handles:
            h.remove()
    if not calls:
        raise ConfigError(
            f"--layer penultimate: {type(model).__name__} has no Linear classifier; pass a node "
            f"name with --layer (one of ...{', '.join(node_names(model)[-15:])})"
        )
    target, expected = calls[-1]
    parent_name, _, attr = target.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    original = getattr(parent, attr)
    setattr(parent, attr, torch.nn.Identity())
    try:
        got = probe_outputs(model, size, device)
        if torch.is_tensor(got) and got.shape == expected.shape and torch.equal(got, expected):
            return model, target, tuple(got.shape[1:])
    except Exception:
        pass
    setattr(parent, attr, original)
    return W.InputOf(model, target), target, tuple(expected.shape[1:])


class TorchBackbone(Backbone):
    def __init__(self, config: ExtractorConfig, device: str = "auto"):
        torch = import_torch()
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
                module, self.node, shape = find_penultimate(model, self.input_size, self.device)
                self.layer = "penultimate"
            else:
                names = node_names(model)
                if layer is None:
                    node, dynamic, shape = _default_layer(model, names, self.input_size, self.device)
                    self.node = node
                    self.layer = _short_name(node, names)
                else:
                    if not any(layer_matches(layer, n) for n in names):
                        close = difflib.get_close_matches(layer, names, n=5)
                        raise ConfigError(
                            f"--layer {layer!r} is not a node of {config.backbone}"
                            + (f"; did you mean {', '.join(close)}?" if close else "")
                            + f" Valid names include (last 15): {', '.join(names[-15:])}; "
                            "or 'penultimate'. See torchvision.models.feature_extraction.get_graph_node_names."
                        )
                    self.layer = layer
                    self.node = [n for n in names if layer_matches(layer, n)][-1]
                module = _wrappers().Output(feature_extractor(model, {self.layer: "out"}))
        self.module = module.eval().to(self.device)
        self.autocast = _autocast_dtype(config.precision, self.device)
        self.channels_last = self.device == "cpu"
        if self.channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        # output kind and whether other sizes are accepted
        small, big = _sizes(self.input_size)
        if shape is None:
            out = probe_outputs(self.module, small, self.device, self.channels_last)
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
                out_big = probe_outputs(self.module, big, self.device, self.channels_last)
                dynamic = tuple(out_big.shape[1:2]) == tuple(shape[:1])
            except Exception:
                dynamic = False
        self.dynamic_size = bool(dynamic)
        a, b = input_affine(self.spec)
        self._a = torch.as_tensor(a, device=self.device).view(1, 3, 1, 1)
        self._b = torch.as_tensor(b, device=self.device).view(1, 3, 1, 1)

    def to_input(self, images: np.ndarray):
        """uint8 NHWC numpy -> normalized float32 NCHW tensor on the device."""
        torch = import_torch()
        x = torch.from_numpy(np.require(images, requirements=["C", "W"])).to(self.device)
        x = x.permute(0, 3, 1, 2).float()  # NHWC memory = channels_last strides
        if self.spec.order == "bgr":
            x = x.flip(1)
        x = x * self._a - self._b
        if not self.channels_last:
            x = x.contiguous()
        return x

    def _forward(self, images: np.ndarray) -> np.ndarray:
        torch = import_torch()
        device_type = "cuda" if self.device.startswith("cuda") else "cpu"
        autocast = torch.autocast(device_type, dtype=self.autocast, enabled=self.autocast is not None)
        with torch.inference_mode(), autocast:
            out = self.module(self.to_input(images))
            return np.ascontiguousarray(out.float().cpu().numpy(), dtype=np.float32)

    def summary(self) -> dict[str, Any]:
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
            "precision": self.config.precision,
        }
