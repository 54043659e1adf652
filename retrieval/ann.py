"""A thin FAISS wrapper: index-factory strings, explicit GPU resources, atomic persistence.

The FAISS index holds one vector per window (inner product on unit vectors, so nearest
by inner product is nearest in Euclidean distance); its ids are row numbers of the
index's patch matrix. It only proposes candidates: distances come from the exact kernel.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import faiss
import numpy as np

EXACT = "Flat"


def faiss_device(device: str = "auto") -> str:
    """Where FAISS searches run for a `--device` setting: `cuda:0` or `cpu`."""
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if device == "cuda" and gpus == 0:
        raise RuntimeError("--device cuda was asked for, but FAISS sees no GPU")
    return "cuda:0" if device != "cpu" and gpus > 0 else "cpu"


class VectorIndex:
    """FAISS index over patch vectors. `factory` is a FAISS index-factory string.

    The CPU index is the master copy (it is what gets saved); a GPU replica is made
    on demand for search when a GPU is present and `device` allows it.
    """

    def __init__(self, dim: int, factory: str | None = None, device: str = "auto", nprobe: int = 32) -> None:
        self.dim = dim
        self.factory = factory or EXACT
        self.device = device
        self.nprobe = nprobe
        self._cpu: faiss.Index | None = None
        self._gpu: faiss.Index | None = None
        self._resources = None

    @property
    def index(self) -> faiss.Index:
        if self._cpu is None:
            try:
                self._cpu = faiss.index_factory(self.dim, self.factory, faiss.METRIC_INNER_PRODUCT)
            except RuntimeError as err:
                raise ValueError(f"--index-type {self.factory!r} is not a valid FAISS index-factory string: {err}")
        return self._cpu

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def _use_gpu(self) -> bool:
        return faiss_device(self.device) != "cpu"

    def add(self, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        index = self.index
        if not index.is_trained:
            if len(vectors) < 1:
                raise ValueError(f"index type {self.factory!r} needs training vectors")
            try:
                index.train(vectors)
            except RuntimeError as err:
                raise ValueError(
                    f"cannot train index type {self.factory!r} on {len(vectors)} vectors: {err}; "
                    "use a smaller factory (fewer IVF lists / PQ codes) or the default exact index"
                )
        index.add(vectors)
        self._gpu = None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Inner products and ids of the k nearest vectors of each query row (-1 = none)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = max(1, min(k, self.ntotal))
        index = self.index
        if self._use_gpu():
            if self._gpu is None:
                self._resources = self._resources or faiss.StandardGpuResources()
                self._gpu = faiss.index_cpu_to_gpu(self._resources, 0, index)
            index = self._gpu
        ivf = faiss.try_extract_index_ivf(index) if hasattr(faiss, "try_extract_index_ivf") else None
        if ivf is not None:
            ivf.nprobe = self.nprobe
        return index.search(queries, k)

    def save(self, path: str | Path) -> None:
        """Write atomically (temp file + rename)."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            faiss.write_index(self.index, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path: str | Path, factory: str | None, device: str = "auto", nprobe: int = 32) -> "VectorIndex":
        cpu = faiss.read_index(str(path))
        obj = cls(cpu.d, factory, device, nprobe)
        obj._cpu = cpu
        return obj
