"""Embedded image retrieval on multi-scale CNN sub-patch descriptors.

Public API::

    from retrieval import Index, ExtractorConfig, SearchConfig
    idx = Index.create("my-index", ExtractorConfig(onnx="model.onnx", onnx_output="627"))
    idx.add(["photos/a.jpg", "photos/b.jpg"])
    for hit in idx.search(["query.jpg"], k=5)[0].hits:
        print(hit.rank, hit.distance, hit.path)

Names are imported on first use, so `import retrieval.evaluation.datasets` (or the CLI's --help)
does not pay for torch, FAISS and the native kernel.
"""
from __future__ import annotations

import importlib
import os

# OpenMP threads that spin while waiting made the kernel ~5x and FAISS k-means ~10x slower
# on a busy 2-core machine (benchmarks/results/kernel.md). Set before any OpenMP runtime
# loads; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_PUBLIC = {
    "ExtractorConfig": "config",
    "InputSpec": "config",
    "RuntimeConfig": "config",
    "SearchConfig": "config",
    "SearchOptions": "config",
    "Extractor": "extraction.extractor",
    "describe": "extraction.features",
    "FeatureStore": "extraction.store",
    "Hit": "engine.query",
    "Index": "engine.index",
    "QueryResult": "engine.query",
    "Report": "engine.index",
    "SearchBatcher": "engine.batcher",
    "ShardedIndex": "engine.sharded",
}

__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'retrieval' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
