"""A flat fast-scan PQ structure searched as contiguous parts, one thread each.

The layout index (one fast-scan code per image, 128 bytes at 1,000,000 images) is read
whole by every search. FAISS searches one query on one thread, and a batch with its
query blocks spread over the threads (`implem` 12/13) or with the codes split between
them (`implem` 14/15). Here the codes are cut into one part per core, each part searched
by its own thread with FAISS's default implementation on one OpenMP thread (a batch's
queries still share each read of a part's codes), and the parts' hits merged. Measured
at 1,000,000 images on an Intel Xeon with 2 cores (benchmarks/results/concurrency.md,
"The layout index's scan in parts"): a lone query 4.8 ms against 8.5 (default) and 13.4
(`implem` 15); in batches of 8, 2.8 ms a query against 2.4 and 6.0.

The parts copy the codes (the master structure stays whole: it is what the writer adds
to and saves), so a searched layout index takes twice its codes in memory.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

MIN_BLOCKS_PER_PART = 64  # below, a part's hand-over to a thread costs more than its scan

_pools: dict[int, ThreadPoolExecutor] = {}  # by thread count
_pools_lock = threading.Lock()
# A forked child has none of its parent's threads: its searches make their own.
os.register_at_fork(after_in_child=_pools.clear)


def _one_openmp_thread() -> None:
    import faiss

    faiss.omp_set_num_threads(1)  # this thread's own setting (OpenMP keeps it per thread)


def _scan_pool(workers: int) -> ThreadPoolExecutor:
    """The threads that scan parts, shared by every split structure of the process."""
    with _pools_lock:
        if workers not in _pools:
            _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="retrieval-scan",
                                                 initializer=_one_openmp_thread)
        return _pools[workers]


def default_threads() -> int:
    """The OpenMP threads FAISS uses in a thread that chose none: the process's default
    (OMP_NUM_THREADS, else the cores). A structure's parts are made once and shared by
    every thread that searches it, so their count must not be the first searching
    thread's own setting, which OpenMP keeps per thread and which not only
    `faiss.omp_set_num_threads` sets: threadpoolctl's BLAS limit sets it to 1 too once
    FAISS is loaded (FAISS's OpenBLAS is the OpenMP build), and a request thread under
    that limit left the layout index in one part for every thread. Read in a new thread;
    the parts are scanned by threads of their own (`_scan_pool`), not the caller's."""
    import faiss

    seen: list[int] = []
    reader = threading.Thread(target=lambda: seen.append(faiss.omp_get_max_threads()))
    reader.start()
    reader.join()
    return seen[0]


def part_count(index, threads: int) -> int:
    """How many parts `index` (an IDMap2 over a flat PQ fast-scan structure) is searched
    in: one per thread, each of at least MIN_BLOCKS_PER_PART code blocks; 1 (not split)
    for any other structure."""
    import faiss

    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else None
    if not isinstance(inner, faiss.IndexPQFastScan):
        return 1
    return max(1, min(threads, inner.ntotal2 // inner.bbs // MIN_BLOCKS_PER_PART))


class SplitScan:
    """`index` (an IDMap2 over a flat PQ fast-scan structure) as `parts` structures over
    contiguous runs of its code blocks, searched in parallel; the same hits as `index`
    (ids among equal distances may come in another order)."""

    def __init__(self, index, parts: int) -> None:
        import faiss

        inner = faiss.downcast_index(index.index)
        blocks = inner.ntotal2 // inner.bbs
        block_bytes = inner.codes.size() // max(blocks, 1)
        codes = faiss.rev_swig_ptr(inner.codes.get(), inner.codes.size())
        bounds = np.linspace(0, blocks, parts + 1).round().astype(np.int64)
        self.similarity = index.metric_type == faiss.METRIC_INNER_PRODUCT
        self.ids = faiss.vector_to_array(index.id_map)
        self.parts: list[tuple[int, faiss.IndexPQFastScan]] = []
        for first, end in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            part = faiss.IndexPQFastScan(inner.d, inner.pq.M, inner.pq.nbits, inner.metric_type, inner.bbs)
            part.pq = inner.pq  # a copy of the trained codebooks
            part.is_trained = True
            faiss.copy_array_to_AlignedTable(codes[first * block_bytes:end * block_bytes], part.codes)
            part.ntotal = min(int(inner.ntotal), end * inner.bbs) - first * inner.bbs
            part.ntotal2 = (end - first) * inner.bbs
            self.parts.append((first * inner.bbs, part))

    def search(self, queries: np.ndarray, k: int, params=None) -> tuple[np.ndarray, np.ndarray]:
        """FAISS's `search`: distances and ids of the k nearest codes of each query row."""
        import faiss

        pool = _scan_pool(len(self.parts))  # looked up each time: a forked child makes its own
        futures = [pool.submit(part.search, queries, k) for _, part in self.parts]
        found = [f.result() for f in futures]
        ids = [np.where(rows >= 0, self.ids[np.maximum(rows + start, 0)], -1)
               for (start, _), (_, rows) in zip(self.parts, found)]
        return faiss.merge_knn_results(np.stack([d for d, _ in found]), np.stack(ids), keep_max=self.similarity)
