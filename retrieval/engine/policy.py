"""When the one writer does more than append: its rules as one value.

Every change costs what it changes: new images are whitened into one new segment and
appended to the FAISS structures, removed images become tombstones. Bigger rewrites
happen only by these rules, each bounded so that the total work stays amortised O(1)
per image (geometric growth) or proportional to what was removed:

- the whitening is fitted on at most `whiten_sample_images` images and re-fitted each
  time the collection has grown `refit_growth`-fold, until its sample is full;
- segments of one size tier (sizes within a factor `merge_factor`) are merged once
  `merge_factor` of them exist, and a segment a `compact_removed_fraction` of whose
  images were removed is rewritten without them;
- above `ann_min_images` images two FAISS structures propose candidates; they are
  re-trained after `retrain_growth`-fold growth and purged of removed images once
  those are a `purge_fraction` of their entries; the layout index exists from
  `layout_min_images` images and is trained on at most `layout_train_images`.

`Index.info()` reports the policy in force (`describe`); tests pass smaller numbers to
exercise each rule on a few images.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..config import EXACT_LIMIT
from .ann import LAYOUT_MIN_IMAGES, LAYOUT_TRAIN_IMAGES, RETRAIN_GROWTH


@dataclass(frozen=True)
class WritePolicy:
    """The writer's rules (defaults: the measured ones, see the module docstring)."""

    whiten_sample_images: int = 2048
    refit_growth: int = 2
    merge_factor: int = 4
    compact_removed_fraction: float = 0.25
    ann_min_images: int = EXACT_LIMIT
    retrain_growth: int = RETRAIN_GROWTH
    purge_fraction: float = 0.2
    layout_min_images: int = LAYOUT_MIN_IMAGES
    layout_train_images: int = LAYOUT_TRAIN_IMAGES

    def __post_init__(self) -> None:
        for name in ("whiten_sample_images", "layout_train_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"WritePolicy.{name} must be >= 1")
        for name in ("refit_growth", "merge_factor", "retrain_growth"):
            if getattr(self, name) < 2:
                raise ValueError(f"WritePolicy.{name} must be >= 2 (growth by a factor)")
        for name in ("compact_removed_fraction", "purge_fraction"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"WritePolicy.{name} must be in (0, 1]")
        if self.ann_min_images < 0 or self.layout_min_images < 0:
            raise ValueError("WritePolicy.ann_min_images and layout_min_images must be >= 0")

    # -- whitening ------------------------------------------------------------------------
    def refit_due(self, fitted: dict, images: int) -> bool:
        """Whether a whitening fitted as `fitted` (state.json's record: source,
        sample_images, images) is re-fitted for a collection of `images` images. Only a
        whitening learned on the database itself grows with it."""
        return (
            fitted.get("source") == "database"
            and fitted["sample_images"] < self.whiten_sample_images
            and images >= self.refit_growth * fitted["images"]
        )

    def refit_rule(self, fitted: dict) -> str:
        """What happens next to a whitening fitted as `fitted`, in words (for `info`)."""
        if fitted.get("source") == "shared":
            return "fixed: shared by every shard of a split index"
        if fitted.get("source") != "database":
            return "fixed: learned on --whiten-on images"
        if fitted["sample_images"] >= self.whiten_sample_images:
            return f"fixed: the sample is full ({self.whiten_sample_images} images)"
        return f"re-fitted when the collection reaches {self.refit_growth * fitted['images']} images"

    # -- segments -------------------------------------------------------------------------
    def tier(self, images: int) -> int:
        """Size tier of a segment: segments within a factor `merge_factor` share one."""
        return int(math.log(max(images, 1)) / math.log(self.merge_factor))

    def segments_to_rewrite(self, sizes: list[int], removed: list[int]) -> list[int]:
        """Positions of the segments the next rewrite takes, given each segment's image
        count and how many of them were removed: every segment removed past the
        compaction fraction (rewritten without those images) or else the smallest tier
        holding `merge_factor` segments (merged into one); [] when nothing is due."""
        compact = [i for i, (n, r) in enumerate(zip(sizes, removed)) if n and r / n >= self.compact_removed_fraction]
        if compact:
            return compact
        tiers: dict[int, list[int]] = {}
        for i, n in enumerate(sizes):
            tiers.setdefault(self.tier(n), []).append(i)
        return next((group for _, group in sorted(tiers.items()) if len(group) >= self.merge_factor), [])

    # -- FAISS ----------------------------------------------------------------------------
    def wants_candidates(self, images: int) -> bool:
        """Whether a collection of `images` images gets the automatic FAISS structures
        (below, the kernel scoring every image is exact and, measured, faster)."""
        return images > self.ann_min_images

    def retrain_due(self, trained_windows: int, windows: int) -> bool:
        """Whether an automatic window index trained on `trained_windows` is trained again."""
        return windows >= self.retrain_growth * trained_windows

    def purge_due(self, entries: int, live: int) -> bool:
        """Whether a FAISS structure holding `entries` vectors, `live` of them wanted,
        is rewritten without the others (removed images cost search time until then)."""
        return entries - live > self.purge_fraction * entries

    def wants_layout(self, images: int) -> bool:
        """Whether the layout index exists: its 4-bit codebooks need this many images."""
        return images >= self.layout_min_images

    def describe(self) -> dict:
        """The rules in force, as `retrieval info --json` reports them."""
        return dataclasses.asdict(self)
