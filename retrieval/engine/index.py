"""`Index`: a directory holding an image collection ready for sub-patch search.

Layout of INDEX_DIR:
- `index.json`       extractor and search configuration, index type, store path
- `manifest.sqlite`  the images (path, content digest, size): the source of truth
- `state.json`       the published generation: it names the files below
- `whitening-N.npz`  the shrunk PCA-whitening (`retrieval/engine/whitening.py`)
- `seg-N.npy`, `seg-N.ids.npy`  segments of float16 window vectors (`retrieval/engine/segments.py`)
- `dead-N.npy`       removed images still inside segments (tombstones)
- `ann-N.faiss`      the FAISS structure proposing candidates on large collections

Raw descriptors live in the feature store (shared, keyed by content). Every image is
committed to the store and then to the manifest in its own transaction; the derived
files are brought up to the manifest by the one writer (`retrieval/engine/writer.py`) and
published by an atomic rename of `state.json`. So a process killed at any moment leaves
an index whose manifest is consistent, readers answer from the last published
generation while a writer works (`retrieval/engine/snapshot.py`), and a missing or damaged
derived file is rebuilt from the store without re-extraction.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from ..config import (NEIGHBOURS_K, ConfigError, ExtractorConfig, RuntimeConfig, SearchConfig, SearchOptions,
                      file_digest, reranks_by_default)
from ..extraction.extractor import Extractor, Skipped
from ..extraction.factory import make_extractor
from ..extraction.features import Crop, ImageFeatures, describe
from ..extraction.images import expand_inputs
from ..extraction.patches import level_names, level_regions
from ..extraction.store import FeatureStore, StoreError, default_store_path
from ..fileio import storage_message, writable
from . import writer
from .ann import FactoryError, index_type_argument
from .manifest import Entry, Manifest
from .meta import MetaError, differing, new_meta, read_meta, write_meta
from . import duplicates as grouping
from . import neighbour_lists
from .duplicates import Duplicates
from .neighbour_lists import NeighbourSettings
from .neighbours import ASKED, Neighbours, lists_for_reranking, shared_lists
from .pause import pause_hook
from .policy import WritePolicy
from .query import K_NOT_GIVEN, QueryResult, answer_queries, search_options
from .search import rank_queries
from .segments import DamagedFile
from .snapshot import State, View, read_state
from .status import index_info
from .whitening import PCAWhitening

# During a long add the derived files are published after every CHECKPOINT_IMAGES new
# images, or a quarter of the collection once that is more, so readers see progress and
# a crash costs at most that much re-whitening (never re-extraction: the store keeps it),
# while a publish that rewrites the FAISS file (1 GB at a million images) happens only
# O(log N) times in a build.
CHECKPOINT_IMAGES = 20_000
CHECKPOINT_FRACTION = 4


class _Unrefreshed(NamedTuple):
    """Why the derived files could not be brought up to the manifest: `busy` when a writer
    runs (it publishes soon), else the directory cannot be written (read-only, full)."""

    why: str
    busy: bool = False


class IndexUsageError(RuntimeError):
    """Not an index, or an index that cannot be used as asked (usage error, exit 2)."""


class IndexBusy(RuntimeError):
    """Another process holds the index's write lock: nothing was done; retry (exit 4)."""


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


class Index:
    """An on-disk searchable collection. Create with `Index.create`, reopen with `Index.open`.

    >>> idx = Index.create("my-index", ExtractorConfig(backbone="resnet18", weights="none"))
    >>> idx.add(["photos/"])            # doctest: +SKIP
    >>> idx.search(["query.jpg"], k=5)  # doctest: +SKIP
    """

    def __init__(self, path: str | Path, meta: dict, runtime: RuntimeConfig | None = None,
                 policy: WritePolicy | None = None) -> None:
        self.path = Path(path)
        self.meta = meta
        self.policy = policy or WritePolicy()
        self.extractor_config = ExtractorConfig.from_dict(meta["extractor"])
        self.search_config = SearchConfig.from_dict(meta["search"])
        self.index_type: str | None = meta.get("index_type")
        self.runtime = runtime or RuntimeConfig()
        self.manifest = Manifest(self.path / "manifest.sqlite")
        self._extractor: Extractor | None = None
        self._store: FeatureStore | None = None
        self._view: View | None = None
        # Guards the parts opened on first use, which threads sharing the index may ask
        # for at once (two networks or stores loaded would cost memory, not answers).
        self._parts_lock = threading.Lock()

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
        policy: WritePolicy | None = None,
    ) -> "Index":
        """Create an index directory, or reopen it if it exists with the same configuration.

        Reopening is what lets an interrupted `build` resume; a different configuration
        on an existing index is refused rather than mixed. Everything is checked before
        anything is written, so a refused call leaves nothing behind. `policy` sets when
        the writer merges, re-fits and re-trains (default: `WritePolicy()`).
        """
        path = Path(path)
        search = search or SearchConfig()
        try:
            index_type = index_type_argument(index_type)
        except FactoryError as err:
            raise IndexUsageError(str(err)) from None
        meta = new_meta(extractor, search, index_type, Path(store).resolve() if store else default_store_path(),
                        whiten_on)
        if (path / "index.json").exists():
            existing = cls.open(path, runtime=runtime, policy=policy)
            differ = differing(existing.meta, meta)
            if differ:
                raise IndexUsageError(
                    f"{path} already holds an index with another configuration ({', '.join(differ)} differ); "
                    "use `retrieval add` to extend it, or build into a new directory"
                )
            return existing
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise IndexUsageError(f"{path} exists and is not an index; choose an empty or new directory")
        index = cls(path, meta, runtime, policy)
        # Load the network and open the store before writing anything, so that a bad
        # layer, tensor, weights name or store path leaves no index behind.
        index.extractor.load()
        try:
            index._store = FeatureStore.open(meta["store"])
        except StoreError as err:
            raise IndexUsageError(str(err)) from None
        path.mkdir(parents=True, exist_ok=True)
        write_meta(path, meta)
        return index

    @classmethod
    def open(cls, path: str | Path, *, runtime: RuntimeConfig | None = None,
             policy: WritePolicy | None = None) -> "Index":
        """Open an existing index directory (IndexUsageError if it is not one)."""
        path = Path(path)
        try:
            meta = read_meta(path)
            return cls(path, meta, runtime, policy)
        except MetaError as err:
            raise IndexUsageError(str(err)) from None
        except (ValueError, KeyError, TypeError) as err:
            raise IndexUsageError(
                f"{path} is not a valid index: index.json is damaged ({type(err).__name__}: {err}); "
                "restore it, or build the index again into a new directory"
            ) from None

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
        with self._parts_lock:
            return self._open_store()

    def _open_store(self) -> FeatureStore:
        if self._store is None:
            path = Path(self.meta["store"])
            # Never create a store an existing index does not have: index.json naming a
            # missing file is damage to report, not a place to start writing.
            if not path.is_file() or path.stat().st_size == 0:
                raise IndexUsageError(
                    f"the feature store {path} named in {self.path / 'index.json'} "
                    f"{'is empty' if path.is_file() else 'does not exist'}; "
                    "restore it, or fix the \"store\" entry of index.json"
                )
            try:
                self._store = FeatureStore.open(path)
            except StoreError as err:
                raise IndexUsageError(str(err)) from None
        return self._store

    @property
    def extractor(self) -> Extractor:
        with self._parts_lock:
            if self._extractor is None:
                self._extractor = make_extractor(self.extractor_config, self.runtime)
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
                raise IndexBusy(
                    f"{self.path} is being written by another process (an add, remove or build); "
                    "queries still work; run this again when it has finished"
                ) from None
            yield

    # -- writing ------------------------------------------------------------------------
    def add(self, paths: Iterable[str], *, progress: bool = True) -> Report:
        """Add images (paths) not yet in the index; extraction is skipped for stored ones."""
        self._refuse_shard("add to")
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
            published, pending = self.manifest.count(), 0
            paused = pause_hook("committed")  # a test's kill point (retrieval/engine/pause.py); None in use
            for out in describe(
                todo, self.extractor, self.store, regions, progress=progress, desc="index", digests=known
            ):
                if isinstance(out, Skipped):
                    report.skipped.append({"path": out.path, "reason": out.reason})
                    continue
                self.manifest.add(out.path, out.digest, out.width, out.height)
                if paused is not None:
                    paused()
                report.added += 1
                pending += 1
                if pending >= max(CHECKPOINT_IMAGES, published // CHECKPOINT_FRACTION):
                    self._publish(progress)
                    published, pending = published + pending, 0
            self._publish(progress)
        report.images = self.manifest.count()
        report.seconds = time.perf_counter() - start
        return report

    def remove(self, paths: Iterable[str]) -> Report:
        """Remove images by path; a folder removes the indexed images under it, `@list.txt`
        the paths it lists. Paths not in the index are reported in `skipped`."""
        self._refuse_shard("remove from")
        start = time.perf_counter()
        report = Report(str(self.path))
        with self._writing():
            wanted: list[str] = []
            for item in paths:
                if item.startswith("@"):
                    try:
                        wanted.extend(expand_inputs([item]))
                    except FileNotFoundError as err:
                        raise IndexUsageError(str(err)) from None
                    continue
                path = str(Path(item).resolve())
                inside = self.manifest.under(path) if os.path.isdir(path) else []
                if os.path.isdir(path) and not inside:
                    report.skipped.append({"path": path, "reason": "no indexed image in this folder"})
                wanted.extend(inside or ([] if os.path.isdir(path) else [path]))
            removed = set(self.manifest.remove(wanted))
            report.removed = len(removed)
            report.skipped += [{"path": p, "reason": "not in the index"} for p in dict.fromkeys(wanted) if p not in removed]
            self._publish(progress=False)
        report.images = self.manifest.count()
        report.seconds = time.perf_counter() - start
        return report

    def _refuse_shard(self, what: str) -> None:
        # Shards keep the source's image ids and share its whitening: changing one alone
        # would break both (retrieval/engine/sharded.py).
        if self.meta.get("shard"):
            raise IndexUsageError(
                f"{self.path} is a shard of a split index: {what} the source index "
                "and run `retrieval split` again"
            )

    def set_index_type(self, factory: str | None) -> None:
        """Change the structure that proposes candidates (a FAISS factory string, 'exact'
        or 'Flat' for exact search at any size, None or 'auto' for the automatic choice:
        whatever `info` reports as `index_type` is accepted), rebuilt from the stored
        window vectors: nothing is extracted again."""
        try:
            factory = index_type_argument(factory)
        except FactoryError as err:
            raise IndexUsageError(str(err)) from None
        with self._writing():
            self.meta["index_type"] = self.index_type = factory
            write_meta(self.path, self.meta)
            writer.refresh(self._writer_inputs(), progress=False, retrain=True)
        self._view = None

    def _publish(self, progress: bool) -> None:
        try:
            writer.refresh(self._writer_inputs(progress), progress=progress)
        except writer.StoreGap as err:
            raise IndexUsageError(str(err)) from None
        self._view = None

    def _writer_inputs(self, progress: bool = False) -> writer.WriterInputs:
        shared = self.meta.get("shared_whitening")
        sources = self.meta.get("whiten_on")
        return writer.WriterInputs(
            directory=self.path,
            manifest=self.manifest,
            store=self.store,
            extractor_key=self.extractor.key,
            windows=tuple(level_names(self.search_config.levels)),
            patches=self.patches_per_image,
            pca_dim=self.search_config.pca_dim,
            index_type=self.index_type,
            device=self.runtime.device,
            policy=self.policy,
            shared_whitening=self.path / shared if shared else None,
            whiten_on=(lambda: self._store_whiten_on(sources, progress)) if sources else None,
            neighbours=self._neighbour_settings(NEIGHBOURS_K),
        )

    def _neighbour_settings(self, k: int) -> NeighbourSettings:
        levels = self.search_config.effective_query_levels
        # Candidates as soon as the writer builds FAISS: at a million images all pairs are out of reach.
        return NeighbourSettings(k, tuple(levels), self.search_config.aggregate, self._rows_at(levels),
                                 exact_limit=self.policy.ann_min_images)

    def _store_whiten_on(self, sources: Sequence[str], progress: bool) -> list[str]:
        """Describe the `--whiten-on` images into the store (what is stored is not
        extracted again); their digests."""
        names = level_names(self.search_config.levels)
        try:
            paths = expand_inputs(sources)
        except FileNotFoundError as err:
            raise IndexUsageError(f"--whiten-on: {err}") from None
        digests = [
            f.digest for f in describe(paths, self.extractor, self.store, names, progress=progress, desc="whiten-on")
            if isinstance(f, ImageFeatures)
        ]
        if not digests:
            raise IndexUsageError(f"--whiten-on {' '.join(sources)}: no readable images")
        return digests

    # -- reading ------------------------------------------------------------------------
    def view(self) -> View:
        """The last published generation (loaded once per generation).

        Never waits for a writer. When nothing usable is published (a killed writer, a
        damaged derived file) and no writer is running, it rebuilds the derived files
        from the store first.
        """
        for _ in range(3):
            try:
                state = read_state(self.path)
            except DamagedFile as err:
                why = self._try_refresh()
                if why is None:
                    continue
                raise self._damaged(err, why) from None
            why = None
            if state is None or state.generation != self.manifest.generation:
                why = self._try_refresh()
                if why is None:
                    continue  # published what a killed writer left unpublished
            if state is None:
                if self.manifest.count() == 0:
                    return View(self.path, State(), self.patches_per_image, self.runtime.device)
                if why is not None and not why.busy:
                    raise IndexUsageError(f"{self.path} has nothing published yet: {why.why}")
                raise IndexUsageError(
                    f"{self.path} has nothing published yet: its first build is still running "
                    "(or was killed: re-run the same `retrieval build` to finish it)"
                )
            if self._view is not None and (self._view.state.generation, self._view.state.next) == (state.generation, state.next):
                return self._view
            try:
                self._view = View(self.path, state, self.patches_per_image, self.runtime.device)
                return self._view
            except DamagedFile as err:
                # A writer may have published and cleaned up between our two reads: look
                # again; if the same state still names a bad file, rebuild it.
                if _read_state_or_none(self.path) != state:
                    continue
                why = self._try_refresh()
                if why is None:
                    continue
                raise self._damaged(err, why) from None
        raise IndexUsageError(f"{self.path}: no consistent published state after 3 tries; is something deleting its files?")

    def _damaged(self, err: DamagedFile, why: _Unrefreshed) -> IndexUsageError:
        return IndexUsageError(f"{err}; {why.why}")

    def _try_refresh(self) -> _Unrefreshed | None:
        """Bring the derived files up to the manifest (rebuilding any missing or damaged one);
        None when done, else why not: a writer is running, or the directory is read-only
        or full. Readers then answer from what is published; nothing is written."""
        if not writable(self.path):
            return _Unrefreshed(f"{self.path} is on a read-only file system, so derived files cannot be rebuilt "
                                f"here: run `retrieval add {self.path} ...` where it can be written (the feature "
                                "store keeps the descriptors: nothing is extracted again)")
        try:
            with self._writing():
                self._publish(progress=False)
            return None
        except IndexBusy:
            return _Unrefreshed("it is rebuilt from the feature store as soon as the running writer finishes "
                                f"(or by the next `retrieval add {self.path} ...`)", busy=True)
        except OSError as err:
            message = storage_message(err)
            if message is None:
                raise
            return _Unrefreshed(f"derived files cannot be rebuilt ({message})")

    def warm(self, wait: bool = False) -> int:
        """Prepare for a stream of queries, as a server does once at start: load the
        published view and its FAISS structure, and have the OS read the window vectors
        into its page cache in the background (when they fit in 80 % of the available
        memory; `wait` blocks until it is done). Returns the bytes read ahead."""
        return self.view().warm(wait)

    @property
    def whitening(self) -> PCAWhitening | None:
        """The whitening of the published generation (None before anything is indexed)."""
        return self.view().whitening

    def search(
        self,
        queries: Sequence[str | tuple[str, Crop | None]],
        k: int | None = K_NOT_GIVEN,
        *,
        options: SearchOptions | None = None,
        progress: bool = False,
        skipped: list | None = None,
        **keywords,
    ) -> list[QueryResult]:
        """Rank the index for each query image (a path, or (path, crop box in pixels)):
        one QueryResult per query, in the order given.

        How is one `SearchOptions` value: pass it as `options=`, or its fields as
        keywords (`k=10` by default; `query_levels`, `aggregate`, `exact_limit`, `nprobe`,
        `per_patch`, `layout_k`, `shortlist`, `qe`, `qe_alpha`, `dba`, `rerank`, `rerank_margin`,
        `query_rotations`, documented there), not both. A bad value is an IndexUsageError naming it.

        k=None returns every image. Up to `exact_limit` images every image is scored
        exactly; above it FAISS proposes candidates and the kernel scores those exactly.
        Answers come from the last published generation, also while another process adds
        or removes images. An unreadable query gets a result with no hits and its reason
        in `QueryResult.error`; it is also appended to `skipped` as {"path", "reason"}
        when a list is given.

        Re-ranking (`benchmarks/results/reranking.md`): `rerank` None, the default, re-ranks
        a PCA-whitened index of at most RERANK_AUTO_LIMIT (2,000) images whose neighbour
        lists are stored (the writer keeps them at that size) and gives the plain ranking
        otherwise; `rerank=False` always gives the plain ranking, `rerank=True` always
        re-ranks: expansion by the hits within `rerank_margin`, augmentation by RERANK_DBA
        neighbours (`SearchOptions`). `qe` > 0 also scores the windows of the `qe` best
        images as queries and averages the distances (alpha-QE weights, exponent
        `qe_alpha`); `dba` > 0 averages each image's distance
        with its `dba` nearest neighbours' (computed by `build_neighbours`). A re-ranked
        search orders the hits by that average (`Hit.rerank_distance`); a hit's `distance`
        stays its plain distance. `query_rotations` (degrees counter-clockwise, from
        0, 90, 180, 270) describes the query at each rotation and keeps an image's smallest
        distance; each hit then says which rotation decided (`Hit.rotation`), its
        `query_box` in the unrotated query's pixels. `query_rotations="auto"` picks one
        turn per query from its level-1 window at the four turns and searches at that
        turn only (the hits of that one rotation asked explicitly).
        """
        options = self.search_options(k, options, keywords)
        view = self.view()
        whitening = view.whitening if view.images else None
        if options.rerank is None:
            whitened = whitening is not None and whitening.fitted_
            lists = reranks_by_default(view.images, whitened) and self._has_lists(view)
            options = options.with_default_rerank(view.images, lists, whitened)
        wants = whitening is not None and options.reranks
        neighbours, note = self._rerank_neighbours(options, view) if wants else (None, None)
        expand_rows = self._rows_at(options.query_levels)

        def rank_here(described: list[list[np.ndarray]], options: SearchOptions) -> list:
            rankings = self._rank(view, described, options, expand_rows=expand_rows, neighbours=neighbours)
            entries = self.manifest.get_many(np.unique(np.concatenate([r.ids for r in rankings])).tolist())
            return [(r, {i: entries[i] for i in r.ids.tolist() if i in entries}) for r in rankings]

        results = answer_queries(self, whitening, queries, options, rank_here, progress=progress, skipped=skipped)
        for result in results:
            if result.error is None:
                result.note = note
        return results

    def search_options(self, k=K_NOT_GIVEN, options: SearchOptions | None = None, keywords: dict | None = None) -> SearchOptions:
        """The options of a `search` call (see there), with this index's query levels and
        aggregate where they are not given; IndexUsageError naming a bad value."""
        try:
            return search_options(k, options, keywords or {}).for_index(self.search_config)
        except ConfigError as err:
            raise IndexUsageError(str(err)) from None

    def _rank(self, view: View, described: list[list[np.ndarray]], options: SearchOptions, **kwargs):
        """search.rank_queries; the FAISS files load on first use, so one found missing
        there was deleted by a writer that published since (the queries are asked again
        of the newer state), or is damaged and rebuilt from the segments (when no writer
        runs) before the queries are asked again."""
        try:
            return rank_queries(described, view, options, **kwargs)
        except DamagedFile as err:
            if _read_state_or_none(self.path) == view.state:
                why = self._try_refresh()
                if why is not None:
                    raise self._damaged(err, why) from None
        return rank_queries(described, self.view(), options, **kwargs)

    def _rows_at(self, levels: Sequence[int]) -> np.ndarray | None:
        """Rows of a database image's windows that lie at `levels` (None: all of them, when
        none does). An indexed image used as a query (expansion, neighbours) is described
        at the query levels, as a query image is."""
        db_level = np.concatenate([[lv] * len(level_regions(lv)) for lv in self.search_config.levels])
        rows = np.flatnonzero(np.isin(db_level, levels))
        return rows if len(rows) else None

    def neighbours(self, k: int) -> Neighbours:
        """The stored nearest neighbours of the indexed images, holding at least k each
        (IndexUsageError, saying to run `retrieval dba`, when there are none or fewer)."""
        try:
            found = shared_lists(self.path)
        except ValueError as err:
            raise IndexUsageError(str(err)) from None
        if found is None or found.k < k:
            have = "none are stored" if found is None else f"{found.k} per image are stored"
            raise IndexUsageError(
                f"re-ranking (--dba {k}, or --rerank) needs the {k} nearest neighbours of every image of "
                f"{self.path}, but {have}; compute them with `retrieval dba {self.path} -k {max(k, NEIGHBOURS_K)}` "
                "(or query with --no-rerank)"
            )
        return found

    def _has_lists(self, view: View) -> bool:
        """Whether neighbour lists of `view`'s index are stored and readable (of this
        generation or an earlier one): what turns re-ranking on by default."""
        return lists_for_reranking(self.path, view.state.generation)[0] is not None

    def _rerank_neighbours(self, options: SearchOptions, view: View) -> tuple[Neighbours | None, str | None]:
        """The neighbour lists a re-ranked search averages with (or, with query expansion
        alone, takes the expanding hits' nearest from), and why they fall short
        (`neighbours.lists_for_reranking`). A fixed `--dba K` needs K per image and fails
        without them (IndexUsageError); `rerank` does without, and says so."""
        if options.dba:
            return self.neighbours(options.dba), None
        found, note, _ = lists_for_reranking(self.path, view.state.generation)
        if not options.rerank:
            return found, None  # query expansion alone: the lists only spare FAISS the hits' nearest
        return found, note

    def build_neighbours(self, k: int, *, progress: bool = False) -> dict:
        """Compute every image's k nearest other images from scratch, with the index's
        query levels and image distance (`add` and `remove` keep them current after
        that, at this k); returns what `info` reports."""
        if k < 1:
            raise IndexUsageError("-k must be >= 1")
        with self._writing():
            self._publish(progress=False)
            found = neighbour_lists.update(self.view(), None, self._neighbour_settings(k), progress=progress)
            found.meta[ASKED] = True  # kept current by every later add and remove, at any size
            found.save(self.path)
        return found.meta

    def current_neighbours(self, k: int, *, progress: bool = False) -> Neighbours:
        """The stored nearest neighbours (k or more per image) of every published image.
        The writer keeps them current on every add and remove; they are computed here
        only when none are stored, or fewer than k per image (an index built before the
        writer kept them, or after `retrieval dba -k` with a smaller k)."""
        try:
            found = Neighbours.load(self.path)
        except ValueError:
            found = None  # damaged: computed again below, as when absent
        if found is not None and found.k >= k and np.array_equal(found.ids, self.view().live_ids()):
            return found
        self.build_neighbours(max(k, found.k if found is not None else k), progress=progress)
        return self.neighbours(k)

    def duplicates(self, max_distance: float | None = None, min_size: int = 2, *,
                   progress: bool = False) -> Duplicates:
        """Groups of indexed images that show the same thing (`retrieval/engine/duplicates.py`
        says how): every image in at most one group, groups of `min_size` or more images,
        largest first, each member with its distance to the group's first image.
        `max_distance` None: set from this index's own distances (the result says which).
        It reads the neighbour lists the writer keeps current (`current_neighbours`): nothing
        is searched again after add/remove."""
        if min_size < 2:
            raise IndexUsageError(f"--min-size must be >= 2 (got {min_size})")
        if max_distance is not None and not max_distance >= 0:
            raise IndexUsageError(f"--max-distance must be >= 0 (got {max_distance})")
        start = time.perf_counter()
        neighbours = self.current_neighbours(grouping.K, progress=progress)
        live = neighbours.ids
        if max_distance is None:
            max_distance = grouping.default_max_distance(neighbours, live)
            rule = grouping.RULE
        else:
            rule = "given"
        found = grouping.leader_groups(*grouping.pair_distances(neighbours, live), max_distance, min_size)
        entries = self.manifest.get_many([i for g in found for i, _ in g])
        groups = [[grouping.Member(i, entries[i].path, d) for i, d in g] for g in found
                  if all(i in entries for i, _ in g)]
        return Duplicates(str(self.path), len(live), groups, max_distance, rule, time.perf_counter() - start)

    def entry(self, image_id: int) -> Entry | None:
        """The indexed image with manifest id `image_id` (path, digest, size), or None."""
        return self.manifest.get(image_id)

    def by_path(self, path: str) -> Entry | None:
        """The indexed image at `path` (compared as a string; the file is not read), or None."""
        return self.manifest.by_path(path)

    def info(self) -> dict:
        """Counts and configuration, as `retrieval info --json` prints them."""
        return index_info(
            self.path, images=self.manifest.count(), generation=self.manifest.generation,
            patches=self.patches_per_image, extractor=self.extractor_config.summary(),
            search=self.search_config.to_dict(), index_type=self.index_type, policy=self.policy,
            device=self.runtime.device, store=self.meta["store"],
        )


def _read_state_or_none(path: Path) -> State | None:
    try:
        return read_state(path)
    except DamagedFile:
        return None
