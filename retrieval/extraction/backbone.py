"""Backbones: a network that turns a batch of RGB images into conv maps or vectors.

Two kinds, one interface (`Backbone`), each in its own module:

- torch (`torch_backbone.py`): any `torchvision.models` architecture, cut at a
  `feature_extraction` node name or at `penultimate` (the input of the final Linear
  classifier); weights from torchvision (fetched to the torch cache), a local checkpoint
  (loaded with `weights_only=True`), or `none` (random init, seeded so that every process
  builds the same network).
- onnx (`onnx_backbone.py`): any .onnx file, cut in memory at any tensor
  (`--onnx-output`); a quantized (uint8/int8) tensor is dequantized at the cut. Batch and
  spatial dimensions of the cut graph are made dynamic when the ops allow it (checked
  numerically against the graph as declared); a graph that stays fixed-batch is run in a
  loop.

`onnx_export.py` exports a torch backbone to ONNX; `layers.py` lists the tensors /
nodes a network can be cut at; `backbones.load_backbone` picks the kind.

Callers feed uint8 NHWC RGB images already resized to `backbone.input_size` (or any size
when `backbone.dynamic_size`); the backbone applies its `InputSpec` itself.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..config import InputSpec

DEFAULT_SIZE = (224, 224)
# extra pixels used to check that a network accepts other spatial sizes
PROBE_EXTRA = 32

def cpu_count() -> int:
    """CPU cores this process may use (its affinity mask, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def cuda_present() -> bool:
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

    def summary(self) -> dict[str, Any]:
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


def input_affine(spec: InputSpec) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel float32 a, b (network channel order) such that input = pixel * a - b."""
    s = 1.0 / 255.0 if spec.scale == 1.0 else 1.0
    mean = np.asarray(spec.mean, np.float64)
    std = np.asarray(spec.std, np.float64)
    return (s / std).astype(np.float32), (mean / std).astype(np.float32)


def preprocess(images: np.ndarray, spec: InputSpec, layout: str = "NCHW") -> np.ndarray:
    """uint8 [N, H, W, 3] RGB -> network input per `spec` (numpy; ONNX path and tests)."""
    x = np.asarray(images)
    if spec.order == "bgr":
        x = x[..., ::-1]
    a, b = input_affine(spec)
    if layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
        a, b = a[:, None, None], b[:, None, None]
    # One pass from the uint8 view into the output, then one in place: the same float32
    # values as converting, scaling, shifting and transposing in four passes, at 4-10x
    # less CPU (pyramid's 448-pixel inputs: 3.8 -> 0.8 ms per image), which the decoding
    # threads need beside the network (benchmarks/results/describe.md, fifth session).
    out = np.empty(x.shape, np.float32)
    np.multiply(x, a, out=out, dtype=np.float32, casting="unsafe")
    out -= b
    return out if spec.dtype == "float32" else out.astype(np.dtype(spec.dtype))


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b| (the absolute difference when b is all zeros)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    scale = float(np.abs(b).max()) if b.size else 0.0
    diff = float(np.abs(a - b).max()) if b.size else 0.0
    return diff / scale if scale > 0 else diff
