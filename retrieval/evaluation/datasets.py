"""Loaders for the standard image-retrieval benchmarks (docs/cli.md section 18).

``load_dataset(name, root)`` lists the files of a benchmark laid out as its
official archive unpacks and returns a :class:`Dataset`: the database images
present on disk, the queries present on disk and, for each query, its ground
truth as indices into ``Dataset.images``.  Loaders never open or decode an
image: only file names are read (plus the small ground-truth text/pickle
files).

Supported names and layouts
---------------------------
``holidays``   ``<root>/jpg/NNNNNN.jpg`` (``<root>/NNNNNN.jpg`` is accepted too).
               group = number // 100; the queries are the numbers with
               number % 100 == 0.  The database includes the queries; the
               query is removed from its own ranking at evaluation
               (official ``eval_holidays.py``).  ``Query.positives`` = the
               other images of the group, ``Query.junk`` is empty,
               ``Query.index`` = the query's own index in ``images``.
``ukbench``    ``<root>/full/ukbenchNNNNN.jpg`` (``<root>/ukbenchNNNNN.jpg``
               accepted too).  group = number // 4; every image is a query;
               ``Query.positives`` = its group *including itself*.
``oxford5k``,  every ``.jpg``/``.jpeg``/``.png`` anywhere under the root is a
``paris6k``    database image (image name = file stem); ground truth =
               ``*_query.txt`` / ``*_good.txt`` / ``*_ok.txt`` /
               ``*_junk.txt`` anywhere under the root.  Query lines look like
               ``oxc1_all_souls_000013 136.5 34.1 648.5 955.7`` (the ``oxc1_``
               prefix is stripped) or ``paris_defense_000605 x0 y0 x1 y1``.
               ``Query.positives`` = good + ok, ``Query.junk`` = junk.
``roxford5k``, images anywhere under the root as above, plus
``rparis6k``   ``<root>/gnd_roxford5k.pkl`` / ``<root>/gnd_rparis6k.pkl``
               (dict with ``imlist``, ``qimlist`` and ``gnd``: a list of
               dicts with ``bbx``, ``easy``, ``hard``, ``junk`` indexing
               ``imlist``).  The database is ``imlist`` restricted to what is on
               disk (the revisited query images are *not* in ``imlist``, so
               they are not database images).  ``Query.easy``, ``Query.hard``
               and ``Query.revisited_junk`` hold the per-protocol sets;
               ``Query.positives`` = easy + hard and ``Query.junk`` = junk,
               i.e. the Medium protocol.  The pickle is read with an
               unpickler that refuses every global (class or function).

Partial copies
--------------
The database is what is on disk; queries whose image is absent are left out
(``Dataset.missing_queries`` counts them); positives (and junk) absent from
disk are dropped from each present query's ground truth
(``Dataset.dropped_positives`` / ``Dataset.dropped_junk`` count them, summed
over the present queries).  For Holidays, which ships no ground-truth file,
the counts are exact when the official ``holidays_images.dat`` list is in the
root; otherwise they are inferred from gaps in the numbering (the official
numbering is contiguous within each group), a lower bound.  For UKBench the
counts cover the groups of which at least one image is present.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DATASETS",
    "Dataset",
    "Query",
    "load_dataset",
    "safe_load_pickle",
]

#: dataset name -> metric
DATASETS: dict[str, str] = {
    "holidays": "mAP",
    "ukbench": "ns",
    "oxford5k": "mAP",
    "paris6k": "mAP",
    "roxford5k": "mAP",
    "rparis6k": "mAP",
}

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

_HOLIDAYS_RE = re.compile(r"^(\d{6})\.jpg$", re.IGNORECASE)
_UKBENCH_RE = re.compile(r"^ukbench(\d{5})\.jpg$", re.IGNORECASE)


def _idx(values=()) -> np.ndarray:
    return np.asarray(sorted(set(int(v) for v in values)), dtype=np.int64)


@dataclass
class Query:
    """One benchmark query; every index refers to ``Dataset.images``."""

    name: str
    """``defense_1`` (Oxford/Paris original: the ground-truth file prefix),
    the image name (revisited: ``paris_defense_000605``), or the file stem
    (Holidays, UKBench)."""
    path: str
    """Absolute path of the query image."""
    bbox: tuple[float, float, float, float] | None
    """Query region ``(x0, y0, x1, y1)`` in pixels (Oxford/Paris), else None."""
    positives: np.ndarray
    """int64, sorted. original: good + ok; revisited: easy + hard (Medium);
    holidays: its group minus the query; ukbench: its group of 4 incl. itself."""
    junk: np.ndarray
    """int64, sorted; removed from the ranking before scoring."""
    easy: np.ndarray | None = None
    """revisited only: the ``easy`` set."""
    hard: np.ndarray | None = None
    """revisited only: the ``hard`` set."""
    revisited_junk: np.ndarray | None = None
    """revisited only: the ``junk`` set (before adding easy/hard per protocol)."""
    index: int | None = None
    """Index of the query image itself in ``Dataset.images`` when it is a
    database image (Holidays, UKBench, Oxford/Paris original), else None.
    Used for the Holidays self-exclusion."""


@dataclass
class Dataset:
    name: str
    root: str
    metric: str
    """``"mAP"`` or ``"ns"``."""
    images: list[str]
    """Absolute paths of the database images present on disk, sorted."""
    queries: list[Query]
    missing_queries: int = 0
    """Ground-truth queries whose image is not on disk."""
    dropped_positives: int = 0
    """Positives of the present queries that are not on disk (summed)."""
    dropped_junk: int = 0
    """Junk images of the present queries that are not on disk (summed)."""

    @property
    def revisited(self) -> bool:
        return self.name in ("roxford5k", "rparis6k")


# ---------------------------------------------------------------------------
# safe pickle


class _NoGlobalsUnpickler(pickle.Unpickler):
    def find_class(self, module, name):  # noqa: D401 - pickle API
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name}: ground-truth pickles "
            "may only hold dicts, lists, strings and numbers"
        )


def safe_load_pickle(path: str | os.PathLike):
    """Load a pickle that may only contain built-in containers and scalars.

    Any global (class, function: ``os.system``, ``numpy`` arrays, ...) raises
    ``pickle.UnpicklingError`` before anything is called.  Python 2 pickles
    are decoded with ``encoding="latin1"``.
    """
    data = Path(path).read_bytes()
    return _NoGlobalsUnpickler(io.BytesIO(data), encoding="latin1").load()


# ---------------------------------------------------------------------------
# helpers


def _check_root(root: str | os.PathLike) -> str:
    r = os.path.abspath(os.fspath(root))
    if not os.path.isdir(r):
        raise FileNotFoundError(f"dataset root is not a directory: {r}")
    return r


def _walk_files(root: str):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for f in sorted(filenames):
            yield dirpath, f


def _images_by_stem(root: str) -> dict[str, str]:
    """Map image stem -> absolute path for every image anywhere under root."""
    out: dict[str, str] = {}
    dups: list[str] = []
    for dirpath, f in _walk_files(root):
        stem, ext = os.path.splitext(f)
        if ext.lower() not in IMAGE_EXTENSIONS or f.startswith("."):
            continue
        p = os.path.join(dirpath, f)
        if stem in out:
            dups.append(f"{out[stem]} / {p}")
            continue
        out[stem] = p
    if dups:
        raise ValueError(
            f"image names must be unique under {root}; duplicated: "
            + "; ".join(dups[:5])
            + (f" (and {len(dups) - 5} more)" if len(dups) > 5 else "")
        )
    return out


def _strip_name(token: str) -> str:
    token = token.strip()
    stem, ext = os.path.splitext(token)
    if ext.lower() in IMAGE_EXTENSIONS:
        token = stem
    return token


def _read_names(path: str | None) -> list[str]:
    if path is None or not os.path.exists(path):
        return []
    with open(path, "r", encoding="utf-8", errors="replace") as fh:
        return [_strip_name(line.split()[0]) for line in fh if line.strip()]


def _numbered_images(root: str, subdir: str, pattern: re.Pattern) -> dict[int, str]:
    base = os.path.join(root, subdir)
    if not os.path.isdir(base):
        base = root
    out: dict[int, str] = {}
    for f in sorted(os.listdir(base)):
        m = pattern.match(f)
        if m and os.path.isfile(os.path.join(base, f)):
            out[int(m.group(1))] = os.path.join(base, f)
    if not out:
        raise ValueError(
            f"no images matching {pattern.pattern} in {base} "
            f"(expected layout: <root>/{subdir}/...)"
        )
    return out


# ---------------------------------------------------------------------------
# Holidays


def _load_holidays(root: str) -> Dataset:
    numbered = _numbered_images(root, "jpg", _HOLIDAYS_RE)
    nums = sorted(numbered, key=lambda n: numbered[n])
    images = [numbered[n] for n in nums]
    index_of = {n: i for i, n in enumerate(nums)}
    groups: dict[int, list[int]] = {}
    for n in nums:
        groups.setdefault(n // 100, []).append(n)

    # the full official list, when available, gives exact missing counts
    official: dict[int, list[int]] | None = None
    dat = os.path.join(root, "holidays_images.dat")
    if os.path.isfile(dat):
        official = {}
        for name in _read_names(dat):
            if name.isdigit():
                official.setdefault(int(name) // 100, []).append(int(name))

    queries: list[Query] = []
    missing_queries = dropped = 0
    all_groups = sorted(set(groups) | set(official or {}))
    for g in all_groups:
        present = sorted(groups.get(g, []))
        qnum = g * 100
        if official is not None:
            expected = set(official.get(g, [])) | set(present)
        else:
            # numbering is contiguous within a group: gaps are missing images
            expected = set(range(qnum, max(present) + 1)) if present else set()
        if qnum not in numbered:
            if qnum in expected or present:
                missing_queries += 1
            continue
        others = [n for n in present if n != qnum]
        dropped += len(expected - set(present) - {qnum})
        queries.append(
            Query(
                name=Path(numbered[qnum]).stem,
                path=numbered[qnum],
                bbox=None,
                positives=_idx(index_of[n] for n in others),
                junk=_idx(),
                index=index_of[qnum],
            )
        )
    queries.sort(key=lambda q: q.path)
    return Dataset("holidays", root, "mAP", images, queries, missing_queries, dropped)


# ---------------------------------------------------------------------------
# UKBench


def _load_ukbench(root: str) -> Dataset:
    numbered = _numbered_images(root, "full", _UKBENCH_RE)
    images = sorted(numbered.values())
    pos_of = {p: i for i, p in enumerate(images)}
    groups: dict[int, list[int]] = {}
    for n in numbered:
        groups.setdefault(n // 4, []).append(n)
    queries: list[Query] = []
    dropped = missing = 0
    for n in sorted(numbered, key=lambda k: numbered[k]):
        members = groups[n // 4]
        dropped += 4 - len(members)
        queries.append(
            Query(
                name=Path(numbered[n]).stem,
                path=numbered[n],
                bbox=None,
                positives=_idx(pos_of[numbered[m]] for m in members),
                junk=_idx(),
                index=pos_of[numbered[n]],
            )
        )
    for members in groups.values():
        missing += 4 - len(members)
    return Dataset("ukbench", root, "ns", images, queries, missing, dropped)


# ---------------------------------------------------------------------------
# Oxford5k / Paris6k (original protocol)


def _parse_query_line(path: str) -> tuple[str, tuple[float, float, float, float]]:
    with open(path, "r", encoding="utf-8", errors="replace") as fh:
        parts = fh.read().split()
    if len(parts) < 5:
        raise ValueError(f"{path}: expected 'name x0 y0 x1 y1', got {' '.join(parts)!r}")
    name = _strip_name(parts[0])
    if name.startswith("oxc1_"):
        name = name[len("oxc1_"):]
    try:
        bbox = tuple(float(v) for v in parts[1:5])
    except ValueError as e:
        raise ValueError(f"{path}: bad bounding box {parts[1:5]}") from e
    return name, bbox  # type: ignore[return-value]


def _load_original(name: str, root: str) -> Dataset:
    by_stem = _images_by_stem(root)
    if not by_stem:
        raise ValueError(f"no images (.jpg/.jpeg/.png) anywhere under {root}")
    images = sorted(by_stem.values())
    pos_of = {Path(p).stem: i for i, p in enumerate(images)}

    gt_files: dict[str, str] = {}
    for dirpath, f in _walk_files(root):
        if f.endswith("_query.txt"):
            qname = f[: -len("_query.txt")]
            if qname in gt_files:
                raise ValueError(
                    f"query {qname!r} has two ground-truth files: "
                    f"{gt_files[qname]} and {os.path.join(dirpath, f)}"
                )
            gt_files[qname] = os.path.join(dirpath, f)
    if not gt_files:
        raise ValueError(
            f"no *_query.txt ground-truth files anywhere under {root} "
            f"(expected e.g. gt/ or paris_120310/ for {name})"
        )

    queries: list[Query] = []
    missing = dropped = dropped_junk = 0
    for qname in sorted(gt_files):
        qfile = gt_files[qname]
        base = qfile[: -len("_query.txt")]
        image_name, bbox = _parse_query_line(qfile)
        if image_name not in pos_of:
            missing += 1
            continue
        pos_names = set(_read_names(base + "_good.txt")) | set(_read_names(base + "_ok.txt"))
        junk_names = set(_read_names(base + "_junk.txt"))
        pos = [pos_of[n] for n in pos_names if n in pos_of]
        junk = [pos_of[n] for n in junk_names if n in pos_of]
        dropped += len(pos_names) - len(pos)
        dropped_junk += len(junk_names) - len(junk)
        queries.append(
            Query(
                name=qname,
                path=images[pos_of[image_name]],
                bbox=bbox,
                positives=_idx(pos),
                junk=_idx(junk),
                index=pos_of[image_name],
            )
        )
    return Dataset(name, root, "mAP", images, queries, missing, dropped, dropped_junk)


# ---------------------------------------------------------------------------
# Revisited Oxford / Paris


def _as_index_list(v, what: str) -> list[int]:
    if v is None:
        return []
    if not isinstance(v, (list, tuple)):
        raise ValueError(f"{what}: expected a list of indices, got {type(v).__name__}")
    return [int(x) for x in v]


def _load_revisited(name: str, root: str) -> Dataset:
    pkl = os.path.join(root, f"gnd_{name}.pkl")
    if not os.path.isfile(pkl):
        raise ValueError(f"{name}: ground truth {pkl} not found (expected in the root)")
    cfg = safe_load_pickle(pkl)
    if not isinstance(cfg, dict) or not {"imlist", "qimlist", "gnd"} <= set(cfg):
        raise ValueError(f"{pkl}: expected a dict with 'imlist', 'qimlist' and 'gnd'")
    imlist = [_strip_name(str(s)) for s in cfg["imlist"]]
    qimlist = [_strip_name(str(s)) for s in cfg["qimlist"]]
    gnd = cfg["gnd"]
    if len(gnd) != len(qimlist):
        raise ValueError(f"{pkl}: {len(gnd)} gnd entries for {len(qimlist)} queries")

    by_stem = _images_by_stem(root)
    images = sorted(by_stem[n] for n in set(imlist) if n in by_stem)
    pos_of_path = {p: i for i, p in enumerate(images)}
    # gt index (into imlist) -> index into images, or -1 when absent
    remap = np.array(
        [pos_of_path[by_stem[n]] if n in by_stem else -1 for n in imlist], dtype=np.int64
    )

    def present(ids: list[int], what: str) -> tuple[np.ndarray, int]:
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= len(imlist)):
            raise ValueError(f"{pkl}: {what} index out of range of imlist")
        m = remap[arr] if arr.size else arr
        kept = m[m >= 0]
        return np.unique(kept).astype(np.int64), int(arr.size - kept.size)

    queries: list[Query] = []
    missing = dropped = dropped_junk = 0
    for qn, g in zip(qimlist, gnd):
        if qn not in by_stem:
            missing += 1
            continue
        where = f"{pkl} query {qn}"
        easy, d_e = present(_as_index_list(g.get("easy"), where), "easy")
        hard, d_h = present(_as_index_list(g.get("hard"), where), "hard")
        junk, d_j = present(_as_index_list(g.get("junk"), where), "junk")
        dropped += d_e + d_h
        dropped_junk += d_j
        bbx = g.get("bbx")
        bbox = tuple(float(v) for v in bbx[:4]) if bbx is not None and len(bbx) >= 4 else None
        path = by_stem[qn]
        queries.append(
            Query(
                name=qn,
                path=path,
                bbox=bbox,  # type: ignore[arg-type]
                positives=np.union1d(easy, hard).astype(np.int64),
                junk=junk,
                easy=easy,
                hard=hard,
                revisited_junk=junk,
                index=pos_of_path.get(path),
            )
        )
    return Dataset(name, root, "mAP", images, queries, missing, dropped, dropped_junk)


# ---------------------------------------------------------------------------


def load_dataset(name: str, root: str | os.PathLike) -> Dataset:
    """Load benchmark ``name`` (see the module docstring) from ``root``.

    Raises ``ValueError`` for an unknown name (the message lists the allowed
    ones) or malformed ground truth, ``FileNotFoundError`` when ``root`` is not
    a directory.
    """
    key = str(name).strip().lower()
    if key not in DATASETS:
        raise ValueError(
            f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}"
        )
    r = _check_root(root)
    if key == "holidays":
        return _load_holidays(r)
    if key == "ukbench":
        return _load_ukbench(r)
    if key in ("oxford5k", "paris6k"):
        return _load_original(key, r)
    return _load_revisited(key, r)
