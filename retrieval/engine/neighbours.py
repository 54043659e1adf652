"""Database-side augmentation: every image's nearest images, computed once per collection.

`neighbours.npz` in the index folder holds, for each image of the generation it was
computed on, its `k` nearest other images and their distances (the index's own query
levels and image distance). At query time an image's distance is averaged with its
neighbours' (alpha-QE weights), so an image whose view of the object is poor is lifted
by its better views: DBA (Arandjelovic & Zisserman) in the distance domain, where a
window set needs no averaged descriptor. It is a derived file like the others but not
part of a published state: `retrieval dba` (re)computes it; images added later are
scored without augmentation until then, and removed images simply drop out.
"""
from __future__ import annotations

import collections
import json
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import EXACT_LIMIT
from ..fileio import replacing

FILE = "neighbours.npz"
# Searches share what they read: the lists of this many index folders, each as long as its
# file is the version read.
SHARED_LISTS = 8
_shared: collections.OrderedDict = collections.OrderedDict()
_shared_lock = threading.Lock()
# Meta key: the lists were asked for (`retrieval dba`, `duplicates`), so the writer keeps
# them current even above the exact limit, where each image costs a candidate search.
ASKED = "asked"


@dataclass
class Neighbours:
    """`ids` (sorted int64 [m]); `neighbours` int64 [m, k] (-1 = none) and their `distances`."""

    ids: np.ndarray
    neighbours: np.ndarray
    distances: np.ndarray
    meta: dict

    @property
    def k(self) -> int:
        return int(self.neighbours.shape[1])

    def rows(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, whether listed) of each image id; the row of an unlisted id is meaningless."""
        pos = np.minimum(np.searchsorted(self.ids, ids), max(len(self.ids) - 1, 0))
        known = (self.ids[pos] == ids) if len(self.ids) else np.zeros(len(ids), bool)
        return pos, known

    def widen(self, pool: np.ndarray, k: int) -> np.ndarray:
        """`pool` plus the first k neighbours of its images (sorted, unique)."""
        pos, known = self.rows(pool)
        more = self.neighbours[pos[known], :k].ravel()
        return np.unique(np.concatenate([pool, more[more >= 0]]))

    def augment(self, ids: np.ndarray, dist: np.ndarray, k: int, alpha: float) -> np.ndarray:
        """Each image's distance averaged with its first k neighbours' (weight 1 for its own,
        alpha-QE weight of the neighbour's distance to it for each neighbour). Neighbours
        not among `ids` (removed, or not candidates) are left out."""
        pos, known = self.rows(ids)
        nb = np.where(known[:, None], self.neighbours[pos, :k], -1)
        weight = qe_weight(self.distances[pos, :k], alpha) * (nb >= 0)
        order = np.argsort(ids, kind="stable")
        at = np.minimum(np.searchsorted(ids[order], nb), len(ids) - 1)
        found = ids[order][at] == nb
        weight = weight * found
        their = dist[order][at]
        total = dist.astype(np.float64) + (weight * their).sum(axis=1)
        return (total / (1.0 + weight.sum(axis=1))).astype(np.float32)

    def save(self, directory: Path) -> None:
        with replacing(Path(directory) / FILE, suffix=".tmp.npz") as tmp:
            np.savez(tmp, ids=self.ids, neighbours=self.neighbours, distances=self.distances,
                     meta=np.array(json.dumps(self.meta)))

    @staticmethod
    def remove(directory: Path) -> None:
        """Delete the stored lists (none stored: nothing to do)."""
        (Path(directory) / FILE).unlink(missing_ok=True)

    @classmethod
    def load(cls, directory: Path) -> "Neighbours | None":
        """The stored neighbours, None when none were computed; ValueError if the file is bad."""
        path = Path(directory) / FILE
        try:
            with np.load(path, allow_pickle=False) as data:
                out = cls(data["ids"].astype(np.int64), data["neighbours"].astype(np.int64),
                          data["distances"].astype(np.float32), json.loads(str(data["meta"])))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, EOFError) as err:
            raise ValueError(f"{path}: unreadable ({err}); recompute it with `retrieval dba`") from None
        if out.neighbours.shape != (len(out.ids), out.neighbours.shape[1]) or out.distances.shape != out.neighbours.shape:
            raise ValueError(f"{path}: malformed; recompute it with `retrieval dba`")
        return out


def shared_lists(directory: Path) -> Neighbours | None:
    """`Neighbours.load` for searches: each version of the file read once and shared, its
    arrays read-only. Re-reading it took 20 ms a query at 100,000 images (its size grows
    with the collection). The writer replaces the file whole, so (inode, size, mtime)
    names a version."""
    path = Path(directory) / FILE
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    version = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    with _shared_lock:
        known = _shared.get(path)
        if known is not None and known[0] == version:
            _shared.move_to_end(path)
            return known[1]
    found = Neighbours.load(directory)
    if found is not None:
        for array in (found.ids, found.neighbours, found.distances):
            array.flags.writeable = False
        with _shared_lock:
            _shared[path] = (version, found)
            _shared.move_to_end(path)
            while len(_shared) > SHARED_LISTS:
                _shared.popitem(last=False)
    return found


def lists_for_reranking(directory: Path, generation: int) -> tuple["Neighbours | None", str | None, str | None]:
    """(lists, note, error): the stored lists of the index at `directory` (None when there
    are none or they cannot be read, `error` then saying why), and why re-ranking of its
    published `generation` cannot average every image with its neighbours (None when the
    lists are current).

    The rule (docs/reranking.md): with no lists a search re-ranks by query expansion
    alone; with lists of an earlier generation the images added since are scored without
    their neighbours. Either way the answer says so rather than fail: the lists are a
    derived file the next `add`, `remove` or `retrieval dba` writes."""
    fix = f"`retrieval dba {directory}` computes them"
    try:
        found = shared_lists(directory)
    except ValueError as err:
        return None, f"re-ranked by query expansion only: {err}", str(err)
    if found is None:
        return None, (f"re-ranked by query expansion only: {directory} has no neighbour lists (the writer keeps "
                      f"them up to {EXACT_LIMIT} images from the next add or remove on, above that once asked for); "
                      f"{fix}"), None
    if found.meta.get("generation") != generation:
        return found, (f"the neighbour lists of {directory} are from an earlier state: images added since are "
                       f"re-ranked without their neighbours until the writer brings the lists up to date; {fix} "
                       f"again"), None
    return found, None, None


def qe_weight(dist: np.ndarray, alpha: float) -> np.ndarray:
    """alpha-QE weight of images at window-set distance `dist`: (1 - d^2/2)^alpha, >= 0.

    1 - d^2/2 is the cosine similarity two unit vectors at Euclidean distance d have.
    """
    return np.clip(1.0 - np.asarray(dist, np.float64) ** 2 / 2.0, 0.0, 1.0) ** alpha
