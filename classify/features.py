"""Image vectors for classification, through the feature store shared with retrieval.

Raw descriptors come from `retrieval.features.describe`, so an image is run through the
network once per extractor configuration, whichever product asked first: ``--jitter 1``
reads region set ``level1`` (the whole image; the same rows `retrieval build` fills for
level 1), ``--jitter 12`` reads ``jitter12`` (4 corners, centre, whole image, and their
mirrors).

Encoding (Razavian et al. 2014), in this order, identical at train and test time:
1. average the raw window descriptors of the region set (12 for jitter, 1 otherwise);
2. L2-normalise;
3. signed square root (power normalisation, ``sign(x) * |x| ** 0.5``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from retrieval.extractor import Extractor, Skipped
from retrieval.whitening import l2_normalize
from retrieval.features import ImageFeatures, describe
from retrieval.patches import JITTER
from retrieval.store import FeatureStore

__all__ = ["JITTERS", "region_name", "power_normalize", "encode", "FeatureTable", "image_vectors"]

JITTERS = (1, 12)
POWER = 0.5


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


def encode(windows: np.ndarray) -> np.ndarray:
    """One image vector from its raw window descriptors [n, C]: mean, L2, signed sqrt."""
    windows = np.asarray(windows, dtype=np.float32)
    if windows.ndim == 1:
        windows = windows[None, :]
    return power_normalize(l2_normalize(windows.mean(axis=0)))


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
    progress: bool = True,
) -> FeatureTable:
    """Encoded vectors of `paths`: store hits are read, misses extracted and stored.

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
        table.vectors[out.path] = encode(out.descriptors[name])
        table.extracted += int(out.extracted)
    return table
