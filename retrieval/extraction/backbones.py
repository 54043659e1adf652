"""Which network a configuration gets: an ONNX model cut at a tensor, or a torchvision
model at a layer (each module imports its framework only when chosen)."""
from __future__ import annotations

from ..config import ExtractorConfig
from .backbone import Backbone


def load_backbone(config: ExtractorConfig, device: str = "auto") -> Backbone:
    """The backbone described by `config` (ONNX when `config.onnx`, else torchvision)."""
    if config.onnx:
        from .onnx_backbone import OnnxBackbone

        return OnnxBackbone(config, device)
    from .torch_backbone import TorchBackbone

    return TorchBackbone(config, device)
