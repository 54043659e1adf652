"""The one writer's work: bring an index's derived files up to its manifest, and publish.

Called with the index's write lock held, after images were added to or removed from the
manifest. Its cost follows the change, not the collection: new images are whitened from
the feature store into one new segment and appended to the FAISS structure; removed
images become tombstones. Bigger rewrites happen by policy, each bounded in total:

- whitening: fitted on the windows of at most `WHITEN_SAMPLE_IMAGES` images (those with
  the smallest content digests, so the same collection always gives the same sample, an
  interrupted build the same whitening as an uninterrupted one), and re-fitted whenever
  the collection has doubled since the last fit until the sample is full; a re-fit
  re-whitens every stored image (geometric growth: amortised O(1) per image).
- segments: tiered merging (`MERGE_FACTOR` segments of one size tier become one), and a
  segment a quarter of whose images are removed is rewritten without them.
- FAISS: none up to `EXACT_LIMIT` images (the kernel scores them all); above, an IVF
  fast-scan PQ structure over windows chosen by size and, beside it, the layout index
  (one vector per image, `ann.layout_factory`), both trained on one sample and re-trained
  after 4-fold growth.

A derived file found missing or damaged is rebuilt from the feature store; raw
descriptors missing from the store are an error that names the image and the fix.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from .ann import (LAYOUT_MIN_IMAGES, LAYOUT_TRAIN_IMAGES, RETRAIN_GROWTH, VectorIndex, auto_factory, is_flat,
                  layout_factory, training_size, window_ids)
from ..config import EXACT_LIMIT
from .segments import DamagedFile, load_npy, open_segment, save_npy, write_segment
from .snapshot import State, publish, read_state
from .whitening import PCAWhitening

if TYPE_CHECKING:
    from .index import Index

WHITEN_SAMPLE_IMAGES = 2048
REFIT_GROWTH = 2
MERGE_FACTOR = 4
COMPACT_DEAD_FRACTION = 0.25
ANN_PURGE_FRACTION = 0.2
CHUNK_IMAGES = 512


class StoreGap(RuntimeError):
    """The feature store lacks descriptors of an indexed image: the index cannot be derived."""


class SharedWhiteningGap(StoreGap):
    """A shard's shared whitening is unreadable: the shard cannot be derived."""


def refresh(index: "Index", *, progress: bool = False, retrain: bool = False) -> State:
    """Publish a state that matches the manifest (caller holds the write lock).
    `retrain` rebuilds the FAISS structure (after a change of `--index-type`)."""
    return _Writer(index, progress, retrain).run()


class _Writer:
    def __init__(self, index: "Index", progress: bool, retrain: bool = False) -> None:
        self.index = index
        self.retrain = retrain
        self.dir: Path = index.path
        self.patches = index.patches_per_image
        self.progress = progress

    # -- the whole pass -------------------------------------------------------------------
    def run(self) -> State:
        generation, live = self.index.manifest.snapshot_ids()
        state = self._published()
        state.generation, state.images = generation, len(live)
        if not len(live):
            state.segments, state.dead, state.ann, state.note = [], None, None, None
            publish(self.dir, state)
            return state
        whitening = self._whitening(state, len(live))
        self._keep_whole_segments(state, whitening.output_dim)
        published = self._segment_ids(state)
        new = np.setdiff1d(live, published)
        if len(new):
            state.segments.append(self._write(state, new, whitening))
        self._merge(state, live, whitening.output_dim)
        dead = np.setdiff1d(self._segment_ids(state), live)
        state.dead = None
        if len(dead):
            name = state.new_name("dead", ".npy")
            save_npy(self.dir / name, dead)
            state.dead = {"file": name, "count": int(len(dead))}
        self._ann(state, live, new, whitening.output_dim)
        publish(self.dir, state)
        return state

    def _published(self) -> State:
        """The published state, or a fresh one when there is none or state.json is damaged."""
        try:
            state = read_state(self.dir)
        except DamagedFile as err:
            self._say(f"{err}; rebuilding the index's derived files from the feature store")
            state = None
        if state is None:
            # Keep counting file names past any leftovers so no new file takes an old name.
            state = State(next=_highest_file_number(self.dir))
        return state

    # -- whitening ------------------------------------------------------------------------
    def _whitening(self, state: State, images: int) -> PCAWhitening:
        """The current whitening, re-fitted when due or damaged; a re-fit drops all segments."""
        current = None
        if state.whitening is not None:
            try:
                current = PCAWhitening.load(self.dir / state.whitening["file"])
            except ValueError as err:
                self._say(f"{err}; fitting the whitening again and re-whitening every image")
        if current is not None and not self._refit_due(state.whitening, images):
            return current
        whitening, info = self._fit(images)
        name = state.new_name("whitening", ".npz")
        whitening.save(self.dir / name)
        state.whitening = {"file": name, **info}
        state.segments, state.dead, state.ann = [], None, None
        return whitening

    def _refit_due(self, info: dict, images: int) -> bool:
        return (
            info.get("source") == "database"
            and info["sample_images"] < WHITEN_SAMPLE_IMAGES
            and images >= REFIT_GROWTH * info["images"]
        )

    def _fit(self, images: int) -> tuple[PCAWhitening, dict]:
        shared = self.index.meta.get("shared_whitening")
        if shared:
            # A shard never fits its own: its distances must stay comparable with the
            # other shards' (retrieval/engine/sharded.py).
            path = self.dir / shared
            try:
                whitening = PCAWhitening.load(path)
            except (OSError, ValueError) as err:
                raise SharedWhiteningGap(f"{path}: the whitening shared by every shard is unreadable "
                                         f"({err}); run `retrieval split` again") from None
            return whitening, {"images": images, "sample_images": 0, "source": "shared"}
        pca_dim = self.index.search_config.pca_dim
        sources = self.index.meta.get("whiten_on")
        if sources:
            raws = self.index.describe_sources(sources, progress=self.progress)
            digests = sorted(raws)[:WHITEN_SAMPLE_IMAGES]
            whitening = PCAWhitening(pca_dim).fit_chunks(raws[d] for d in digests)
            source = "whiten_on"
        else:
            digests = self.index.manifest.smallest_digests(WHITEN_SAMPLE_IMAGES)
            whitening = PCAWhitening(pca_dim).fit_chunks(self._raw_chunks(digests))
            source = "database"
        return whitening, {"images": images, "sample_images": len(digests), "source": source}

    # -- segments -------------------------------------------------------------------------
    def _keep_whole_segments(self, state: State, dim: int) -> None:
        """Drop segments whose files are missing or damaged: their images count as new."""
        whole = []
        for s in state.segments:
            try:
                open_segment(self.dir, s["name"], s["images"], self.patches, dim)
                whole.append(s)
            except DamagedFile as err:
                self._say(f"{err}; re-whitening its images from the feature store")
                state.ann = None  # its windows are in FAISS: rebuild rather than double them
        state.segments = whole

    def _segment_ids(self, state: State) -> np.ndarray:
        ids = [load_npy(self.dir / f"{s['name']}.ids.npy", mmap=False) for s in state.segments]
        return np.sort(np.concatenate(ids)) if ids else np.empty(0, np.int64)

    def _write(self, state: State, ids: np.ndarray, whitening: PCAWhitening) -> dict:
        name = state.new_name("seg")
        write_segment(self.dir, name, ids, self._whitened(ids, whitening), self.patches, whitening.output_dim)
        return {"name": name, "images": int(len(ids))}

    def _merge(self, state: State, live: np.ndarray, dim: int) -> None:
        """Tiered merging, and compaction of segments with many removed images."""
        while True:
            opened = [open_segment(self.dir, s["name"], s["images"], self.patches, dim) for s in state.segments]
            alive = [np.isin(seg.ids, live) for seg in opened]
            picks = [i for i, a in enumerate(alive) if len(a) and 1 - a.mean() >= COMPACT_DEAD_FRACTION]
            if not picks:
                tiers: dict[int, list[int]] = {}
                for i, seg in enumerate(opened):
                    tiers.setdefault(_tier(seg.images), []).append(i)
                picks = next((group for _, group in sorted(tiers.items()) if len(group) >= MERGE_FACTOR), [])
            if not picks:
                return
            ids = np.concatenate([opened[i].ids[alive[i]] for i in picks])
            chunks = (opened[i].read(rows, self.patches) for i in picks for rows in _chunks(np.flatnonzero(alive[i])))
            name = state.new_name("seg")
            write_segment(self.dir, name, ids, chunks, self.patches, dim)
            merged = {"name": name, "images": int(len(ids))}
            state.segments = [s for i, s in enumerate(state.segments) if i not in picks]
            if len(ids):
                state.segments.append(merged)

    # -- FAISS ----------------------------------------------------------------------------
    def _ann(self, state: State, live: np.ndarray, new: np.ndarray, dim: int) -> None:
        state.note = None
        user = self.index.index_type
        if is_flat(user) or (user is None and len(live) <= EXACT_LIMIT):
            state.ann = None
            return
        windows = len(live) * self.patches
        loaded = None
        due = self.retrain or (state.ann is not None and state.ann["auto"] and windows >= RETRAIN_GROWTH * state.ann["windows"])
        if state.ann is not None and not due:
            try:
                loaded = self._load_ann(state.ann)
            except ValueError as err:
                self._say(f"{err}; training the FAISS structures again")
        if loaded is None:
            factory = user or auto_factory(windows, dim)
            ann = VectorIndex(dim, factory, self.index.runtime.device)
            try:
                ann.train(self._training_sample(state, live, dim, training_size(factory)))
            except ValueError as err:
                # Too few windows for the user's factory yet: exact search serves meanwhile.
                state.ann, state.note = None, f"{err}; searching exactly until the collection is large enough"
                return
            layout = self._new_layout(state, live, dim)
            self._add_to_ann(ann, layout, state, live, dim)
            state.ann = {"factory": factory, "auto": user is None, "windows": windows, "images": int(len(live))}
        else:
            ann, layout = loaded
            fresh = layout is None and self._new_layout(state, live, dim)
            self._add_to_ann(ann, None if fresh else layout, state, new, dim)
            if fresh:
                layout = fresh
                self._add_to_ann(None, layout, state, live, dim)
            if ann.ntotal - windows > ANN_PURGE_FRACTION * ann.ntotal:
                ann.remove_not_in(window_ids(live, self.patches))
            if layout is not None and layout.ntotal - len(live) > ANN_PURGE_FRACTION * layout.ntotal:
                layout.remove_not_in(live)
        name = state.new_name("ann", ".faiss")
        ann.save(self.dir / name)
        state.ann = {**state.ann, "file": name, "layout": None, "layout_factory": None}
        if layout is not None:
            state.ann["layout"], state.ann["layout_factory"] = state.new_name("layout", ".faiss"), layout.factory
            layout.save(self.dir / state.ann["layout"])

    def _load_ann(self, info: dict) -> tuple[VectorIndex, VectorIndex | None]:
        """The published window index (ValueError naming it when missing or damaged) and
        layout index (None when there is none or it is damaged: it is built again)."""
        device = self.index.runtime.device
        ann = VectorIndex.load(self.dir / info["file"], info["factory"], device)
        if not info.get("layout"):
            return ann, None
        try:
            return ann, VectorIndex.load(self.dir / info["layout"], info["layout_factory"], device)
        except ValueError as err:
            self._say(f"{err}; building the layout index again")
            return ann, None

    def _new_layout(self, state: State, live: np.ndarray, dim: int) -> VectorIndex | None:
        """A trained, empty layout index; None below LAYOUT_MIN_IMAGES images (its 4-bit
        codebooks need them, and the window index alone finds so few images' mates)."""
        factory = layout_factory(self.patches, dim)
        if factory is None or len(live) < LAYOUT_MIN_IMAGES:
            return None
        layout = VectorIndex(self.patches * dim, factory, self.index.runtime.device)
        sample = self._training_sample(state, live, dim, LAYOUT_TRAIN_IMAGES * self.patches)
        layout.train(sample.reshape(-1, self.patches * dim))
        return layout

    def _add_to_ann(self, ann: VectorIndex | None, layout: VectorIndex | None, state: State, ids: np.ndarray,
                    dim: int) -> None:
        """Append the windows of images `ids` to the window index and their laid-out
        vectors to the layout index (either may be None)."""
        for seg in self._open(state, dim):
            for chunk in _chunks(np.flatnonzero(np.isin(seg.ids, ids))):
                vectors = seg.read(chunk, self.patches)
                if ann is not None:
                    ann.add(vectors, window_ids(seg.ids[chunk], self.patches))
                if layout is not None:
                    layout.add(vectors.reshape(len(chunk), -1), seg.ids[chunk])

    def _training_sample(self, state: State, live: np.ndarray, dim: int, size: int) -> np.ndarray:
        """`size` windows of evenly spread live images (deterministic)."""
        images = min(len(live), max(1, -(-size // self.patches)))
        chosen = live[np.linspace(0, len(live) - 1, images).astype(np.int64)]
        parts = []
        for seg in self._open(state, dim):
            rows = np.flatnonzero(np.isin(seg.ids, chosen))
            parts.extend(seg.read(chunk, self.patches) for chunk in _chunks(rows))
        return np.concatenate(parts).astype(np.float32)

    def _open(self, state: State, dim: int):
        return [open_segment(self.dir, s["name"], s["images"], self.patches, dim) for s in state.segments]

    # -- raw descriptors ------------------------------------------------------------------
    def _raw_chunks(self, digests: list[str]) -> Iterator[np.ndarray]:
        for start in range(0, len(digests), CHUNK_IMAGES):
            chunk = digests[start:start + CHUNK_IMAGES]
            found = self.index.raw_descriptors(chunk)
            yield np.concatenate([found[d] for d in chunk])

    def _whitened(self, ids: np.ndarray, whitening: PCAWhitening) -> Iterator[np.ndarray]:
        digest_of = self.index.manifest.digests(ids)
        for start in range(0, len(ids), CHUNK_IMAGES):
            chunk = [digest_of[i] for i in ids[start:start + CHUNK_IMAGES].tolist()]
            found = self.index.raw_descriptors(chunk)
            yield whitening.transform(np.concatenate([found[d] for d in chunk]))

    def _say(self, message: str) -> None:
        print(f"retrieval: {message}", file=sys.stderr)


def _chunks(rows: np.ndarray) -> Iterator[np.ndarray]:
    """Row numbers in pieces small enough to hold in memory."""
    for start in range(0, len(rows), CHUNK_IMAGES):
        yield rows[start:start + CHUNK_IMAGES]


def _tier(images: int) -> int:
    """Size tier of a segment: segments within a factor MERGE_FACTOR share one."""
    return int(np.log(max(images, 1)) / np.log(MERGE_FACTOR))


def _highest_file_number(directory: Path) -> int:
    numbers = [0]
    for path in directory.iterdir():
        stem = path.name.split(".")[0]
        if "-" in stem and stem.rsplit("-", 1)[1].isdigit():
            numbers.append(int(stem.rsplit("-", 1)[1]))
    return max(numbers)
