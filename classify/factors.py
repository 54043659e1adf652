"""`classify factors`: the factors of transferability as one command (Azizpour et al.).

Evaluates a grid of layer x pooling x jitter x power normalisation x PCA dimension x
method (plus late fusions of layers) with the protocol of `classify run`
(`classify.protocol.run_protocol`: C chosen on the training part only, the test split
used once per configuration). Each (image, layer, pooling, jitter) goes through the
feature store, so it is extracted once, by this run or by any earlier one; power
normalisation, PCA, fusion and C are computed from the stored descriptors.

Encoding of one configuration: the window descriptors averaged and L2-normalised (the
store's features), signed square root when power normalisation is on, the layers of a
fusion concatenated (each part L2-normalised, so each weighs the same), then PCA to
`pca_dim` dimensions fitted on the training part (train + validation) only and L2 again.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np

from retrieval.config import ExtractorConfig, RuntimeConfig
from retrieval.extraction.extractor import Extractor
from retrieval.extraction.store import FeatureStore
from retrieval.engine.whitening import l2_normalize
from retrieval.extraction.progress import Progress

from .data import Dataset
from .features import FeatureTable, image_vectors, power_normalize
from .models import CV_REPEATS
from .protocol import run_protocol

__all__ = ["FactorGrid", "study"]


@dataclass(frozen=True)
class FactorGrid:
    """The values of each factor; every combination is one configuration (row).

    `layers` are `--layer` names (torch) or `--onnx-output` tensors (ONNX); `fuse` lists
    tuples of such names evaluated as one concatenated descriptor each.
    """

    layers: tuple[str, ...]
    pools: tuple[str, ...] = ("avg",)
    pca_dims: tuple[int, ...] = (0,)
    jitters: tuple[int, ...] = (1,)
    power_norms: tuple[bool, ...] = (False,)
    methods: tuple[str, ...] = ("logreg",)
    fuse: tuple[tuple[str, ...], ...] = ()

    def __len__(self) -> int:
        per_layer = len(self.pools) * len(self.pca_dims) * len(self.jitters) * len(self.power_norms) * len(self.methods)
        return (len(self.layers) + len(self.fuse)) * per_layer


@dataclass
class _Features:
    """L2-normalised averaged descriptors of one (layer, pooling, jitter), and what
    obtaining them cost; the cost is charged to the first row that uses them."""

    table: FeatureTable
    seconds: float
    charged: bool = False


def _apply_power(table: FeatureTable, on: bool) -> dict[str, np.ndarray]:
    return {p: power_normalize(v) for p, v in table.vectors.items()} if on else table.vectors


def _fused(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenation of each part's (L2-normalised) vector, for the paths every part has."""
    common = [p for p in parts[0] if all(p in part for part in parts[1:])]
    return {p: np.concatenate([part[p] for part in parts]) for p in common}


def _reduced(vectors: dict[str, np.ndarray], fit_paths: list[str], pca_dim: int) -> dict[str, np.ndarray]:
    """PCA to `pca_dim` (capped by the dimension and the training images) fitted on
    `fit_paths` only, then L2; `pca_dim` 0 leaves the vectors as they are."""
    if pca_dim == 0:
        return vectors
    from sklearn.decomposition import PCA

    paths = list(vectors)
    X = np.stack([vectors[p] for p in paths])
    fit = np.stack([vectors[p] for p in fit_paths])
    k = min(pca_dim, X.shape[1], len(fit))
    Z = l2_normalize(PCA(n_components=k, random_state=0).fit(fit).transform(X))
    return dict(zip(paths, Z))


def study(
    ds: Dataset,
    base: ExtractorConfig,
    runtime: RuntimeConfig,
    store: FeatureStore,
    grid: FactorGrid,
    depths: dict[str, float],
    *,
    cv: int = 4,
    seed: int = 0,
    repeats: int = CV_REPEATS,
    progress: bool = True,
) -> Iterator[dict]:
    """Evaluate every configuration of `grid` on `ds`; yields one row (dict) per
    configuration as it is done. `depths` maps layer names to their depth (0..1)."""
    layer_field = "onnx_output" if base.onnx else "layer"
    training_part = ds.train.paths + (ds.val.paths if ds.val else [])
    paths = list(dict.fromkeys(training_part + ds.test.paths))
    cache: dict[tuple[str, str, int], _Features] = {}

    def features(layer: str, pool: str, jitter: int) -> _Features:
        key = (layer, pool, jitter)
        if key not in cache:
            t0 = time.perf_counter()
            extractor = Extractor(replace(base, **{layer_field: layer}, pool=pool), runtime)
            table = image_vectors(paths, extractor, store, jitter, power_norm=False, progress=progress)
            cache[key] = _Features(table, time.perf_counter() - t0)
        return cache[key]

    entries = [(name, (name,)) for name in grid.layers] + [("+".join(parts), tuple(parts)) for parts in grid.fuse]
    bar = Progress(len(grid), "configurations", "cfg", enabled=progress)
    try:
        for jitter in grid.jitters:
            for name, parts in entries:
                for pool in grid.pools:
                    feats = [features(part, pool, jitter) for part in parts]
                    extracted = sum(f.table.extracted for f in feats if not f.charged)
                    cost = sum(f.seconds for f in feats if not f.charged)
                    for f in feats:
                        f.charged = True
                    skipped = sorted({s.path for f in feats for s in f.table.skipped})
                    for power in grid.power_norms:
                        encoded = _fused([_apply_power(f.table, power) for f in feats])
                        fit_paths = [p for p in training_part if p in encoded]
                        for pca_dim in grid.pca_dims:
                            t0 = time.perf_counter()
                            table = FeatureTable(_reduced(encoded, fit_paths, pca_dim))
                            reduce_seconds = time.perf_counter() - t0
                            for method in grid.methods:
                                t1 = time.perf_counter()
                                _, res = run_protocol(ds, table, method, cv, seed, repeats)
                                images = len(table.vectors)
                                yield {
                                    "layer": name, "parts": list(parts),
                                    "depth": depths.get(name) if len(parts) == 1 else None,
                                    "pool": pool, "jitter": jitter, "power_norm": power, "pca_dim": pca_dim,
                                    "dim": int(len(next(iter(table.vectors.values())))), "method": method,
                                    "accuracy": res["accuracy"], "mean_per_class": res["mean_per_class"],
                                    "map": res["map"], "C": res["C"], "C_at_edge": res["C_at_edge"],
                                    "selection": res["selection"], "train": res["train"], "test": res["test"],
                                    "seconds": cost + reduce_seconds + time.perf_counter() - t1,
                                    "extracted": extracted, "from_store": images - extracted,
                                    "skipped": skipped,
                                }
                                extracted, cost, reduce_seconds = 0, 0.0, 0.0
                                bar.update(1)
    finally:
        bar.close()
