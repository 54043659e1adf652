"""Image vectors for classification, through the feature store shared with retrieval.

Raw descriptors come from `retrieval.extraction.features.describe`, so an image is run through the
network once per extractor configuration, whichever product asked first: ``--jitter 1``
reads region set ``level1`` (the whole image; the same rows `retrieval build` fills for
level 1), ``--jitter 12`` reads ``jitter12`` (4 corners, centre, whole image, and their
mirrors).

Encoding, in this order, identical at train and test time:
1. average the raw window descriptors of the region set (12 for jitter, 1 otherwise);
2. L2-normalise;
3. optionally, signed square root (power normalisation, ``sign(x) * |x| ** 0.5``;
   Razavian et al. 2014). Off by default since the factor study
   (benchmarks/results/factors.md): on every dataset measured it did not help a linear
   classifier on these features; a model file records whether its features used it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from retrieval.extraction.extractor import Extractor, Skipped
from retrieval.engine.whitening import l2_normalize
from retrieval.extraction.features import ImageFeatures, describe
from retrieval.extraction.patches import JITTER
from retrieval.extraction.store import FeatureStore

__all__ = ["JITTERS", "POWER_NORM", "region_name", "power_normalize", "encode", "FeatureTable", "image_vectors"]

JITTERS = (1, 12)
POWER = 0.5
# Default of `--power-norm` (signed square root): chosen by the factor study.
POWER_NORM = False


def region_name(jitter: int) -> str:
    """Store region set of a jitter setting: 1 -> ``level1``, 12 -> ``jitter12``."""
    if jitter == 1:
        return "level1"
    if jitter == 12:
        return JITTER
    raise ValueError(f"--jitter must be 1 or 12 (got {jitter})")


def power_normalize(x: np.ndarray, power: float = POWER) -> np.ndarray:
    """Signed power: ``sign(x) * |x| ** power`` (power 0.5 = signed square root)."""
    x = np.asarray(x, dtype=np.float32)
    return np.sign(x) * np.abs(x) ** power


def encode(windows: np.ndarray, power_norm: bool = POWER_NORM) -> np.ndarray:
    """One image vector from its raw window descriptors [n, C]: mean, L2, and the signed
    square root when `power_norm`."""
    windows = np.asarray(windows, dtype=np.float32)
    if windows.ndim == 1:
        windows = windows[None, :]
    vector = l2_normalize(windows.mean(axis=0))
    return power_normalize(vector) if power_norm else vector


@dataclass
class FeatureTable:
    """Encoded vectors by path, the inputs that could not be read, and how many images
    had to be run through the network (0 when everything came from the store)."""

    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)
    extracted: int = 0

    def matrix(self, paths: Iterable[str]) -> np.ndarray:
        """Stack the vectors of `paths` (all must be present) into a float32 [n, C] matrix."""
        rows = [self.vectors[p] for p in paths]
        if not rows:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack(rows).astype(np.float32)


def image_vectors(
    paths: Iterable[str],
    extractor: Extractor,
    store: FeatureStore,
    jitter: int = 1,
    *,
    power_norm: bool = POWER_NORM,
    progress: bool = True,
) -> FeatureTable:
    """Encoded vectors of `paths` (see `encode`): store hits are read, misses extracted
    and stored.

    Duplicate paths are described once. Unreadable images end up in `skipped`.
    """
    name = region_name(jitter)
    unique = list(dict.fromkeys(paths))
    table = FeatureTable()
    for out in describe(unique, extractor, store, [name], progress=progress, desc=f"features ({name})"):
        if isinstance(out, Skipped):
            table.skipped.append(out)
            continue
        assert isinstance(out, ImageFeatures)
        table.vectors[out.path] = encode(out.descriptors[name], power_norm)
        table.extracted += int(out.extracted)
    return table
