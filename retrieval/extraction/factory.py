"""Which extractor a run gets: the local one, or one whose networks run on a Ray cluster."""
from __future__ import annotations

from ..config import ExtractorConfig, RuntimeConfig
from .extractor import Extractor


def make_extractor(config: ExtractorConfig, runtime: RuntimeConfig | None = None) -> Extractor:
    """The extractor `runtime` asks for: local, or on a Ray cluster when `runtime.ray` is set."""
    if runtime is not None and runtime.ray:
        from .distributed import RayExtractor

        return RayExtractor(config, runtime)
    return Extractor(config, runtime)
