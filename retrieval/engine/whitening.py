"""L2-normalize, PCA-whiten, L2-normalize: the descriptor post-processing of the papers.

Learned on the database itself, plain PCA-whitening can ruin retrieval: with fewer
windows than dimensions, the directions the sample happens not to span get the largest
weights, and even with enough windows it flattens the very directions that tell a
collection's objects apart (paris6k-mini, one window per image, 250 images: mAP 33
whitened against 82 without). So the eigenvalues are shrunk towards their mean by a
factor that falls as the sample grows (`shrinkage="auto"`, measured in
benchmarks/results/whitening.md), and a sample too small to estimate anything is not whitened at
all. The covariance is accumulated chunk by chunk, so a fit needs memory for one chunk
and one d x d matrix, whatever the sample.
"""
from __future__ import annotations

import contextlib
import zipfile
from pathlib import Path
from typing import Iterable

import numpy as np

from ..blas import one_blas_thread
from ..fileio import replacing

# Below this many windows per input dimension nothing is estimated: the whitening is the
# identity (L2 only). Above, shrinkage = min(1, SHRINK_SCALE * d / n) (benchmarks/results/whitening.md).
MIN_WINDOWS_PER_DIM = 0.05
SHRINK_SCALE = 4.0
# Up to this many rows (a query's windows) the projection runs on one BLAS thread: waking
# the others cost more than the product (benchmarks/results/scale.md: 67 ms against 2 ms for a
# 30 x 1280 query on 2 busy cores); the writer's chunks of thousands of rows use them all.
SINGLE_THREAD_ROWS = 1024


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, eps)


class PCAWhitening:
    """Shrunk PCA-whitening learned on L2-normalized descriptors (scikit-learn style).

    `dim=0` disables whitening (transform is then L2 only). `shrinkage` in [0, 1] blends
    each eigenvalue with their mean (1 = PCA rotation without whitening), or "auto" to
    choose it from the sample size, or "ledoit-wolf" / "oas" to estimate it from the
    data (as sklearn.covariance does, from the streamed sums). "auto" stays the default:
    the estimators won 5 mAP on rParis6k-mini with a whitening learned on UKBench but
    dropped 20 UKBench images whitened on themselves from N-S 4.00 to 3.45
    (benchmarks/results/whitening.md). After `fit`: `dim_` (output dimension),
    `n_samples_` (windows fitted on), `shrinkage_` (the value used), `fitted_` (False
    when the sample was too small and the transform is the identity).
    """

    def __init__(self, dim: int = 256, shrinkage: float | str = "auto") -> None:
        self.dim = dim
        self.shrinkage = shrinkage

    def fit(self, x: np.ndarray) -> "PCAWhitening":
        return self.fit_chunks([x])

    def fit_chunks(self, chunks: Iterable[np.ndarray]) -> "PCAWhitening":
        """Fit on the concatenation of `chunks` ([n_i, d] raw descriptors), streamed."""
        n, total, gram = 0, None, None
        # For the fourth moment Ledoit-Wolf needs: sums of a = |x|^2, a^2 and a x.
        sum_a = sum_a2 = 0.0
        sum_ax = None
        for chunk in chunks:
            x = l2_normalize(chunk).astype(np.float64)
            if not len(x):
                continue
            if gram is None:
                total, gram = np.zeros(x.shape[1]), np.zeros((x.shape[1], x.shape[1]))
                sum_ax = np.zeros(x.shape[1])
            a = np.einsum("ij,ij->i", x, x)
            n += len(x)
            total += x.sum(axis=0)
            gram += x.T @ x
            sum_a += a.sum()
            sum_a2 += a @ a
            sum_ax += a @ x
        if gram is None:
            raise ValueError("PCA-whitening needs descriptors to fit on, got none")
        d = gram.shape[0]
        self.input_dim_, self.n_samples_ = d, n
        self.mean_ = self.projection_ = None
        self.shrinkage_, self.explained_ = 1.0, 1.0
        self.fitted_ = self.dim != 0 and n >= max(2, MIN_WINDOWS_PER_DIM * d)
        if not self.fitted_:
            self.dim_ = d
            return self
        mean = total / n
        cov = (gram - n * np.outer(mean, mean)) / (n - 1)
        eigval, eigvec = np.linalg.eigh(cov)
        order = np.argsort(eigval)[::-1]
        eigval, eigvec = np.maximum(eigval[order], 0.0), eigvec[:, order]
        if self.shrinkage == "auto":
            a = min(1.0, SHRINK_SCALE * d / n)
        elif self.shrinkage == "ledoit-wolf":
            # sum_i |x_i - mean|^4, expanded in the streamed sums (b_i = x_i . mean, c = |mean|^2)
            c = mean @ mean
            fourth = (sum_a2 + 4 * mean @ gram @ mean + n * c * c - 4 * sum_ax @ mean
                      + 2 * c * sum_a - 4 * n * c * c)
            a = ledoit_wolf_shrinkage(eigval * (n - 1) / n, n, fourth)
        elif self.shrinkage == "oas":
            a = oas_shrinkage(eigval * (n - 1) / n, n)
        else:
            a = float(self.shrinkage) if isinstance(self.shrinkage, (int, float)) else float("nan")
            if not 0.0 <= a <= 1.0:
                raise ValueError(f"shrinkage must be in [0, 1], 'auto', 'ledoit-wolf' or 'oas', got {self.shrinkage!r}")
        shrunk = (1.0 - a) * eigval + a * max(eigval.mean(), 1e-12)
        self.dim_ = int(min(self.dim, d))
        self.shrinkage_ = a
        self.mean_ = mean.astype(np.float32)
        self.projection_ = (eigvec[:, : self.dim_] / np.sqrt(shrunk[: self.dim_])).astype(np.float32)
        self.explained_ = float(eigval[: self.dim_].sum() / max(eigval.sum(), 1e-12))
        return self

    @property
    def output_dim(self) -> int:
        return self.dim_

    def whiten(self, x: np.ndarray) -> np.ndarray:
        """L2 then the PCA-whitening projection, without the final L2 (for tests)."""
        x = l2_normalize(x)
        if self.projection_ is None:
            return x
        with one_blas_thread() if len(x) <= SINGLE_THREAD_ROWS else contextlib.nullcontext():
            return (x - self.mean_) @ self.projection_

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Raw descriptors -> L2 -> PCA-whiten -> L2, float32 [n, dim_]."""
        if x.shape[-1] != self.input_dim_:
            raise ValueError(
                f"descriptors have dimension {x.shape[-1]}, the whitening was fit on {self.input_dim_}"
            )
        return np.ascontiguousarray(l2_normalize(self.whiten(x)))

    def summary(self) -> dict:
        """What `retrieval info` shows: dimensions, the sample and the regularisation."""
        return {
            "dim": self.dim_,
            "input_dim": self.input_dim_,
            "fitted": self.fitted_,
            "windows": self.n_samples_,
            "shrinkage": round(self.shrinkage_, 4),
            "explained_variance": round(self.explained_, 4),
        }

    def save(self, path: str | Path) -> None:
        """Write atomically (temp file + rename), so a killed process never leaves half a file."""
        path = Path(path)
        arrays = {
            "dim": np.array(self.dim), "dim_": np.array(self.dim_), "input_dim": np.array(self.input_dim_),
            "n_samples": np.array(self.n_samples_), "shrinkage": np.array(self.shrinkage_),
            "explained": np.array(self.explained_), "fitted": np.array(self.fitted_),
        }
        if self.projection_ is not None:
            arrays.update(mean=self.mean_, projection=self.projection_)
        with replacing(path, suffix=".tmp.npz") as tmp:
            np.savez(tmp, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "PCAWhitening":
        """Read a saved whitening; ValueError naming the file if it is damaged."""
        try:
            with np.load(path, allow_pickle=False) as data:
                obj = cls(int(data["dim"]))
                obj.dim_ = int(data["dim_"])
                obj.input_dim_ = int(data["input_dim"])
                obj.n_samples_ = int(data["n_samples"])
                obj.shrinkage_ = float(data["shrinkage"])
                obj.explained_ = float(data["explained"])
                obj.fitted_ = bool(data["fitted"])
                obj.mean_ = data["mean"] if "mean" in data else None
                obj.projection_ = data["projection"] if "projection" in data else None
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise ValueError(f"{path} is not a readable whitening file ({err})") from err
        if obj.projection_ is not None and obj.projection_.shape != (obj.input_dim_, obj.dim_):
            raise ValueError(f"{path} is damaged: projection shape {obj.projection_.shape}")
        return obj


def ledoit_wolf_shrinkage(eigval: np.ndarray, n: int, fourth: float) -> float:
    """Ledoit and Wolf's (2004) shrinkage towards mu * I, as sklearn.covariance's
    `ledoit_wolf_shrinkage`, from the biased covariance's eigenvalues, the sample size and
    sum_i |x_i - mean|^4 (the data themselves are never held)."""
    d = len(eigval)
    mu = eigval.sum() / d
    frob = float(eigval @ eigval)  # |S|_F^2
    delta = (frob - d * mu * mu) / d
    beta = min(max((fourth / n - frob) / (d * n), 0.0), delta)
    return 0.0 if beta == 0 else float(beta / delta)


def oas_shrinkage(eigval: np.ndarray, n: int) -> float:
    """Chen et al.'s (2010) oracle approximating shrinkage, as sklearn.covariance's `oas`,
    from the biased covariance's eigenvalues and the sample size."""
    d = len(eigval)
    mu = eigval.sum() / d
    alpha = float(eigval @ eigval) / d**2
    den = (n + 1) * (alpha - mu * mu / d)
    return 1.0 if den == 0 else float(min((alpha + mu * mu) / den, 1.0))

