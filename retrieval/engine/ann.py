"""A thin FAISS wrapper: index-factory strings, explicit GPU resources, atomic persistence.

The window index holds one vector per window (inner product on unit vectors, so nearest
by inner product is nearest in Euclidean distance). Its ids are `image id * 64 + window`
(manifest ids, stable across segment merges), so a hit names its image by a shift. It
only proposes candidate images: their distances come from the exact kernel.

The layout index holds one vector per image: its windows laid end to end in their fixed
order (levels 1..4, row-major), ids = image ids. Its inner product sums the evidence of
every window pair in the same place, which a window's own neighbours cannot: where
near-duplicates are barely nearer than the crowd window by window, the window index
loses most of them and the layout index finds them (benchmarks/results/scale.md). It proposes
candidates beside the window index, for queries described at the database's levels.

Without `--index-type`, the structure follows the collection (`auto_factory`): an IVF
list count near 2 x sqrt(windows) (its centroids in an HNSW graph from 4,096 lists on),
fast-scan product quantisation with 4 dimensions per 4-bit code (32 bytes per 256-d
window), trained on a sample and re-trained once the collection has grown 4-fold. A flat
index is never used to propose candidates: scoring every image with the kernel is faster
and exact.
"""
from __future__ import annotations

import math
import os
import re
import threading
from pathlib import Path

import numpy as np

from ..config import NPROBE, NPROBE_MIN, NPROBE_MIN_SHARE, NPROBE_WINDOWS
from ..fileio import replacing
from .split_scan import SplitScan, default_threads, part_count


class _LazyFaiss:
    """`faiss`, imported on first use: a query of a collection small enough to be scored
    exactly never touches it, and a one-shot `retrieval query` saves its import."""

    def __getattr__(self, name: str):
        import faiss as module

        globals()["faiss"] = module
        return getattr(module, name)


faiss = _LazyFaiss()

WINDOW_BITS = 6  # up to 64 windows per image (levels 1-4 have 30)
RETRAIN_GROWTH = 4  # re-train once the collection holds this many times the trained windows
TRAIN_PER_LIST = 64  # training windows per IVF list (FAISS warns below 39)
MIN_POINTS_PER_CENTROID = 39  # FAISS's k-means default: fewer points per centroid train it poorly
EXACT_NAMES = ("exact", "Flat", "IDMap,Flat")  # what `info` reports for exact search, and FAISS's names
LAYOUT_TRAIN_IMAGES = 1024  # the layout index's training sample (images)
LAYOUT_MIN_IMAGES = 640  # below, no layout index: FAISS asks for 39 x 16 points to train 4-bit codebooks
# The automatic window structure has about 2 x sqrt(windows) lists: four times the
# sqrt(windows) / 2 it had, so that half the codes are scanned per query window (twice the
# lists probed, each a quarter as long) at the same recall@10 on real photos; at 4,096 lists
# and more, a flat search of the list centroids would cost more than the scan it saves
# (3.7 ms a query at 8,192 lists of 256 dimensions), so an HNSW graph finds them. At
# 1,000,000 images: 15 % more queries a second for one client and for 8 batched ones
# (benchmarks/results/concurrency.md, "More lists, found by a graph").
MAX_LISTS = 8192  # k-means on TRAIN_PER_LIST x lists windows costs lists squared: 8,192 trains in minutes
GRAPH_QUANTIZER_LISTS = 4096


class FactoryError(ValueError):
    """An `--index-type` string FAISS cannot build (usage error)."""


def faiss_device(device: str = "auto") -> str:
    """Where FAISS searches run for a `--device` setting: `cuda:0` or `cpu`."""
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if device == "cuda" and gpus == 0:
        raise RuntimeError("--device cuda was asked for, but FAISS sees no GPU")
    return "cuda:0" if device != "cpu" and gpus > 0 else "cpu"


def index_type_argument(value: str | None) -> str | None:
    """An `--index-type` value as the index keeps it: None for 'auto' (or nothing: chosen by
    collection size), else the checked string ('exact', which `info` reports, included)."""
    if value is None or value.strip().lower() == "auto":
        return None
    check_factory(value)
    return value


def check_factory(factory: str, dim: int = 64) -> None:
    """Raise FactoryError (saying what is allowed) if FAISS cannot parse `factory`."""
    if is_flat(factory):
        return
    try:
        faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else ""
        raise FactoryError(
            f"--index-type {factory!r} is not a FAISS index-factory string ({first}); "
            "examples: 'IVF1024,PQ64x4fs', 'IVF256,Flat', 'HNSW32'; 'exact' (or 'Flat') for exact "
            "search at any size; 'auto' (or leaving it out) to let the index choose by collection size"
        ) from None


def is_flat(factory: str | None) -> bool:
    """'Flat' (exact search): served by the kernel alone, without FAISS."""
    return factory is not None and factory.replace(" ", "").lower() in {n.lower() for n in EXACT_NAMES}


def auto_factory(windows: int, dim: int) -> str:
    """The IVF fast-scan PQ structure for a collection of `windows` window vectors: a
    power of two near 2 x sqrt(windows) lists (searched by `default_nprobe`), found by an
    HNSW graph over the list centroids from GRAPH_QUANTIZER_LISTS lists on."""
    lists = 2 ** round(math.log2(max(2 * math.sqrt(max(windows, 1)), 1)))
    lists = int(min(max(lists, 16), MAX_LISTS))
    quantizer = "_HNSW32" if lists >= GRAPH_QUANTIZER_LISTS else ""
    m = dim // 4 if dim % 4 == 0 and dim >= 8 else dim // 2 if dim % 2 == 0 else dim
    return f"IVF{lists}{quantizer},PQ{m}x4fs"


def layout_factory(patches: int, dim: int) -> str | None:
    """Fast-scan PQ over images' laid-out windows: one 4-bit code per `patches` dimensions
    (dim / 2 bytes per image; measured against coarser codes in benchmarks/results/scale.md).
    None for one window per image, which the window index covers already."""
    return f"PQ{dim}x4fs" if patches > 1 else None


def gpu_capable(factory: str) -> bool:
    """Whether FAISS has a GPU implementation of `factory` (fast-scan codes have none)."""
    return "fs" not in factory.replace(" ", "").split(",")[-1]


def training_size(factory: str) -> int:
    """Windows to train `factory` on: enough for its IVF lists and 4-bit PQ codebooks."""
    # The list count is the number right after "IVF": in "IVF8192_HNSW32" the 32 is the
    # coarse quantizer's graph degree (read as 819,232 lists, the sample took 53 GB).
    counts = [int(m.group(1)) for part in factory.split(",") if (m := re.match(r"\s*IVF(\d+)", part))]
    return max(TRAIN_PER_LIST * (counts[-1] if counts else 1), 4096)


def window_ids(image_ids: np.ndarray, patches: int) -> np.ndarray:
    """FAISS ids of every window of the given images, in row order."""
    return (np.repeat(np.asarray(image_ids, np.int64), patches) << WINDOW_BITS) + np.tile(
        np.arange(patches, dtype=np.int64), len(image_ids)
    )


class VectorIndex:
    """FAISS index over window (or laid-out image) vectors, built from a factory string.

    The CPU index is the master copy (it is what gets saved); a GPU replica is made
    on demand for search when a GPU is present, `device` allows it and FAISS has a GPU
    implementation of the structure (`gpu_capable`).
    """

    def __init__(self, dim: int, factory: str, device: str = "auto") -> None:
        self.dim = dim
        self.factory = factory
        self.device = device
        self._cpu: faiss.Index | None = None
        self._gpu: faiss.Index | None = None
        self._on_cpu: faiss.Index | SplitScan | None = None  # what searches the CPU master (`_searcher`)
        self._replica_lock = threading.Lock()
        self._resources = None

    @property
    def index(self) -> faiss.Index:
        if self._cpu is None:
            try:
                index = faiss.index_factory(self.dim, self.factory, faiss.METRIC_INNER_PRODUCT)
            except RuntimeError as err:
                raise FactoryError(f"--index-type {self.factory!r}: {err}") from None
            if faiss.try_extract_index_ivf(index) is None:
                index = faiss.IndexIDMap2(index)  # graph and flat indexes keep no ids of their own
            self._cpu = index
        return self._cpu

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained)

    def train(self, sample: np.ndarray) -> str | None:
        """Train on `sample` windows; ValueError saying why when it cannot be trained.

        A sample with fewer than MIN_POINTS_PER_CENTROID windows per centroid (IVF lists,
        PQ codebook entries) still trains, but returns a warning saying what to choose
        instead; FAISS's own line about it (on stderr, from C++) is silenced."""
        warning = None
        centroids = max((c for c, _ in self._clusterings()), default=0)
        needed = MIN_POINTS_PER_CENTROID * centroids
        if len(sample) < needed:
            fits = len(sample) // MIN_POINTS_PER_CENTROID
            instead = (f"a structure with at most {fits} IVF lists and PQ codes per sub-vector, or 'auto'"
                       if fits >= 2 else "'exact' or 'auto' (exact search is the fast choice at this size)")
            warning = (f"{self.factory!r} trained on {len(sample)} windows, fewer than the {needed} its "
                       f"{centroids} centroids need ({MIN_POINTS_PER_CENTROID} windows each): its candidates "
                       f"may miss images; choose {instead}")
            for _, params in self._clusterings():
                params.min_points_per_centroid = 1
        try:
            self.index.train(np.ascontiguousarray(sample, dtype=np.float32))
        except RuntimeError as err:
            raise ValueError(f"cannot train {self.factory!r} on {len(sample)} windows: {err}") from None
        return warning

    def _clusterings(self) -> list:
        """(centroids, FAISS ClusteringParameters) of each k-means training runs: the IVF
        coarse quantizer's and the product quantizer's codebooks."""
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is None:
            return []
        ivf = faiss.downcast_index(ivf)
        found = [(int(ivf.nlist), ivf.cp)]
        if hasattr(ivf, "pq"):
            found.append((int(ivf.pq.ksub), ivf.pq.cp))
        return found

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, np.int64))
        self._gpu = self._on_cpu = None

    def remove_not_in(self, keep: np.ndarray) -> int:
        """Drop every window whose id is not in `keep`, where the structure supports
        removal (0 where it does not: stale ids are then filtered out at search)."""
        keep = np.ascontiguousarray(keep, np.int64)
        try:
            removed = int(self.index.remove_ids(faiss.IDSelectorNot(faiss.IDSelectorBatch(keep))))
        except RuntimeError:
            return 0
        self._gpu = self._on_cpu = None
        return removed

    @property
    def default_nprobe(self) -> int | None:
        """The inverted lists a search probes unless told (None: the structure has none):
        NPROBE while that many lists hold at most NPROBE_WINDOWS windows on average, else
        enough lists for NPROBE_WINDOWS, at least NPROBE_MIN and one list in
        NPROBE_MIN_SHARE. Long lists hold a query window's nearest windows in fewer of them:
        32 lists of the automatic structure up to about 150,000 images, 16 of its 8,192 at
        1,000,000 (lists of 3,700 windows)."""
        ivf = faiss.try_extract_index_ivf(self.index)
        return None if ivf is None else _nprobe_for(ivf)

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Inner products and ids of the k nearest windows of each query row (-1 = none),
        searching `nprobe` inverted lists where the structure has them (None:
        `default_nprobe`).

        `nprobe` travels with this call as FAISS search parameters and is never set on
        the structure, which every thread searching the index shares. The CPU master
        says whether the structure is IVF (FAISS cannot look inside a GPU replica);
        IVF fast-scan, IVF behind a pre-transform and GPU IVF replicas all take
        `SearchParametersIVF`."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = max(1, min(k, self.ntotal))
        ivf = faiss.try_extract_index_ivf(self.index)
        params = None
        if ivf is not None:
            params = faiss.SearchParametersIVF(nprobe=int(_nprobe_for(ivf) if nprobe is None else nprobe))
        return self._searcher().search(queries, k, params=params)

    def prepare(self) -> None:
        """Make what `search` uses now rather than on the first search (a server's warm-up)."""
        self._searcher()

    def _searcher(self) -> faiss.Index | SplitScan:
        """The index that answers searches, made on first use: on a GPU, the GPU replica;
        on the CPU, a flat fast-scan structure's codes in one part per FAISS thread of
        the process (`split_scan`), any other structure the CPU master itself."""
        with self._replica_lock:  # threads share this index: one replica, made once
            if self.search_device() == "cpu":
                if self._on_cpu is None:
                    parts = part_count(self.index, default_threads())
                    self._on_cpu = SplitScan(self.index, parts) if parts > 1 else self.index
                return self._on_cpu
            if self._gpu is None:
                self._resources = self._resources or faiss.StandardGpuResources()
                self._gpu = faiss.index_cpu_to_gpu(self._resources, 0, self.index)
            return self._gpu

    def search_device(self) -> str:
        """Where `search` runs: `cuda:0` or `cpu`."""
        return faiss_device(self.device) if gpu_capable(self.factory) else "cpu"

    def save(self, path: str | Path) -> None:
        """Write atomically (temp file + rename)."""
        with replacing(path) as tmp:
            faiss.write_index(self.index, tmp)

    @classmethod
    def load(cls, path: str | Path, factory: str, device: str = "auto") -> "VectorIndex":
        """Read a saved index; ValueError naming the file when it is missing or damaged."""
        try:
            cpu = faiss.read_index(str(path))
        except RuntimeError as err:
            reason = "missing" if not os.path.exists(path) else f"unreadable ({str(err).strip().splitlines()[-1]})"
            raise ValueError(f"{path}: {reason}") from None
        obj = cls(cpu.d, factory, device)
        obj._cpu = cpu
        return obj


def _nprobe_for(ivf: faiss.IndexIVF) -> int:
    """`VectorIndex.default_nprobe` of an IVF structure."""
    per_list = ivf.ntotal / max(1, ivf.nlist)
    least = max(NPROBE_MIN, math.ceil(ivf.nlist / NPROBE_MIN_SHARE))
    return int(min(NPROBE, max(least, math.ceil(NPROBE_WINDOWS / max(per_list, 1.0)))))
