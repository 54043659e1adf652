"""Segment files: the whitened window vectors of a batch of images, written once.

A segment `seg-N` is two files: `seg-N.npy`, float16 [images * P, d] (image i owns rows
i*P .. (i+1)*P - 1, the kernel reads float16 directly), and `seg-N.ids.npy`, the int64
manifest ids of its images in row order. Segments are never modified: new images go to
a new segment, removed images stay until their segment is rewritten by a merge or a
compaction (Lucene's design), and every file is written under a temporary name,
fsynced and renamed, so a reader only ever sees whole files.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from ..fileio import replacing

DTYPE = np.float16


class DamagedFile(Exception):
    """A derived file of an index is missing, truncated or malformed."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


@dataclass
class Segment:
    """One opened segment: ids [n] and memory-mapped vectors [n * P, d]."""

    name: str
    ids: np.ndarray
    vectors: np.ndarray

    @property
    def images(self) -> int:
        return len(self.ids)

    def read(self, images: np.ndarray, patches: int) -> np.ndarray:
        """The rows of the given image positions (sorted), read with plain file reads.

        Bulk passes (merges, FAISS appends) read this way instead of through the memory
        map: mapped pages count in the process's resident memory until the kernel drops
        them, and a pass over a million images would touch every page of 15 GB.
        """
        images = np.asarray(images, dtype=np.int64)
        dim = self.vectors.shape[1]
        if not len(images):
            return np.empty((0, dim), DTYPE)
        width = patches * dim

        def span(first: int, last: int) -> np.ndarray:
            fh.seek(self.vectors.offset + first * width * np.dtype(DTYPE).itemsize)
            return np.fromfile(fh, dtype=DTYPE, count=(last - first) * width).reshape(last - first, width)

        first, last = int(images[0]), int(images[-1]) + 1
        with open(self.vectors.filename, "rb") as fh:
            if last - first > 2 * len(images):  # scattered (a sample): one read per image
                return np.concatenate([span(i, i + 1) for i in images.tolist()]).reshape(-1, dim)
            return span(first, last)[images - first].reshape(-1, dim)


def write_segment(directory: Path, name: str, ids: np.ndarray, chunks: Iterable[np.ndarray],
                  patches: int, dim: int) -> None:
    """Write `seg` files from float vector chunks (in id order) totalling len(ids) * patches rows.

    Streamed with plain writes rather than into a writable memory map, whose dirty pages
    would count in the writer's resident memory for the whole (up to 15 GB) file.
    """
    ids = np.asarray(ids, dtype=np.int64)
    rows = len(ids) * patches
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(DTYPE)), "fortran_order": False, "shape": (rows, dim)}
    with replacing(directory / f"{name}.npy") as tmp, open(tmp, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        at = 0
        for chunk in chunks:
            chunk = np.ascontiguousarray(chunk, dtype=DTYPE)
            if chunk.ndim != 2 or chunk.shape[1] != dim:
                raise RuntimeError(f"segment {name}: a chunk of shape {chunk.shape}, expected (n, {dim})")
            fh.write(chunk.tobytes())
            at += len(chunk)
        if at != rows:
            raise RuntimeError(f"segment {name}: {at} vector rows written, {rows} expected")
        fh.flush()
    save_npy(directory / f"{name}.ids.npy", ids)


def open_segment(directory: Path, name: str, images: int, patches: int, dim: int) -> Segment:
    """Open a segment read-only (memory-mapped), checking it is whole: DamagedFile if not."""
    ids_path, vec_path = directory / f"{name}.ids.npy", directory / f"{name}.npy"
    ids = load_npy(ids_path, mmap=False)
    if ids.dtype != np.int64 or ids.shape != (images,):
        raise DamagedFile(ids_path, f"holds {ids.dtype} {ids.shape}, expected int64 ({images},)")
    vectors = load_npy(vec_path, mmap=True)
    if vectors.dtype != DTYPE or vectors.shape != (images * patches, dim):
        raise DamagedFile(vec_path, f"holds {vectors.dtype} {vectors.shape}, expected float16 {(images * patches, dim)}")
    return Segment(name, ids, vectors)


def load_npy(path: Path, mmap: bool) -> np.ndarray:
    """np.load that names the file when it is missing, truncated or not an array."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise DamagedFile(path, "missing") from None
    except (OSError, ValueError, EOFError) as err:
        raise DamagedFile(path, f"unreadable ({err})") from None


def save_npy(path: Path, array: np.ndarray) -> None:
    """Write an array atomically (temp file, fsync, rename)."""
    with replacing(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)
