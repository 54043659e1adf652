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

from .fileio import replacing

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


def write_segment(directory: Path, name: str, ids: np.ndarray, chunks: Iterable[np.ndarray],
                  patches: int, dim: int) -> None:
    """Write `seg` files from float vector chunks (in id order) totalling len(ids) * patches rows."""
    ids = np.asarray(ids, dtype=np.int64)
    rows = len(ids) * patches
    with replacing(directory / f"{name}.npy") as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=DTYPE, shape=(rows, dim))
        at = 0
        for chunk in chunks:
            out[at:at + len(chunk)] = chunk
            at += len(chunk)
        if at != rows:
            raise RuntimeError(f"segment {name}: {at} vector rows written, {rows} expected")
        out.flush()
        del out
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
