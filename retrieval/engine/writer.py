"""The one writer's work: bring an index's derived files up to its manifest, and publish.

Called with the index's write lock held, after images were added to or removed from the
manifest. Everything it reads comes in one explicit value, `WriterInputs` (the index's
directory, manifest, feature store, settings and `WritePolicy`); it never reaches back
into the `Index`. Its cost follows the change, not the collection: new images are
whitened from the feature store into one new segment and appended to the FAISS
structures; removed images become tombstones. Bigger rewrites happen by the rules of
`policy.WritePolicy`:

- whitening: fitted on the windows of at most `whiten_sample_images` images (those with
  the smallest content digests, so the same collection always gives the same sample, an
  interrupted build the same whitening as an uninterrupted one), and re-fitted on growth
  until the sample is full; a re-fit re-whitens every stored image.
- segments: tiered merging, and compaction of segments with many removed images.
- neighbour lists: each image's nearest images (`neighbour_lists.py`), for re-ranking:
  new images are searched, the lists they enter or removed images leave are updated.
- FAISS: none up to `ann_min_images` images (the kernel scores them all); above, an IVF
  fast-scan PQ structure over windows chosen by size and, beside it, the layout index
  (one vector per image, `ann.layout_factory`), both trained on one sample and re-trained
  after growth.

A derived file found missing or damaged is rebuilt from the feature store; raw
descriptors missing from the store are an error that names the image and the fix.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..extraction.store import FeatureStore
from .ann import VectorIndex, auto_factory, is_flat, layout_factory, training_size, window_ids
from . import neighbour_lists
from .manifest import Manifest
from .neighbour_lists import NeighbourSettings
from .neighbours import ASKED, Neighbours
from .policy import WritePolicy
from .segments import DamagedFile, load_npy, open_segment, save_npy, write_segment
from .snapshot import State, View, publish, read_state
from .whitening import RULE_BY_SOURCE, PCAWhitening

CHUNK_IMAGES = 512


class StoreGap(RuntimeError):
    """The feature store lacks descriptors of an indexed image: the index cannot be derived."""


class SharedWhiteningGap(StoreGap):
    """A shard's shared whitening is unreadable: the shard cannot be derived."""


@dataclass(frozen=True)
class WriterInputs:
    """What the writer reads and obeys, as values.

    `windows` names the stored descriptor sets of an image (one per level) and `patches`
    counts their windows; `whiten_on`, when the whitening is learned on other images,
    describes those into the store on call and returns their digests (called only when
    a fit is due, so an index whose whitening is fitted never needs those files again);
    `shared_whitening` is the file a shard loads instead of fitting its own;
    `neighbours` what the neighbour lists hold (None: not maintained; a stored file's
    own k, set by `retrieval dba -k`, wins over `neighbours.k`)."""

    directory: Path
    manifest: Manifest
    store: FeatureStore
    extractor_key: str
    windows: tuple[str, ...]
    patches: int
    pca_dim: int
    index_type: str | None
    device: str
    policy: WritePolicy = WritePolicy()
    shared_whitening: Path | None = None
    whiten_on: Callable[[], list[str]] | None = None
    neighbours: NeighbourSettings | None = None


def refresh(inputs: WriterInputs, *, progress: bool = False, retrain: bool = False) -> State:
    """Publish a state that matches the manifest (caller holds the write lock).
    `retrain` rebuilds the FAISS structure (after a change of `--index-type`)."""
    return _Writer(inputs, progress, retrain).run()


class _Writer:
    def __init__(self, inputs: WriterInputs, progress: bool, retrain: bool = False) -> None:
        self.inputs = inputs
        self.policy = inputs.policy
        self.retrain = retrain
        self.dir: Path = inputs.directory
        self.patches = inputs.patches
        self.progress = progress

    # -- the whole pass -------------------------------------------------------------------
    def run(self) -> State:
        generation, live = self.inputs.manifest.snapshot_ids()
        state = self._published()
        state.generation, state.images = generation, len(live)
        if not len(live):
            state.segments, state.dead, state.ann, state.note = [], None, None, None
            publish(self.dir, state)
            self._neighbours(state)
            return state
        whitening = self._whitening(state, len(live))
        self._keep_whole_segments(state, whitening.output_dim)
        published = self._segment_ids(state)
        # Both sorted and unique (ids are the manifest's keys): setdiff1d need not sort them
        # again, which took 0.5 s a call at 1,000,000 images, twice per publish.
        new = np.setdiff1d(live, published, assume_unique=True)
        if len(new):
            state.segments.append(self._write(state, new, whitening))
        self._merge(state, live, whitening.output_dim)
        dead = np.setdiff1d(self._segment_ids(state), live, assume_unique=True)
        state.dead = None
        if len(dead):
            name = state.new_name("dead", ".npy")
            save_npy(self.dir / name, dead)
            state.dead = {"file": name, "count": int(len(dead))}
        self._ann(state, live, new, whitening.output_dim)
        publish(self.dir, state)
        self._neighbours(state)
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
        if current is not None and not self.policy.refit_due(state.whitening, images):
            return current
        whitening, info = self._fit(images)
        name = state.new_name("whitening", ".npz")
        whitening.save(self.dir / name)
        state.whitening = {"file": name, **info}
        state.segments, state.dead, state.ann = [], None, None
        return whitening

    def _fit(self, images: int) -> tuple[PCAWhitening, dict]:
        path = self.inputs.shared_whitening
        if path is not None:
            # A shard never fits its own: its distances must stay comparable with the
            # other shards' (retrieval/engine/sharded.py).
            try:
                whitening = PCAWhitening.load(path)
            except (OSError, ValueError) as err:
                raise SharedWhiteningGap(f"{path}: the whitening shared by every shard is unreadable "
                                         f"({err}); run `retrieval split` again") from None
            return whitening, {"images": images, "sample_images": 0, "source": "shared"}
        sample = self.policy.whiten_sample_images
        if self.inputs.whiten_on is not None:
            digests = sorted(set(self.inputs.whiten_on()))[:sample]
            source = "whiten_on"
        else:
            digests = self.inputs.manifest.smallest_digests(sample)
            source = "database"
        whitening = PCAWhitening(self.inputs.pca_dim, RULE_BY_SOURCE[source]).fit_chunks(
            self._raw_chunks(digests), self.inputs.patches)
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
            picks = self.policy.segments_to_rewrite([len(a) for a in alive], [int((~a).sum()) for a in alive])
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

    # -- neighbour lists ------------------------------------------------------------------
    def _neighbours(self, state: State) -> None:
        """Bring the neighbour lists up to the published state. They are written after it:
        a reader meanwhile finds the new images without a list (scored unaugmented) and
        the removed ones skipped, as `Neighbours.augment` does."""
        settings = self.inputs.neighbours
        if settings is None:
            return
        try:
            old = Neighbours.load(self.dir)
        except ValueError as err:
            self._say(f"{err}; computing every image's neighbours again")
            old = None
        if old is not None and old.k != settings.k:
            settings = dataclasses.replace(settings, k=old.k)
        view = View(self.dir, state, self.patches, self.inputs.device)
        asked = old is not None and bool(old.meta.get(ASKED))
        if not asked and not neighbour_lists.is_exact(view, settings):
            # Above the exact limit a list costs one candidate search per image (several
            # times the rest of a build), so they are kept only once asked for (`retrieval
            # dba`, `duplicates`); lists left from the collection's smaller days would go stale.
            Neighbours.remove(self.dir)
            return
        found = neighbour_lists.update(view, old, settings, progress=self.progress)
        if asked:
            found.meta[ASKED] = True
        found.save(self.dir)

    # -- FAISS ----------------------------------------------------------------------------
    def _ann(self, state: State, live: np.ndarray, new: np.ndarray, dim: int) -> None:
        state.note = None
        user = self.inputs.index_type
        if is_flat(user) or (user is None and not self.policy.wants_candidates(len(live))):
            state.ann = None
            return
        windows = len(live) * self.patches
        loaded = None
        due = self.retrain or (state.ann is not None and state.ann["auto"]
                               and self.policy.retrain_due(state.ann["windows"], windows))
        if state.ann is not None and not due:
            try:
                loaded = self._load_ann(state.ann)
            except ValueError as err:
                self._say(f"{err}; training the FAISS structures again")
        if loaded is None:
            factory = user or auto_factory(windows, dim)
            ann = VectorIndex(dim, factory, self.inputs.device)
            try:
                short = ann.train(self._training_sample(state, live, dim, training_size(factory)))
            except ValueError as err:
                # Too few windows for the user's factory yet: exact search serves meanwhile.
                state.ann, state.note = None, f"{err}; searching exactly until the collection is large enough"
                return
            if short:
                self._say(f"warning: {short}")
            layout = self._new_layout(state, live, dim)
            self._add_to_ann(ann, layout, state, live, dim)
            state.ann = {"factory": factory, "auto": user is None, "windows": windows, "images": int(len(live)),
                         "warning": short}
        else:
            ann, layout = loaded
            fresh = layout is None and self._new_layout(state, live, dim)
            self._add_to_ann(ann, None if fresh else layout, state, new, dim)
            if fresh:
                layout = fresh
                self._add_to_ann(None, layout, state, live, dim)
            if self.policy.purge_due(ann.ntotal, windows):
                ann.remove_not_in(window_ids(live, self.patches))
            if layout is not None and self.policy.purge_due(layout.ntotal, len(live)):
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
        device = self.inputs.device
        ann = VectorIndex.load(self.dir / info["file"], info["factory"], device)
        if not info.get("layout"):
            return ann, None
        try:
            return ann, VectorIndex.load(self.dir / info["layout"], info["layout_factory"], device)
        except ValueError as err:
            self._say(f"{err}; building the layout index again")
            return ann, None

    def _new_layout(self, state: State, live: np.ndarray, dim: int) -> VectorIndex | None:
        """A trained, empty layout index; None below the policy's minimum size (its 4-bit
        codebooks need that many images)."""
        factory = layout_factory(self.patches, dim)
        if factory is None or not self.policy.wants_layout(len(live)):
            return None
        layout = VectorIndex(self.patches * dim, factory, self.inputs.device)
        sample = self._training_sample(state, live, dim, self.policy.layout_train_images * self.patches)
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
    def _raw(self, digests: list[str]) -> dict[str, np.ndarray]:
        """Stored raw descriptors [P, C] of images by digest; StoreGap naming the image if absent."""
        store = self.inputs.store
        found = store.get_many(digests, self.inputs.extractor_key, list(self.inputs.windows))
        missing = [d for d in digests if d not in found]
        if missing:
            entries = self.inputs.manifest.by_digest(missing[0])
            where = entries[0].path if entries else missing[0]
            raise StoreGap(
                f"the feature store {store.path} lacks the descriptors of {where} "
                f"({len(missing)} image(s) in all), so {self.dir} cannot be rebuilt from it; "
                f"run `retrieval remove {self.dir} {where}` then `retrieval add {self.dir} {where}` "
                "(or point index.json at the store the index was built with)"
            )
        return found

    def _raw_chunks(self, digests: list[str]) -> Iterator[np.ndarray]:
        for start in range(0, len(digests), CHUNK_IMAGES):
            chunk = digests[start:start + CHUNK_IMAGES]
            found = self._raw(chunk)
            yield np.concatenate([found[d] for d in chunk])

    def _whitened(self, ids: np.ndarray, whitening: PCAWhitening) -> Iterator[np.ndarray]:
        digest_of = self.inputs.manifest.digests(ids)
        for start in range(0, len(ids), CHUNK_IMAGES):
            chunk = [digest_of[i] for i in ids[start:start + CHUNK_IMAGES].tolist()]
            found = self._raw(chunk)
            yield whitening.transform(np.concatenate([found[d] for d in chunk]))

    def _say(self, message: str) -> None:
        print(f"retrieval: {message}", file=sys.stderr)


def _chunks(rows: np.ndarray) -> Iterator[np.ndarray]:
    """Row numbers in pieces small enough to hold in memory."""
    for start in range(0, len(rows), CHUNK_IMAGES):
        yield rows[start:start + CHUNK_IMAGES]


def _highest_file_number(directory: Path) -> int:
    numbers = [0]
    for path in directory.iterdir():
        stem = path.name.split(".")[0]
        if "-" in stem and stem.rsplit("-", 1)[1].isdigit():
            numbers.append(int(stem.rsplit("-", 1)[1]))
    return max(numbers)
