"""Descriptors through the feature store: extract only what the store does not hold.

This is the one place where the store and the extractor meet; the index, the classifier
and the benchmarks all get their descriptors through `describe`.
"""
from __future__ import annotations

import errno
import sys
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..config import file_digest
from ..fileio import STORAGE_ERRNOS, storage_message
from .extractor import Extractor, Job, Skipped
from .patches import RegionSet, region_set
from .store import FeatureStore, stored_form

Crop = tuple[float, float, float, float]


@dataclass
class ImageFeatures:
    """Raw descriptors of one image: `descriptors[region_name]` is float32 [n, C]."""

    path: str
    digest: str
    width: int
    height: int
    descriptors: dict[str, np.ndarray]
    crop: Crop | None = None
    extracted: bool = False  # False when every region set came from the store
    rotation: int = 0  # degrees counter-clockwise the (cropped) image was turned; width/height are after it


def describe(
    items: Iterable[str | tuple[str, Crop | None] | tuple[str, Crop | None, int]],
    extractor: Extractor,
    store: FeatureStore,
    regions: Sequence[str | RegionSet],
    *,
    progress: bool = True,
    desc: str = "extract",
    digests: dict[str, str] | None = None,
    keep: bool | None = True,
) -> Iterator[ImageFeatures | Skipped]:
    """Yield the descriptors of every item (a path, (path, crop box in pixels), or
    (path, crop, rotation): the crop turned by 0/90/180/270 degrees counter-clockwise).

    Store hits are yielded first, then extractions as they finish; each extraction is
    committed to the store before it is yielded. Unreadable inputs come out as Skipped.
    `digests` maps paths whose content digest the caller has already computed.
    `keep=None` commits extractions only where the store can take them (queries: a store
    on a read-only mount or a full disk still answers; a full one says so once on stderr).
    """
    digests = digests or {}
    sets = [r if isinstance(r, RegionSet) else region_set(r) for r in regions]
    names = [rs.name for rs in sets]
    key = extractor.key
    if keep is None and store.read_only:
        if store.refused.errno != errno.EROFS:  # a read-only mount is expected to keep nothing
            _say_not_kept(store.refused)
        keep = False
    if keep is not False:
        keep = _kept(keep, lambda: store.register_config(key, extractor.config.to_dict()))
    misses: dict[str, Job] = {}
    twins: dict[str, list[str]] = {}  # digest -> further paths with the same content
    for item in items:
        path, crop, rotation = (item, None, 0) if isinstance(item, str) else (*item, 0)[:3]
        try:
            digest = digests.get(path) or file_digest(path)
        except FileNotFoundError:
            yield Skipped(path, "file not found")
            continue
        except IsADirectoryError:
            yield Skipped(path, "is a directory")
            continue
        except OSError as err:
            yield Skipped(path, f"cannot read: {err.strerror or err}")
            continue
        if crop is not None:
            digest = f"{digest}:crop:{','.join(f'{v:.1f}' for v in crop)}"
        if rotation:
            # A turned image has other descriptors (and a swapped size): its own store key.
            digest = f"{digest}:rot:{rotation}"
        if digest in misses:
            twins.setdefault(digest, []).append(path)
            continue
        found = store.get(digest, key, names)
        size = store.image_size(digest) if found else None
        if size is not None and len(found) == len(names):
            yield ImageFeatures(path, digest, size[0], size[1], found, crop, rotation=rotation)
            continue
        missing = tuple(rs for rs in sets if rs.name not in found)
        misses[digest] = Job(path, missing, crop, tag=(digest, found), rotation=rotation)
    if not misses:
        return
    jobs = list(misses.values())
    for out in extractor.extract(jobs, total=len(jobs), progress=progress, desc=desc):
        digest = out.job.tag[0]
        paths = [out.job.path, *twins.get(digest, [])]
        if isinstance(out, Skipped):
            for path in paths:
                yield Skipped(path, out.reason, out.job)
            continue
        found = out.job.tag[1]
        stored = {name: stored_form(a) for name, a in out.descriptors.items()}
        if keep is not False:
            keep = _kept(keep, lambda: store.put(digest, key, out.width, out.height, stored))
        # What the store now returns, so this run and every later one see the same numbers.
        descriptors = {**found, **{name: a.astype(np.float32) for name, a in stored.items()}}
        for path in paths:
            yield ImageFeatures(path, digest, out.width, out.height, descriptors, out.job.crop, True, out.job.rotation)


def _kept(keep: bool | None, write) -> bool | None:
    """Run a store write; with `keep=None`, a write the storage refuses (full disk) is
    said on stderr and turns keeping off (False) for the rest of the call."""
    try:
        write()
    except OSError as err:
        message = storage_message(err)
        if keep is not None or message is None:
            raise
        _say_not_kept(err)
        return False
    return keep


def _say_not_kept(err: OSError) -> None:
    print(f"retrieval: warning: the descriptors extracted now are not kept in the store "
          f"({STORAGE_ERRNOS[err.errno]}: {err.filename})", file=sys.stderr)
