"""L2-normalize, PCA-whiten, L2-normalize: the descriptor post-processing of the papers."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, eps)


class PCAWhitening:
    """PCA-whitening learned on L2-normalized descriptors (scikit-learn style).

    `dim=0` disables whitening (transform is then L2 only). The output dimension is
    `min(dim, input dim, n_samples - 1)`, since directions beyond the data's rank carry
    no variance to whiten; `dim_` holds the value used.
    """

    def __init__(self, dim: int = 256) -> None:
        self.dim = dim

    def fit(self, x: np.ndarray) -> "PCAWhitening":
        x = l2_normalize(x).astype(np.float64)
        n, d = x.shape
        self.input_dim_ = d
        if self.dim == 0:
            self.dim_ = d
            self.mean_ = None
            self.projection_ = None
            return self
        if n < 2:
            raise ValueError(f"PCA-whitening needs at least 2 descriptors, got {n}")
        self.dim_ = int(min(self.dim, d, n - 1))
        mean = x.mean(axis=0)
        centred = x - mean
        cov = centred.T @ centred / (n - 1)
        eigval, eigvec = np.linalg.eigh(cov)
        order = np.argsort(eigval)[::-1][: self.dim_]
        eigval = np.maximum(eigval[order], 1e-12)
        self.mean_ = mean.astype(np.float32)
        self.projection_ = (eigvec[:, order] / np.sqrt(eigval)).astype(np.float32)
        self.explained_ = float(eigval.sum() / max(np.trace(cov), 1e-12))
        return self

    @property
    def output_dim(self) -> int:
        return self.dim_

    def whiten(self, x: np.ndarray) -> np.ndarray:
        """L2 then the PCA-whitening projection, without the final L2 (for tests)."""
        x = l2_normalize(x)
        if self.projection_ is None:
            return x
        return (x - self.mean_) @ self.projection_

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Raw descriptors -> L2 -> PCA-whiten -> L2, float32 [n, dim_]."""
        if x.shape[-1] != self.input_dim_:
            raise ValueError(
                f"descriptors have dimension {x.shape[-1]}, the whitening was fit on {self.input_dim_}"
            )
        return np.ascontiguousarray(l2_normalize(self.whiten(x)))

    def save(self, path: str | Path) -> None:
        """Write atomically (temp file + rename), so a killed process never leaves half a file."""
        path = Path(path)
        arrays = {"dim": np.array(self.dim), "dim_": np.array(self.dim_), "input_dim": np.array(self.input_dim_)}
        if self.projection_ is not None:
            arrays.update(mean=self.mean_, projection=self.projection_)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npz")
        os.close(fd)
        try:
            np.savez(tmp, **arrays)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path: str | Path) -> "PCAWhitening":
        with np.load(path, allow_pickle=False) as data:
            obj = cls(int(data["dim"]))
            obj.dim_ = int(data["dim_"])
            obj.input_dim_ = int(data["input_dim"])
            obj.mean_ = data["mean"] if "mean" in data else None
            obj.projection_ = data["projection"] if "projection" in data else None
        return obj
