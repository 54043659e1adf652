"""`Index`: a directory holding an image collection ready for sub-patch search.

Layout of INDEX_DIR:
- `index.json`       extractor and search configuration, index type, store path
- `manifest.sqlite`  the images (path, content digest, size): the source of truth
- `whitening.npz`    the PCA-whitening, learned once (on the database or `whiten_on`)
- `vectors-G.npy`, `faiss-G.index`, `state.json`  derived from the manifest at generation G

Raw descriptors live in the feature store (shared, keyed by content). Every image is
committed to the store and then to the manifest in its own transaction, and derived
files are written under a new name and published by an atomic rename of `state.json`.
So a process killed at any moment leaves an index whose manifest is consistent; stale
derived files are rebuilt from the store, without re-extraction, on the next use.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from . import kernel
from .ann import EXACT, VectorIndex, faiss_device
from .config import ExtractorConfig, RuntimeConfig, SearchConfig, file_digest
from .extractor import Extractor, Skipped
from .features import Crop, ImageFeatures, describe
from .manifest import Entry, Manifest
from .patches import level_names, level_regions, pixel_boxes
from .search import EXACT_LIMIT, rank
from .store import FeatureStore, default_store_path
from .whitening import PCAWhitening

FORMAT_VERSION = 1


class IndexUsageError(RuntimeError):
    """Not an index, or an index that cannot be used as asked (usage error, exit 2)."""


@dataclass
class Report:
    """Outcome of build/add/remove, as in the CLI's JSON."""

    index: str
    added: int = 0
    already_present: int = 0
    removed: int = 0
    skipped: list[dict] = field(default_factory=list)
    images: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "added": self.added,
            "already_present": self.already_present,
            "removed": self.removed,
            "skipped": self.skipped,
            "images": self.images,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class Hit:
    """One ranked image: its manifest `id`, path, distance and the deciding pair of windows."""

    rank: int
    path: str
    distance: float
    query_box: list[float]
    db_box: list[float]
    id: int = -1

    def to_dict(self) -> dict:
        return {
            "rank": self.rank,
            "path": self.path,
            "distance": self.distance,
            "query_box": self.query_box,
            "db_box": self.db_box,
        }


@dataclass
class QueryResult:
    query: str
    hits: list[Hit]

    def to_dict(self) -> dict:
        return {"query": self.query, "hits": [h.to_dict() for h in self.hits]}


class Index:
    """An on-disk searchable collection. Create with `Index.create`, reopen with `Index.open`.

    >>> idx = Index.create("my-index", ExtractorConfig(backbone="resnet18", weights="none"))
    >>> idx.add(["photos/"])            # doctest: +SKIP
    >>> idx.search(["query.jpg"], k=5)  # doctest: +SKIP
    """

    def __init__(self, path: str | Path, meta: dict, runtime: RuntimeConfig | None = None) -> None:
        self.path = Path(path)
        self.meta = meta
        self.extractor_config = ExtractorConfig.from_dict(meta["extractor"])
        self.search_config = SearchConfig.from_dict(meta["search"])
        self.index_type: str | None = meta.get("index_type")
        self.runtime = runtime or RuntimeConfig()
        self.manifest = Manifest(self.path / "manifest.sqlite")
        self._extractor: Extractor | None = None
        self._store: FeatureStore | None = None
        self._derived: tuple[list[Entry], np.ndarray, VectorIndex | None] | None = None
        self._derived_generation = -1
        self._whitening: PCAWhitening | None = None

    # -- creation ---------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | Path,
        extractor: ExtractorConfig,
        search: SearchConfig | None = None,
        *,
        index_type: str | None = None,
        store: str | Path | None = None,
        whiten_on: Sequence[str] | None = None,
        runtime: RuntimeConfig | None = None,
    ) -> "Index":
        """Create an index directory, or reopen it if it exists with the same configuration.

        Reopening is what lets an interrupted `build` resume; a different configuration
        on an existing index is refused rather than mixed.
        """
        path = Path(path)
        search = search or SearchConfig()
        meta = {
            "format": FORMAT_VERSION,
            "extractor": extractor.to_dict(),
            "search": search.to_dict(),
            "index_type": index_type,
            "store": str(Path(store).resolve() if store else default_store_path()),
            "whiten_on": list(whiten_on) if whiten_on else None,
        }
        if (path / "index.json").exists():
            existing = cls.open(path, runtime=runtime)
            theirs = {k: existing.meta.get(k) for k in ("extractor", "search", "index_type", "whiten_on")}
            ours = {k: meta[k] for k in theirs}
            if theirs != ours:
                raise IndexUsageError(
                    f"{path} already holds an index with another configuration; "
                    "use `retrieval add` to extend it, or build into a new directory"
                )
            return existing
        if path.exists() and any(path.iterdir()):
            raise IndexUsageError(f"{path} exists and is not an index; choose an empty or new directory")
        index = cls(path, meta, runtime)
        # Load the network before writing anything, so that a bad layer, tensor or weights
        # name leaves no index behind that would then refuse the corrected command.
        index.extractor.load()
        path.mkdir(parents=True, exist_ok=True)
        _atomic_write(path / "index.json", json.dumps(meta, indent=2, sort_keys=True))
        return index

    @classmethod
    def open(cls, path: str | Path, *, runtime: RuntimeConfig | None = None) -> "Index":
        path = Path(path)
        meta_file = path / "index.json"
        if not meta_file.is_file():
            raise IndexUsageError(f"{path} is not an index (no index.json); create one with `retrieval build`")
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise IndexUsageError(f"{path}: index format {meta.get('format')} is not supported")
        return cls(path, meta, runtime)

    def close(self) -> None:
        self.manifest.close()
        if self._store is not None:
            self._store.close()

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- parts --------------------------------------------------------------------------
    @property
    def store(self) -> FeatureStore:
        if self._store is None:
            self._store = FeatureStore.open(self.meta["store"])
        return self._store

    @property
    def extractor(self) -> Extractor:
        if self._extractor is None:
            self._extractor = Extractor(self.extractor_config, self.runtime)
        return self._extractor

    @property
    def patches_per_image(self) -> int:
        return sum(level * level for level in self.search_config.levels)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """One writer at a time per index (an advisory lock the kernel drops if we die)."""
        with open(self.path / ".lock", "w") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise IndexUsageError(f"{self.path} is being written by another process")
            yield

    # -- writing ------------------------------------------------------------------------
    def add(self, paths: Iterable[str], *, progress: bool = True) -> Report:
        """Add images (paths) not yet in the index; extraction is skipped for stored ones."""
        start = time.perf_counter()
        report = Report(str(self.path))
        with self._writing():
            todo: list[str] = []
            known: dict[str, str] = {}
            for path in paths:
                path = str(Path(path).resolve())
                try:
                    digest = file_digest(path)
                except OSError:
                    todo.append(path)  # describe() reports why
                    continue
                entry = self.manifest.by_path(path)
                if entry is not None and entry.digest == digest:
                    report.already_present += 1
                    continue
                moved = next((e for e in self.manifest.by_digest(digest) if not os.path.exists(e.path)), None)
                if moved is not None:
                    self.manifest.move(moved.id, path)
                    report.already_present += 1
                    continue
                todo.append(path)
                known[path] = digest
            regions = level_names(self.search_config.levels)
            for out in describe(
                todo, self.extractor, self.store, regions, progress=progress, desc="index", digests=known
            ):
                if isinstance(out, Skipped):
                    report.skipped.append({"path": out.path, "reason": out.reason})
                    continue
                self.manifest.add(out.path, out.digest, out.width, out.height)
                report.added += 1
            self._refresh(progress=progress)
        report.images = self.manifest.count()
        report.seconds = time.perf_counter() - start
        return report

    def remove(self, paths: Iterable[str]) -> Report:
        start = time.perf_counter()
        report = Report(str(self.path))
        with self._writing():
            report.removed = self.manifest.remove([str(Path(p).resolve()) for p in paths])
            self._refresh(progress=False)
        report.images = self.manifest.count()
        report.seconds = time.perf_counter() - start
        return report

    def _raw(self, entries, progress: bool) -> np.ndarray:
        """Raw descriptors of manifest entries from the store, stacked [n * P, C]."""
        names = level_names(self.search_config.levels)
        key = self.extractor.key
        out = []
        for entry in entries:
            got = self.store.get(entry.digest, key, names)
            if len(got) != len(names):
                raise RuntimeError(
                    f"the feature store {self.store.path} lacks descriptors of {entry.path}; "
                    "re-add it (`retrieval remove` then `retrieval add`)"
                )
            out.extend(got[n] for n in names)
        return np.concatenate(out) if out else np.empty((0, 0), np.float32)

    def _fit_whitening(self, progress: bool) -> PCAWhitening:
        sources = self.meta.get("whiten_on")
        if sources:
            from .images import expand_inputs

            feats = [
                f
                for f in describe(
                    expand_inputs(sources), self.extractor, self.store,
                    level_names(self.search_config.levels), progress=progress, desc="whiten-on",
                )
                if isinstance(f, ImageFeatures)
            ]
            if not feats:
                raise IndexUsageError(f"--whiten-on {sources}: no readable images")
            raw = np.concatenate([f.descriptors[n] for f in feats for n in level_names(self.search_config.levels)])
        else:
            raw = self._raw(self.manifest.entries(), progress)
        return PCAWhitening(self.search_config.pca_dim).fit(raw)

    @property
    def whitening(self) -> PCAWhitening | None:
        if self._whitening is None and (self.path / "whitening.npz").exists():
            self._whitening = PCAWhitening.load(self.path / "whitening.npz")
        return self._whitening

    def _state(self) -> dict:
        try:
            return json.loads((self.path / "state.json").read_text())
        except FileNotFoundError:
            return {"generation": -1}

    def _refresh(self, progress: bool) -> None:
        """Bring the derived files up to the manifest's generation (caller holds the lock)."""
        generation = self.manifest.generation
        state = self._state()
        if state["generation"] == generation:
            return
        entries = self.manifest.entries()
        if not entries:
            self._publish(generation, np.empty(0, np.int64), None, None)
            return
        whitening = self.whitening
        if whitening is None:
            whitening = self._fit_whitening(progress)
            whitening.save(self.path / "whitening.npz")
            self._whitening = whitening
            state = {"generation": -1}
        d, P = whitening.output_dim, self.patches_per_image
        # What the published generation already holds: reuse the vectors of images still
        # in the manifest, whiten only the new ones.
        old_ids = kept_ids = np.empty(0, np.int64)
        kept = np.empty((0, d), np.float32)
        if state["generation"] >= 0:
            old_ids = np.load(self.path / f"ids-{state['generation']}.npy")
            if len(old_ids):
                old = np.load(self.path / f"vectors-{state['generation']}.npy", mmap_mode="r")
                keep = np.isin(old_ids, [e.id for e in entries])
                kept_ids, kept = old_ids[keep], old.reshape(len(old_ids), P, d)[keep].reshape(-1, d)
        known = set(kept_ids.tolist())
        new_entries = [e for e in entries if e.id not in known]
        new = whitening.transform(self._raw(new_entries, progress)) if new_entries else kept[:0]
        vectors = np.ascontiguousarray(np.concatenate([kept, new]), dtype=np.float32)
        order = np.concatenate([kept_ids, np.array([e.id for e in new_entries], dtype=np.int64)])
        if len(old_ids) and len(kept_ids) == len(old_ids):
            # Nothing removed: extend the published FAISS index instead of rebuilding it.
            ann = VectorIndex.load(self.path / f"faiss-{state['generation']}.index", self.index_type, self.runtime.device)
            if len(new):
                ann.add(new)
        else:
            ann = VectorIndex(d, self.index_type, self.runtime.device)
            ann.add(vectors)
        self._publish(generation, order, vectors, ann)

    def _publish(self, generation: int, ids: np.ndarray, vectors, ann) -> None:
        """Write generation-stamped derived files, then switch state.json to them atomically."""
        g = generation
        _atomic_save_npy(self.path / f"ids-{g}.npy", ids)
        if vectors is not None:
            _atomic_save_npy(self.path / f"vectors-{g}.npy", vectors)
            ann.save(self.path / f"faiss-{g}.index")
        _atomic_write(self.path / "state.json", json.dumps({"generation": g}))
        self._derived = None
        for stale in self.path.iterdir():
            name = stale.name
            if name.endswith(".tmp") or (
                name.split("-")[0] in ("ids", "vectors", "faiss") and not name.startswith(
                    (f"ids-{g}.", f"vectors-{g}.", f"faiss-{g}.")
                )
            ):
                stale.unlink(missing_ok=True)

    def _load_derived(self) -> tuple[list[Entry], np.ndarray, VectorIndex | None]:
        """Database images (in vector order), their window vectors and the FAISS index."""
        generation = self.manifest.generation
        # Another process may have added or removed images since this view was loaded.
        if self._derived is None or self._derived_generation != generation:
            if self._state()["generation"] != generation:
                with self._writing():
                    self._refresh(progress=False)
            g = self._state()["generation"]
            self._derived_generation = g
            ids = np.load(self.path / f"ids-{g}.npy")
            entries = {e.id: e for e in self.manifest.entries()}
            db = [entries[i] for i in ids.tolist()]
            if len(ids) == 0:
                self._derived = (db, np.empty((0, 1), np.float32), None)
            else:
                # Memory-mapped: a large index is paged in as candidates are re-ranked.
                vectors = np.load(self.path / f"vectors-{g}.npy", mmap_mode="r")
                ann = VectorIndex.load(self.path / f"faiss-{g}.index", self.index_type, self.runtime.device)
                self._derived = (db, vectors, ann)
        return self._derived

    # -- reading ------------------------------------------------------------------------
    def search(
        self,
        queries: Sequence[str | tuple[str, Crop | None]],
        k: int | None = 10,
        *,
        query_levels: Sequence[int] | None = None,
        aggregate: str | None = None,
        progress: bool = False,
        skipped: list | None = None,
        exact_limit: int = EXACT_LIMIT,
        nprobe: int | None = None,
        per_patch: int | None = None,
    ) -> list[QueryResult]:
        """Rank the index for each query image (a path, or (path, crop box in pixels)).

        k=None returns every image. Up to `exact_limit` images every image is scored
        exactly; above it FAISS proposes the images owning the `per_patch` nearest windows
        of each query window (default max(4k, 64)), searching `nprobe` IVF lists, and the
        kernel scores those exactly. Unreadable queries are left out of the result and
        appended to `skipped` as {"path", "reason"} when a list is given.
        """
        db, vectors, ann = self._load_derived()
        if not db:  # nothing to rank against (and no whitening learned yet)
            return [QueryResult(q if isinstance(q, str) else q[0], []) for q in queries]
        if nprobe is not None and ann is not None:
            ann.nprobe = nprobe
        levels = tuple(query_levels or self.search_config.effective_query_levels)
        aggregate = aggregate or self.search_config.aggregate
        whitening = self.whitening
        db_layout = np.concatenate([level_regions(lv).boxes for lv in self.search_config.levels])
        q_layout = np.concatenate([level_regions(lv).boxes for lv in levels])
        sizes = np.array([[e.width, e.height, e.width, e.height] for e in db], dtype=np.float64).reshape(-1, 4)
        feats = describe(queries, self.extractor, self.store, level_names(levels), progress=progress, desc="query")
        order = {(q, None) if isinstance(q, str) else (q[0], q[1]): i for i, q in enumerate(queries)}
        collected: dict[int, QueryResult] = {}
        for f in feats:
            if isinstance(f, Skipped):
                if skipped is not None:
                    skipped.append({"path": f.path, "reason": f.reason})
                continue
            q = whitening.transform(np.concatenate([f.descriptors[n] for n in level_names(levels)]))
            r = rank(q, vectors, self.patches_per_image, ann, k, aggregate, exact_limit, per_patch)
            qboxes = pixel_boxes(q_layout[r.query_patch], f.width, f.height)
            if f.crop is not None:
                qboxes += np.array([f.crop[0], f.crop[1], f.crop[0], f.crop[1]])
            dboxes = db_layout[r.db_patch] * sizes[r.images]
            hits = [
                Hit(pos + 1, db[img].path, dist, qb, dbb, db[img].id)
                for pos, (img, dist, qb, dbb) in enumerate(zip(
                    r.images.tolist(), r.distances.tolist(),
                    np.round(qboxes, 1).tolist(), np.round(dboxes, 1).tolist(),
                ))
            ]
            collected[order[(f.path, f.crop)]] = QueryResult(f.path, hits)
        return [collected[i] for i in sorted(collected)]

    def entry(self, image_id: int) -> Entry | None:
        """The indexed image with manifest id `image_id` (path, digest, size), or None."""
        return self.manifest.get(image_id)

    def info(self) -> dict:
        """Counts and configuration, as `retrieval info --json` prints them."""
        images = self.manifest.count()
        state = self._state()
        whitening = self.whitening
        return {
            "images": images,
            "patches": images * self.patches_per_image,
            "dim": whitening.output_dim if whitening is not None else 0,
            "extractor": self.extractor_config.to_dict(),
            "search": self.search_config.to_dict(),
            "index_type": self.index_type or EXACT,
            "faiss_device": faiss_device(self.runtime.device),
            "native_kernel": kernel.describe(),
            "store": self.meta["store"],
            "up_to_date": state["generation"] == self.manifest.generation,
            "path": str(self.path),
        }


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as fh:
        np.save(fh, array)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
