"""A sharded index: several ordinary indexes sharing one whitening, searched in parallel.

`split_index` (the CLI's `retrieval split INDEX_DIR SHARDED_DIR --shards N`) cuts an
index by image into N shards, each an ordinary index directory holding one contiguous
range of the source's manifest ids (ids are kept, so hits carry the same ids as in the
source). Layout of SHARDED_DIR:

- `shards.json`    the shard directories, their id ranges, the source index
- `whitening.npz`  the one PCA-whitening of every shard (copied from the source)
- `shard-K/`       an index whose `index.json` names `../whitening.npz` as its whitening

Distances from different shards are comparable only under one whitening, so a shard
never fits its own: its writer loads the shared file (also when its copy is damaged),
and `ShardedIndex` refuses shards whose whitening differs. Each shard then ranks its own
images exactly as the unsharded index ranks them, and the merged top k (by distance,
ties by image id, as `search.top_k` breaks them) is the unsharded index's top k when
both search exactly.

Shards are searched in threads, one thread per shard (each keeps its own SQLite
connections), or, with `ray=`, each in a Ray actor that opens its directory on some node
(the directory must be readable there) and scores with the native kernel; the driver
describes the queries once, whitens them and merges. A shard actor that dies is
restarted by Ray from its directory and the call is retried (`max_restarts=-1`,
`max_task_retries=-1`).
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import shutil
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..config import DEFAULT_AGGREGATE, RuntimeConfig, SearchOptions, reranks_by_default
from ..extraction.features import Crop
from ..extraction.progress import Progress
from ..fileio import write_text
from .index import Index, IndexUsageError
from .manifest import Entry, Manifest
from .meta import write_meta
from .query import K_NOT_GIVEN, QueryResult, answer_queries
from . import neighbour_lists, sharded_dba
from .neighbour_lists import NeighbourSettings
from .neighbours import ASKED, Neighbours, lists_for_reranking, shared_lists
from .search import (Ranking, augment_scored, augmentation_depth, finish_reranking, image_distances,
                     merge_rankings, nearest_description_distances, plan_expansion, rank_descriptions, rank_expanded,
                     rerank_pool)
from .segments import write_segment
from .snapshot import State, View, publish
from .whitening import PCAWhitening
from .writer import CHUNK_IMAGES

SHARDS = "shards.json"
SHARED_WHITENING = "whitening.npz"
FORMAT = 1


def is_sharded(path: str | Path) -> bool:
    """Whether `path` is a directory made by `split_index`."""
    return (Path(path) / SHARDS).is_file()


def open_index(path: str | Path, *, runtime: RuntimeConfig | None = None, ray: str | None = None) -> "Index | ShardedIndex":
    """The index at `path`: a `ShardedIndex` when it holds shards, else an `Index`.
    `ray` (shards only) serves the shards from actors on that Ray cluster."""
    if is_sharded(path):
        return ShardedIndex.open(path, runtime=runtime, ray=ray)
    if ray:
        raise IndexUsageError(f"{path} is not sharded: --ray on a query serves the shards of an index "
                              "made by `retrieval split`")
    return Index.open(path, runtime=runtime)


def split_index(source: str | Path, out: str | Path, shards: int, *, progress: bool = False) -> "ShardedIndex":
    """Write the published images of index `source` as `shards` shards into the new
    directory `out` and open them. Each shard gets the source's whitened window vectors
    as they are (bit for bit: whitening them again in other chunk sizes could round a
    few float16 values differently) and its own search structure, chosen for its size."""
    out = Path(out)
    if shards < 1:
        raise IndexUsageError(f"--shards must be >= 1 (got {shards})")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise IndexUsageError(f"{out} exists and is not empty; choose a new directory for the shards")
    with Index.open(source) as src:
        view = src.view()
        if view.whitening is None:
            raise IndexUsageError(f"{source} holds no images yet: nothing to split")
        entries = src.manifest.get_many(_published_ids(view).tolist())
        live = np.array(sorted(entries), dtype=np.int64)  # published and still in the manifest
        if len(live) < shards:
            raise IndexUsageError(f"{source} holds {len(live)} images: fewer than --shards {shards}")
        meta = {k: v for k, v in src.meta.items() if k != "whiten_on"}
        lists, _, _ = lists_for_reranking(src.path, view.state.generation)
        current = lists is not None and lists.meta.get("generation") == view.state.generation
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src.path / view.state.whitening["file"], out / SHARED_WHITENING)
        names, ranges = [], []
        for k, ids in enumerate(np.array_split(live, shards)):
            name = f"shard-{k}"
            _write_shard(out / name, view, ids, [entries[i] for i in ids.tolist()], {
                **meta, "shared_whitening": f"../{SHARED_WHITENING}",
                "shard": {"index": k, "of": shards, "ids": [int(ids[0]), int(ids[-1])]},
            })
            names.append(name)
            ranges.append([int(ids[0]), int(ids[-1])])
            if progress:
                print(f"split: {name} holds {len(ids)} images (ids {ids[0]}..{ids[-1]})", flush=True)
    write_text(out / SHARDS, json.dumps({"format": FORMAT, "shards": names, "ids": ranges,
                                          "whitening": SHARED_WHITENING, "source": str(Path(source).resolve()),
                                          "images": int(len(live))}, indent=1))
    opened = ShardedIndex.open(out)
    if current:
        opened.adopt_neighbours(lists)
    return opened


def _published_ids(view: View) -> np.ndarray:
    ids = np.concatenate([s.ids for s in view.segments]) if view.segments else np.empty(0, np.int64)
    return np.setdiff1d(ids, view.dead)


def _write_shard(directory: Path, view: View, ids: np.ndarray, entries: list, meta: dict) -> None:
    """One shard: index.json, its manifest (ids kept), the source's vectors of `ids` as one
    segment, the shared whitening, published; then its search structure."""
    directory.mkdir()
    write_meta(directory, meta)
    manifest = Manifest(directory / "manifest.sqlite")
    manifest.copy_entries(entries)
    generation = manifest.generation
    manifest.close()
    patches, dim = view.patches, view.whitening.output_dim

    def rows() -> Iterator[np.ndarray]:
        for start in range(0, len(ids), CHUNK_IMAGES):
            chunk = ids[start:start + CHUNK_IMAGES]
            segment, row = view.locate(chunk)
            block = np.empty((len(chunk), patches, dim), np.float16)
            for s in np.unique(segment).tolist():
                at = np.flatnonzero(segment == s)
                order = np.argsort(row[at], kind="stable")  # Segment.read takes sorted rows
                block[at[order]] = view.segments[s].read(row[at][order], patches).reshape(-1, patches, dim)
            yield block.reshape(-1, dim)

    write_segment(directory, "seg-1", ids, rows(), patches, dim)
    shutil.copyfile(view.directory / view.state.whitening["file"], directory / "whitening-2.npz")
    publish(directory, State(
        generation=generation, images=len(ids), next=2, segments=[{"name": "seg-1", "images": int(len(ids))}],
        whitening={"file": "whitening-2.npz", "images": len(ids), "sample_images": 0, "source": "shared"},
    ))
    with Index.open(directory) as shard:
        shard.set_index_type(shard.index_type)  # trains the FAISS structure a shard this size gets


class _ShardSearcher:
    """One shard: its Index and the ranking of whitened query vectors against it."""

    def __init__(self, path: str, runtime: RuntimeConfig | None = None) -> None:
        self.index = Index.open(path, runtime=runtime)

    def whitening(self) -> tuple[np.ndarray, np.ndarray] | None:
        w = self.index.whitening
        return None if w is None else (w.mean_, w.projection_)

    def pid(self) -> int:
        import os

        return os.getpid()

    def info(self) -> dict:
        return self.index.info()

    def entry(self, image_id: int) -> Entry | None:
        return self.index.entry(image_id)

    def windows(self, image_ids: list[int], rows: np.ndarray | None) -> dict[int, np.ndarray]:
        """The window vectors (only `rows`) of those of `image_ids` this shard holds."""
        view = self.index.view()
        held = set(_published_ids(view).tolist())
        return {i: view.windows(i, rows) for i in image_ids if i in held}

    def expanded(self, queries: list[list[np.ndarray]], options: SearchOptions,
                 hits: list[tuple[list[np.ndarray], np.ndarray]]) -> list[tuple[Ranking, dict[int, Entry]]]:
        """`search` with query expansion, the expanded hits (windows, distances) of each
        query found over every shard."""
        view = self.index.view()
        out = []
        for descriptions, (expanded, distances) in zip(queries, hits):
            r = rank_expanded(descriptions, view, options, expanded, distances)
            out.append((r, self.index.manifest.get_many(r.ids.tolist())))
        return out

    def by_path(self, path: str) -> Entry | None:
        return self.index.by_path(path)

    def entries(self, image_ids: list[int]) -> dict[int, Entry]:
        """The manifest entries of those of `image_ids` this shard holds."""
        return self.index.manifest.get_many(image_ids)

    # -- database-side augmentation (retrieval/engine/sharded_dba.py) ---------------------
    def live_ids(self) -> np.ndarray:
        return self.index.view().live_ids()

    def images(self) -> int:
        return self.index.view().images

    def nearest(self, window_sets: list[np.ndarray], settings: NeighbourSettings) -> list[Ranking]:
        return sharded_dba.nearest(self.index.view(), window_sets, settings)

    def neighbours(self) -> Neighbours | None:
        return shared_lists(self.index.path)

    def save_neighbours(self, lists: Neighbours, settings: NeighbourSettings) -> None:
        """Store lists of this shard's images (their meta completed with what they hold)."""
        view = self.index.view()
        lists.meta.update({**settings.meta(view), "generation": view.state.generation, ASKED: True})
        with self.index._writing():
            lists.save(self.index.path)

    def rerank_pool(self, descriptions: list[np.ndarray], options: SearchOptions) -> np.ndarray | None:
        return rerank_pool(descriptions, self.index.view(), options, self.index._rows_at(options.query_levels))

    def scored(self, descriptions: list[np.ndarray], pool: np.ndarray | None, aggregate: str) -> Ranking:
        """This shard's images of `pool` (None: all; other shards' ids are skipped) at their
        distance to the query's nearest description (view order, unsorted)."""
        return nearest_description_distances(descriptions, self.index.view(), pool, aggregate)

    def distances(self, window_sets: list[np.ndarray], pool: np.ndarray | None, aggregate: str) -> list[np.ndarray]:
        """The same images at their distance to each window set, in `scored` order."""
        view = self.index.view()
        return [image_distances(w, view, pool, aggregate)[1] for w in window_sets]

    def warm(self, wait: bool) -> int:
        return self.index.warm(wait)

    def search(self, queries: list[list[np.ndarray]], options: SearchOptions) -> list[tuple[Ranking, dict[int, Entry]]]:
        """Per query (its descriptions, e.g. one per rotation, as whitened vectors): this
        shard's ranking, each image at its smallest distance over the descriptions, and
        the manifest entries of its images that still exist."""
        view = self.index.view()
        out = []
        for descriptions in queries:
            r = rank_descriptions(descriptions, view, options)
            out.append((r, self.index.manifest.get_many(r.ids.tolist())))
        return out

    def close(self) -> None:
        self.index.close()


class ShardedIndex:
    """Shards sharing one whitening, searched as one index (threads, or Ray actors).

    >>> idx = ShardedIndex.open("my-shards")                     # doctest: +SKIP
    >>> idx.search(["query.jpg"], k=5)                           # doctest: +SKIP
    >>> ShardedIndex(["a/shard-0", "a/shard-1"], ray="auto")     # doctest: +SKIP
    """

    def __init__(self, shards: Sequence[str | Path], *, runtime: RuntimeConfig | None = None,
                 ray: str | None = None) -> None:
        if not shards:
            raise IndexUsageError("a sharded index needs at least one shard")
        self.paths = [Path(s).resolve() for s in shards]
        self.path: Path | None = None  # the directory holding the shards, when opened from one
        runtime = runtime or RuntimeConfig()
        # Queries are described here, never on the cluster: `ray` serves the shards only.
        self.runtime = RuntimeConfig(runtime.device, runtime.batch_size, runtime.workers)
        self.ray = ray
        self._actors: list = []
        self._pools: list[cf.ThreadPoolExecutor] = []
        self._local: list[_ShardSearcher] = []
        self._image_total: int | None = None
        # The driver describes and whitens the queries with the first shard's configuration.
        self._front = Index.open(self.paths[0], runtime=self.runtime)
        try:
            for p in self.paths[1:]:
                with Index.open(p) as other:
                    if (other.meta["extractor"], other.meta["search"]) != (self._front.meta["extractor"], self._front.meta["search"]):
                        raise IndexUsageError(f"shard {p} has another extractor or search configuration than {self.paths[0]}")
            if ray:
                self._start_actors()
            else:
                # One thread per shard, always the same: SQLite connections stay in their thread.
                self._pools = [cf.ThreadPoolExecutor(1, thread_name_prefix=f"shard{i}") for i in range(len(self.paths))]
                self._local = [pool.submit(_ShardSearcher, str(p), self.runtime).result()
                               for pool, p in zip(self._pools, self.paths)]
            self.whitening = self._check_whitening()
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(cls, path: str | Path, *, runtime: RuntimeConfig | None = None, ray: str | None = None) -> "ShardedIndex":
        """Open a directory made by `split_index` (its shards.json lists the shards)."""
        path = Path(path)
        try:
            spec = json.loads((path / SHARDS).read_text())
            names = [str(n) for n in spec["shards"]]
        except FileNotFoundError:
            raise IndexUsageError(f"{path} holds no shards ({SHARDS} is missing); make them with `retrieval split`") from None
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise IndexUsageError(f"{path / SHARDS} is damaged ({err}); run `retrieval split` again") from None
        sharded = cls([path / n for n in names], runtime=runtime, ray=ray)
        sharded.path = path
        return sharded

    def _start_actors(self) -> None:
        from ..cluster import connect

        ray = connect(self.ray)
        # num_cpus=0: every shard gets an actor whatever the CPU count (4 shards on a
        # 2-CPU cluster must not wait for each other); SPREAD puts them on different nodes.
        actor = ray.remote(max_restarts=-1, max_task_retries=-1)(_ShardSearcher).options(
            num_cpus=0, scheduling_strategy="SPREAD")
        self._actors = [actor.remote(str(p)) for p in self.paths]

    def _each(self, method: str, *args) -> list:
        """Call `method` on every shard in parallel; results in shard order."""
        return self._each_own(method, [args] * len(self.paths))

    def _each_own(self, method: str, args: list[tuple]) -> list:
        """Call `method` on every shard in parallel, shard i with `args[i]`; results in shard order."""
        if self._actors:
            import ray

            return ray.get([getattr(a, method).remote(*a_args) for a, a_args in zip(self._actors, args)])
        futures = [pool.submit(getattr(s, method), *s_args) for pool, s, s_args in zip(self._pools, self._local, args)]
        return [f.result() for f in futures]

    def _on(self, shard: int, method: str, *args):
        """Call `method` on one shard."""
        if self._actors:
            import ray

            return ray.get(getattr(self._actors[shard], method).remote(*args))
        return self._pools[shard].submit(getattr(self._local[shard], method), *args).result()

    def _check_whitening(self) -> PCAWhitening | None:
        """The one whitening of every shard; IndexUsageError if a shard uses another."""
        found = self._each("whitening")
        mine = self._front.whitening
        for path, w in zip(self.paths, found):
            same = (w is None) == (mine is None) and (
                mine is None or (np.array_equal(w[0], mine.mean_) and np.array_equal(w[1], mine.projection_)))
            if not same:
                raise IndexUsageError(
                    f"shard {path} uses another whitening than {self.paths[0]}: distances of different "
                    "shards would not be comparable; make the shards with `retrieval split`"
                )
        return mine

    @property
    def extractor(self):
        """The network that describes the queries (the first shard's; every shard has its configuration)."""
        return self._front.extractor

    @property
    def store(self):
        """The feature store the queries' descriptors are kept in."""
        return self._front.store

    @property
    def search_config(self):
        return self._front.search_config

    def entry(self, image_id: int) -> Entry | None:
        """The indexed image with manifest id `image_id`, from the shard that holds it, or None."""
        return next((e for e in self._each("entry", image_id) if e is not None), None)

    def by_path(self, path: str) -> Entry | None:
        """The indexed image at `path` (compared as a string), from the shard that holds it, or None."""
        return next((e for e in self._each("by_path", path) if e is not None), None)

    def warm(self, wait: bool = False) -> int:
        """`Index.warm` on every shard, where it is served (each actor's node reads its own
        shard ahead). Returns the bytes read ahead in all."""
        return int(sum(self._each("warm", wait)))

    def shard_pids(self) -> list[int]:
        """Process id of each shard's searcher (the actors' with Ray)."""
        return self._each("pid")

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
        """`Index.search` over every shard: the same arguments and result; each shard
        returns its own top k and the driver keeps the k nearest overall. `exact_limit`
        applies per shard. With rotations each shard keeps an image's smallest distance
        over them, as one index does. Query expansion finds the `qe` nearest images over
        every shard first, then each shard scores all its images exactly against the query
        and their windows (the unsharded index's hits when it too searches exactly).
        Database-side augmentation (`dba`, `rerank`) uses the lists `retrieval dba`
        computed across every shard (`build_neighbours`): the driver re-ranks on the
        distances every shard gives it (`sharded_dba.py`; the unsharded hits in exact mode).
        `rerank` None re-ranks as on one index: when the shards hold at most
        `config.RERANK_AUTO_LIMIT` whitened images in all and lists across them.
        `split_index` carries the unsplit index's current lists over."""
        options = self._front.search_options(k, options, keywords)
        if options.rerank is None:
            options = options.with_default_rerank(self._images(), self._reranks_by_default(), self._whitened())
        neighbours = self.neighbours(options.dba or 1) if options.dba or options.rerank else None

        def merged(per_shard: list, k: int | None) -> list:
            """Per query, the k nearest over the shards' rankings, and their entries."""
            out = []
            for n in range(len(per_shard[0])):
                parts = [shard[n] for shard in per_shard]
                entries = {i: e for _, found in parts for i, e in found.items()}
                out.append((merge_rankings([r for r, _ in parts], k), entries))
            return out

        def rank_on_shards(described: list[list[np.ndarray]], options: SearchOptions) -> list:
            if neighbours is not None and (options.dba or options.rerank):
                return [self._rank_augmented(d, options, neighbours) for d in described]
            if not options.qe:
                return merged(self._each("search", described, options), options.k)
            nearest = merged(self._each("search", described, options.replace(k=options.qe, qe=0)), options.qe)
            rows = self._front._rows_at(options.query_levels)
            wanted = sorted({i for ranking, _ in nearest for i in ranking.ids.tolist()})
            windows = {i: w for found in self._each("windows", wanted, rows) for i, w in found.items()}
            hits = [([windows[i] for i in ranking.ids.tolist()], ranking.distances) for ranking, _ in nearest]
            return merged(self._each("expanded", described, options, hits), options.k)

        return answer_queries(self._front, self.whitening, queries, options, rank_on_shards,
                              progress=progress, skipped=skipped)

    def _rank_augmented(self, descriptions: list[np.ndarray], options: SearchOptions,
                        neighbours: Neighbours) -> tuple[Ranking, dict[int, Entry]]:
        """One query re-ranked with database-side augmentation (and expansion) over every
        shard: each shard's pool widened by the neighbours of its images, scored where the
        images are, re-ranked here (`search.plan_expansion`, then
        `search.finish_reranking` on the distances every shard gives)."""
        pools = self._each("rerank_pool", descriptions, options)
        found = [p for p in pools if p is not None]
        depth = augmentation_depth(options, neighbours)
        widened = neighbours.widen(np.unique(np.concatenate(found)), depth) if found else None
        # A shard scoring every image needs no pool; the others get the widened one (each
        # skips the ids it does not hold).
        parts = [None if p is None else widened for p in pools]
        aggregate = options.aggregate or DEFAULT_AGGREGATE
        scored = sharded_dba.concatenate(self._each_own("scored", [(descriptions, p, aggregate) for p in parts]))
        plan = plan_expansion(augment_scored(scored, options, neighbours), options)
        rows = self._front._rows_at(options.query_levels)
        held = {i: w for shard in self._each("windows", plan.hits.tolist(), rows) for i, w in shard.items()}
        windows = [held[i] for i in plan.hits.tolist()]
        per_shard = self._each_own("distances", [(windows, p, aggregate) for p in parts])
        hit_distances = [np.concatenate([shard[j] for shard in per_shard]) for j in range(len(windows))]
        ranking = finish_reranking(plan.scored, plan.weights, hit_distances, options, neighbours)
        wanted = ranking.ids.tolist()
        return ranking, {i: e for shard in self._each("entries", wanted) for i, e in shard.items()}

    def _span(self) -> list:
        """The id range [first, last] of each shard's images: what lists across them name."""
        return [[int(ids[0]), int(ids[-1])] if len(ids) else None for ids in self._each("live_ids")]

    def _where(self) -> str:
        return str(self.path) if self.path is not None else " ".join(map(str, self.paths))

    def neighbours(self, k: int) -> Neighbours:
        """Every shard's neighbour lists as one, each holding at least k images of any
        shard (IndexUsageError, saying to run `retrieval dba`, when there are none, they
        were computed by a shard alone, or hold fewer)."""
        try:
            return sharded_dba.lists_across(self._each("neighbours"), self._span(), k, self._where())
        except ValueError as err:
            raise IndexUsageError(str(err)) from None

    def build_neighbours(self, k: int, *, progress: bool = False) -> dict:
        """Compute every image's k nearest images over all shards (`retrieval dba
        SHARDED_DIR`) and store each shard's part in that shard; returns what `info`
        reports. Each shard's images' windows are ranked against every shard in batches."""
        if k < 1:
            raise IndexUsageError("-k must be >= 1")
        settings = self._front._neighbour_settings(k)
        live = self._each("live_ids")
        span = self._span()
        total = int(sum(len(ids) for ids in live))
        lists = []
        with Progress(total, "neighbours", enabled=progress) as bar:
            for shard, ids in enumerate(live):
                near = np.full((len(ids), k), -1, np.int64)
                dist = np.full((len(ids), k), np.inf, np.float32)
                for start in range(0, len(ids), neighbour_lists.QUERY_BATCH):
                    batch = ids[start:start + neighbour_lists.QUERY_BATCH]
                    held = self._on(shard, "windows", batch.tolist(), settings.rows)
                    found = self._each("nearest", [held[i] for i in batch.tolist()], settings)
                    near[start:start + len(batch)], dist[start:start + len(batch)] = \
                        sharded_dba.merge_lists(batch, found, k)
                    bar.update(len(batch))
                lists.append(Neighbours(ids, near, dist, {"images": total, sharded_dba.ACROSS: span}))
        # Stored once every list is known: an interrupted run leaves the old lists whole.
        self._save_across(lists, settings)
        return {"k": k, "aggregate": settings.aggregate, "query_levels": list(settings.query_levels),
                "images": total, "shards": len(live)}

    def adopt_neighbours(self, lists: Neighbours) -> None:
        """Store the current lists of the index these shards were split from, each shard
        its images' rows, as lists across every shard: they are the lists `build_neighbours`
        would compute (the same images and distances; a split index's shards never change),
        so `--dba` and `--rerank` work on the shards as on the source. Nothing is stored
        unless they name every image."""
        live, span = self._each("live_ids"), self._span()
        meta = {"images": int(sum(len(ids) for ids in live)), sharded_dba.ACROSS: span}
        found = [lists.rows(ids) for ids in live]
        if all(known.all() for _, known in found):
            self._save_across([Neighbours(ids, lists.neighbours[rows], lists.distances[rows], dict(meta))
                               for ids, (rows, _) in zip(live, found)], self._front._neighbour_settings(lists.k))

    def _save_across(self, lists: list[Neighbours], settings: NeighbourSettings) -> None:
        for shard, found in enumerate(lists):
            self._on(shard, "save_neighbours", found, settings)

    def info(self) -> dict:
        """Counts and configuration as `Index.info()` gives them, totals over the shards,
        and per shard its path, images, segments and search structure."""
        info = self._front.info()
        shards = self._each("info")
        info.update({
            "images": sum(s["images"] for s in shards),
            "patches": sum(s["patches"] for s in shards),
            "segments": sum(s["segments"] for s in shards),
            "removed_pending": sum(s["removed_pending"] for s in shards),
            "up_to_date": all(s["up_to_date"] for s in shards),
            "structure": {"search": "sharded", "reason": f"{len(shards)} shards, each searched as below; "
                          "the driver merges their top k"},
            "shards": [{"path": s["path"], "images": s["images"], "segments": s["segments"],
                        "structure": s["structure"]} for s in shards],
            "served_by": f"Ray actors (--ray {self.ray})" if self._actors else "threads",
            "path": str(self.path or self.paths[0].parent),
        })
        info["reranking"] = {**info["reranking"], "by_default": self._reranks_by_default()}
        return info

    def _images(self) -> int:
        """The images of every shard, counted at the first query that needs it: a split
        index's shards do not change, and a count per query would be a round trip to every
        shard (a remote call to each actor under Ray)."""
        if self._image_total is None:
            self._image_total = int(sum(self._each("images")))
        return self._image_total

    def _whitened(self) -> bool:
        return self.whitening is not None and self.whitening.fitted_

    def _reranks_by_default(self) -> bool:
        """Whether a query re-ranks by default (`config.reranks_by_default`) and lists across
        every shard are stored, which are read only then."""
        if not reranks_by_default(self._images(), self._whitened()):
            return False
        try:
            self.neighbours(1)
        except IndexUsageError:
            return False
        return True

    def close(self) -> None:
        """Close every shard (and end its actor)."""
        if self._actors:
            import ray

            for a in self._actors:
                ray.kill(a)
            self._actors = []
        for pool, s in zip(self._pools, self._local):
            pool.submit(s.close).result()
        for pool in self._pools:
            pool.shutdown()
        self._pools, self._local = [], []
        self._front.close()

    def __enter__(self) -> "ShardedIndex":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
