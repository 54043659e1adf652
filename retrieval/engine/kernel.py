"""Native multi-patch image distances (thin wrapper around the compiled ``retrieval._kernel``).

Every image is a set of L2-normalised patch descriptors. The database is one C-order array
``db [n_patches, d]`` (float32, or float16 as a storage option) plus ``offsets int64
[n_images + 1]``: image ``i`` owns rows ``offsets[i]:offsets[i + 1]``. The distance between
two unit vectors is ``sqrt(max(0, 2 - 2 * dot))``.

* ``aggregate="min"``: image distance = min over all (query patch, image patch) pairs.
* ``aggregate="mean-min"``: mean over query patches of the min over image patches.

The deciding pair is the (query patch, image patch) pair with the smallest distance (for
"min" it realises the image distance); the image patch index is local to the image. Images
with no patches get distance ``inf`` and pair ``(-1, -1)``.

The arithmetic runs in C++ (OpenMP across images, GIL released), with the instruction-set
path (AVX-512, AVX2+FMA, or portable SSE2) picked at run time; set
``RETRIEVAL_KERNEL_ISA=avx512|avx2|generic`` before import to force one.
"""
from __future__ import annotations

import warnings

import numpy as np

try:
    from .. import _kernel
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "retrieval._kernel (the native distance kernel) is not built. Reinstall the package "
        "with a C++17 compiler available, e.g. `pip install -e . --no-build-isolation` "
        "(or `python setup.py build_ext --inplace`); there is no pure-Python fallback."
    ) from exc

__all__ = ["patch_distances", "patch_distances_batch", "patch_distances_each", "summary"]

_AGGREGATES = ("min", "mean-min")

if "[" in _kernel.describe():  # the requested ISA path could not be honoured
    warnings.warn(_kernel.describe(), RuntimeWarning, stacklevel=2)


def _query(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n_patches, d], got shape {x.shape}")
    # Queries are small: converting them is cheap and never surprising.
    return np.ascontiguousarray(x, dtype=np.float32)


def _db(db: np.ndarray) -> np.ndarray:
    if not isinstance(db, np.ndarray):
        raise ValueError("db must be a numpy array")
    if db.dtype not in (np.float32, np.float16):
        raise ValueError(f"db must have dtype float32 or float16, got {db.dtype} "
                         "(convert once with db.astype(np.float32); it is not copied per call)")
    if db.ndim != 2:
        raise ValueError(f"db must be 2-D [n_patches, d], got shape {db.shape}")
    if not db.flags.c_contiguous:
        raise ValueError("db must be C-contiguous (np.ascontiguousarray(db) once, up front)")
    return db


def _index(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {x.shape}")
    if x.size and x.dtype.kind not in "iu":
        raise ValueError(f"{name} must be an integer array, got dtype {x.dtype}")
    if x.dtype.kind == "u" and x.size and int(x.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{name} has values that do not fit in int64")
    return np.ascontiguousarray(x, dtype=np.int64)


def _common(db, offsets, candidates, aggregate, threads):
    db = _db(db)
    offsets = _index(offsets, "offsets")
    if candidates is not None:
        candidates = _index(candidates, "candidates")
    if aggregate not in _AGGREGATES:
        raise ValueError(f"aggregate must be one of {_AGGREGATES}, got {aggregate!r}")
    if not isinstance(threads, (int, np.integer)) or isinstance(threads, bool) or threads < 0:
        raise ValueError(f"threads must be an int >= 0 (0 = OpenMP default), got {threads!r}")
    return db, offsets, candidates, int(threads)


def patch_distances(query: np.ndarray, db: np.ndarray, offsets: np.ndarray,
                    candidates: np.ndarray | None = None, aggregate: str = "min",
                    threads: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distances from one multi-patch query to database images.

    Args:
        query: float32 ``[nq, d]`` unit-norm query patch descriptors (other float dtypes
            are converted).
        db: C-contiguous ``[n_patches, d]`` float32 or float16 unit-norm descriptors.
        offsets: int64 ``[n_images + 1]``, non-decreasing; image i owns rows
            ``offsets[i]:offsets[i+1]``.
        candidates: int64 indices of the images to score; ``None`` = all images, in order.
        aggregate: ``"min"`` or ``"mean-min"``.
        threads: OpenMP threads; 0 = OpenMP default.

    Returns:
        ``(dist float32[m], query_patch int32[m], db_patch int32[m])`` for the m candidate
        images: the image distance and the deciding (closest) pair, ``db_patch`` local to
        the image.

    Raises:
        ValueError: on wrong dtype, shape, contiguity, offsets, candidate range or argument.
    """
    query = _query(query, "query")
    db, offsets, candidates, threads = _common(db, offsets, candidates, aggregate, threads)
    qoff = np.array([0, query.shape[0]], dtype=np.int64)
    dist, qi, dj = _kernel.distances(query, qoff, db, offsets, candidates, aggregate, threads,
                                     True)
    return dist[0], qi[0], dj[0]


def patch_distances_batch(queries: np.ndarray, query_offsets: np.ndarray, db: np.ndarray,
                          offsets: np.ndarray, candidates: np.ndarray | None = None,
                          aggregate: str = "min", threads: int = 0) -> np.ndarray:
    """Distances from many multi-patch queries at once.

    ``queries`` is the concatenation of all queries' patches (float32 ``[sum nq, d]``) and
    ``query_offsets`` int64 ``[nQ + 1]`` delimits them (query q owns rows
    ``query_offsets[q]:query_offsets[q+1]``, at least one each). Each database tile is
    loaded once and scored against every query, so this is faster per query than calling
    :func:`patch_distances` in a loop. Other arguments as in :func:`patch_distances`.

    Returns:
        ``dist float32[nQ, m]``.
    """
    queries = _query(queries, "queries")
    query_offsets = _index(query_offsets, "query_offsets")
    db, offsets, candidates, threads = _common(db, offsets, candidates, aggregate, threads)
    dist, _, _ = _kernel.distances(queries, query_offsets, db, offsets, candidates, aggregate,
                                   threads, False)
    return dist


def patch_distances_each(queries: np.ndarray, query_offsets: np.ndarray, db: np.ndarray,
                         offsets: np.ndarray, candidates: np.ndarray, candidate_offsets: np.ndarray,
                         aggregate: str = "min", threads: int = 0
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Many multi-patch queries, each against its own candidate images, in one call.

    Query q (rows ``query_offsets[q]:query_offsets[q+1]`` of ``queries``, as in
    :func:`patch_distances_batch`) is scored against the images
    ``candidates[candidate_offsets[q]:candidate_offsets[q+1]]`` only (``candidate_offsets``
    int64 ``[nQ + 1]``, non-decreasing, from 0 to ``len(candidates)``). One thread team
    works through every (query, run of consecutive candidates) pair, so many small pools
    keep every thread busy; each query's results are exactly what :func:`patch_distances`
    gives it with its own candidates. Other arguments as in :func:`patch_distances`.

    Returns:
        ``(dist float32[len(candidates)], query_patch int32[...], db_patch int32[...])``,
        query q's at positions ``candidate_offsets[q]:candidate_offsets[q+1]``.
    """
    queries = _query(queries, "queries")
    query_offsets = _index(query_offsets, "query_offsets")
    candidate_offsets = _index(candidate_offsets, "candidate_offsets")
    db, offsets, candidates, threads = _common(db, offsets, candidates, aggregate, threads)
    if candidates is None:
        raise ValueError("candidates must be given (int64 image indices, one run per query)")
    return _kernel.distances_each(queries, query_offsets, db, offsets, candidates, candidate_offsets,
                                  aggregate, threads)


def summary() -> str:
    """Which native path runs, e.g. ``"retrieval._kernel avx2 (OpenMP, 2 threads)"``."""
    return _kernel.describe()
