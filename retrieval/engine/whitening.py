"""L2-normalize, PCA-whiten, L2-normalize: the descriptor post-processing of the papers.

Learned on the database itself, plain PCA-whitening can ruin retrieval: with fewer
windows than dimensions, the directions the sample happens not to span get the largest
weights, and even with enough windows it flattens the very directions that tell a
collection's objects apart (paris6k-mini, one window per image, 250 images: mAP 33
whitened against 82 without). So the eigenvalues are shrunk towards their mean by a
factor that falls as the sample grows (`shrinkage="auto"`, measured in
benchmarks/results/whitening.md), and a sample too small to estimate anything is not whitened at
all. Learned on other images (`--whiten-on`), that factor shrank a whitening of 1,000
images far more than the data asked, so there the factor is estimated from the data
(Ledoit-Wolf, the images counted as the samples). The covariance is accumulated chunk by chunk, so a fit needs memory for one chunk
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
# The named shrinkage rules (PCAWhitening's docstring).
RULES = ("auto", "ledoit-wolf", "ledoit-wolf-images", "oas")
# The rule a whitening is fitted by, by what it is learned on: Ledoit-Wolf (with images as
# the sample size) on other images, where the covariance is an honest sample of what
# descriptors vary in; on the database itself it shrinks too little and whitens away the
# directions that tell the collection's objects apart, so "auto" (benchmarks/results/whitening.md).
RULE_BY_SOURCE = {"database": "auto", "whiten_on": "ledoit-wolf-images"}
# Whitening files from before the rule was stored were all fitted by this one.
RULE_BEFORE_RECORDED = "auto"
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
    each eigenvalue with their mean (1 = PCA rotation without whitening), or a rule:
    "auto" chooses it from the sample size, min(1, 4 d / n); "ledoit-wolf" / "oas"
    estimate it from the data (as sklearn.covariance does, from the streamed sums);
    "ledoit-wolf-images" is Ledoit-Wolf's estimate with the number of images, not of
    windows, as the sample size (an image's windows are not independent samples). The
    writer picks the rule by what the whitening is learned on (`RULE_BY_SOURCE`): no rule
    won on every case measured (benchmarks/results/whitening.md). After `fit`: `dim_`
    (output dimension), `n_samples_` (windows fitted on), `shrinkage_` (the value used),
    `fitted_` (False when the sample was too small and the transform is the identity).
    The rule is saved with the file, so `summary` says which one fitted it.
    """

    def __init__(self, dim: int = 256, shrinkage: float | str = "auto") -> None:
        self.dim = dim
        self.shrinkage = shrinkage

    def fit(self, x: np.ndarray) -> "PCAWhitening":
        return self.fit_chunks([x])

    def fit_chunks(self, chunks: Iterable[np.ndarray], windows_per_image: int = 1) -> "PCAWhitening":
        """Fit on the concatenation of `chunks` ([n_i, d] raw descriptors), streamed. Each
        chunk holds whole images of `windows_per_image` consecutive windows; the rules that
        count images ("ledoit-wolf-images") need it."""
        windows = _Moments()
        for chunk in chunks:
            x = l2_normalize(chunk).astype(np.float64)
            if not len(x):
                continue
            if len(x) % windows_per_image:
                raise ValueError(f"a chunk of {len(x)} windows is not whole images of {windows_per_image}")
            windows.add(x)
        if windows.gram is None:
            raise ValueError("PCA-whitening needs descriptors to fit on, got none")
        n, d = windows.n, windows.gram.shape[0]
        self.input_dim_, self.n_samples_ = d, n
        self.mean_ = self.projection_ = None
        self.shrinkage_, self.explained_ = 1.0, 1.0
        self.fitted_ = self.dim != 0 and n >= max(2, MIN_WINDOWS_PER_DIM * d)
        if not self.fitted_:
            self.dim_ = d
            return self
        mean, cov = windows.mean, windows.covariance
        eigval, eigvec = np.linalg.eigh(cov)
        order = np.argsort(eigval)[::-1]
        eigval, eigvec = np.maximum(eigval[order], 0.0), eigvec[:, order]
        a = self._shrinkage(eigval, windows, n // windows_per_image)
        shrunk = (1.0 - a) * eigval + a * max(eigval.mean(), 1e-12)
        self.dim_ = int(min(self.dim, d))
        self.shrinkage_ = a
        self.mean_ = mean.astype(np.float32)
        self.projection_ = (eigvec[:, : self.dim_] / np.sqrt(shrunk[: self.dim_])).astype(np.float32)
        self.explained_ = float(eigval[: self.dim_].sum() / max(eigval.sum(), 1e-12))
        return self

    def _shrinkage(self, eigval: np.ndarray, windows: "_Moments", images: int) -> float:
        """The shrinkage `self.shrinkage` names, for the windows' covariance eigenvalues
        `eigval` (descending), their moments, and the number of images they come from."""
        n, d = windows.n, len(eigval)
        rule = self.shrinkage
        if rule == "auto":
            return min(1.0, SHRINK_SCALE * d / n)
        if rule == "ledoit-wolf":
            return ledoit_wolf_shrinkage(eigval * (n - 1) / n, n, windows.fourth())
        if rule == "oas":
            return oas_shrinkage(eigval * (n - 1) / n, n)
        if rule == "ledoit-wolf-images":
            # Ledoit-Wolf's estimate falls as 1/n; an image's windows are not independent
            # samples, so n is the number of images.
            return min(1.0, ledoit_wolf_shrinkage(eigval * (n - 1) / n, n, windows.fourth()) * n / images)
        a = float(rule) if isinstance(rule, (int, float)) else float("nan")
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1], {', '.join(map(repr, RULES))}, got {rule!r}")
        return a

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
            "rule": str(self.shrinkage),
            "explained_variance": round(self.explained_, 4),
        }

    def save(self, path: str | Path) -> None:
        """Write atomically (temp file + rename), so a killed process never leaves half a file."""
        path = Path(path)
        arrays = {
            "dim": np.array(self.dim), "dim_": np.array(self.dim_), "input_dim": np.array(self.input_dim_),
            "n_samples": np.array(self.n_samples_), "shrinkage": np.array(self.shrinkage_),
            "explained": np.array(self.explained_), "fitted": np.array(self.fitted_),
            "rule": np.array(str(self.shrinkage)),
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
                obj = cls(int(data["dim"]), str(data["rule"]) if "rule" in data else RULE_BEFORE_RECORDED)
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


class _Moments:
    """Streamed sums of rows x: count, sum, x^T x, and for Ledoit-Wolf's fourth moment the
    sums of a = |x|^2, a^2 and a x (the rows themselves are never held)."""

    def __init__(self) -> None:
        self.n, self.total, self.gram = 0, None, None
        self.sum_a = self.sum_a2 = 0.0
        self.sum_ax = None

    def add(self, x: np.ndarray) -> None:
        if self.gram is None:
            d = x.shape[1]
            self.total, self.gram, self.sum_ax = np.zeros(d), np.zeros((d, d)), np.zeros(d)
        a = np.einsum("ij,ij->i", x, x)
        self.n += len(x)
        self.total += x.sum(axis=0)
        self.gram += x.T @ x
        self.sum_a += a.sum()
        self.sum_a2 += a @ a
        self.sum_ax += a @ x

    @property
    def mean(self) -> np.ndarray:
        return self.total / self.n

    @property
    def covariance(self) -> np.ndarray:
        """The unbiased covariance (n - 1 in the denominator)."""
        mean = self.mean
        return (self.gram - self.n * np.outer(mean, mean)) / (self.n - 1)

    def fourth(self) -> float:
        """sum_i |x_i - mean|^4, expanded in the streamed sums (c = |mean|^2)."""
        mean, n = self.mean, self.n
        c = mean @ mean
        return float(self.sum_a2 + 4 * mean @ self.gram @ mean + n * c * c - 4 * self.sum_ax @ mean
                     + 2 * c * self.sum_a - 4 * n * c * c)


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

