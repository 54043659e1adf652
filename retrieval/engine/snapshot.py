"""The published state of an index, and a reader's view of it.

`state.json` names every derived file of one published generation: the whitening, the
segments, the tombstones (images removed since their segment was written) and the FAISS
structure. A writer writes new files under new names, then replaces `state.json` in one
atomic rename, then deletes the files no state names any more. A reader loads
`state.json` once and maps the files it names, so it answers from one consistent
generation while a writer works (readers on a snapshot, as in Lucene); a file deleted
between the two steps only makes the reader load the newer state.
"""
from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .ann import VectorIndex
from ..fileio import write_text
from .pause import pause_hook
from .segments import DamagedFile, Segment, load_npy, open_segment
from .whitening import PCAWhitening

STATE = "state.json"
READAHEAD_BYTES = 8 << 20
# Segments are read ahead only when they fit in this share of MemAvailable (memory not
# held by processes, page cache included): they are a query server's working set, but
# must not push out what the machine needs.
WARM_MEMORY_FRACTION = 0.8
_DERIVED = re.compile(r"^(whitening-\d+\.npz|seg-\d+(\.ids)?\.npy|dead-\d+\.npy|ann-\d+\.faiss"
                      r"|layout-\d+\.faiss|vectors-\d+\.npy|ids-\d+\.npy|faiss-\d+\.index|whitening\.npz|.*\.tmp(\.npz)?)$")


@dataclass
class State:
    """What one published generation consists of (the content of state.json)."""

    generation: int = -1
    images: int = 0
    next: int = 0
    whitening: dict | None = None  # {"file", "images": collection size when fitted, "source"}
    segments: list[dict] = field(default_factory=list)  # [{"name", "images"}]
    dead: dict | None = None  # {"file", "count"}
    ann: dict | None = None  # {"file", "factory", "auto", "windows", "images", "layout": file or None,
    #                           "warning": why it was trained on too few windows, or None}
    note: str | None = None  # why a structure the user asked for is not in use yet

    def new_name(self, prefix: str, suffix: str = "") -> str:
        self.next += 1
        return f"{prefix}-{self.next}{suffix}"

    def files(self) -> set[str]:
        names = {s["name"] + ext for s in self.segments for ext in (".npy", ".ids.npy")}
        for part in (self.whitening, self.dead, self.ann):
            if part:
                names.add(part["file"])
        if self.ann and self.ann.get("layout"):
            names.add(self.ann["layout"])
        return names

    @property
    def rows(self) -> int:
        """Images in segments, removed ones included."""
        return sum(s["images"] for s in self.segments)


def read_state(directory: Path) -> State | None:
    """The published state, None if none was published; DamagedFile if state.json is bad."""
    path = directory / STATE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise DamagedFile(path, f"not valid JSON ({err})") from None
    try:
        state = State(**data)
        int(state.generation), int(state.next)
        for s in state.segments:
            str(s["name"]), int(s["images"])
        for part in (state.whitening, state.dead, state.ann):
            if part is not None:
                str(part["file"])
    except (TypeError, KeyError, ValueError) as err:
        raise DamagedFile(path, f"malformed ({err})") from None
    return state


def publish(directory: Path, state: State) -> None:
    """Make `state` the published one (atomic), then delete derived files it does not name."""
    paused = pause_hook("publish")  # a test's kill point (retrieval/engine/pause.py); None in use
    if paused is not None:
        paused()
    write_text(directory / STATE, json.dumps(state.__dict__, indent=1))
    keep = state.files()
    for path in directory.iterdir():
        if _DERIVED.match(path.name) and path.name not in keep:
            path.unlink(missing_ok=True)


class View:
    """A reader's handle on one published state: whitening, segments, tombstones, FAISS."""

    def __init__(self, directory: Path, state: State, patches: int, device: str = "auto") -> None:
        self.directory, self.state, self.patches, self.device = directory, state, patches, device
        self.whitening: PCAWhitening | None = None
        self.segments: list[Segment] = []
        self._ann: VectorIndex | None = None
        self._layout: VectorIndex | None = None
        # Threads searching this view at once load each structure once between them.
        self._faiss_lock = threading.Lock()
        if state.whitening is not None:
            path = directory / state.whitening["file"]
            try:
                self.whitening = PCAWhitening.load(path)
            except ValueError as err:
                raise DamagedFile(path, str(err)) from None
            dim = self.whitening.output_dim
            self.segments = [open_segment(directory, s["name"], s["images"], patches, dim) for s in state.segments]
        self.dead = np.sort(load_npy(directory / state.dead["file"], mmap=False)) if state.dead else np.empty(0, np.int64)
        ids = [s.ids for s in self.segments]
        all_ids = np.concatenate(ids) if ids else np.empty(0, np.int64)
        self._order = np.argsort(all_ids, kind="stable")
        self._sorted = all_ids[self._order]
        self._segment_of = np.repeat(np.arange(len(ids), dtype=np.int64), [len(i) for i in ids])
        self._row_of = np.concatenate([np.arange(len(i), dtype=np.int64) for i in ids]) if ids else all_ids
        self._live_rows: dict[int, np.ndarray | None] = {}
        self._offsets: dict[int, np.ndarray] = {}

    @property
    def images(self) -> int:
        return len(self._sorted) - len(self.dead)

    @property
    def ann(self) -> VectorIndex | None:
        """The FAISS structure, loaded on first use (a large one is hundreds of MB)."""
        with self._faiss_lock:
            if self._ann is None and self.state.ann is not None:
                self._ann = self._load_faiss("file", "factory")
            return self._ann

    @property
    def layout(self) -> VectorIndex | None:
        """The layout index (one laid-out vector per image), loaded on first use; None
        where the state has none (one window per image)."""
        with self._faiss_lock:
            if self._layout is None and self.state.ann is not None and self.state.ann.get("layout"):
                self._layout = self._load_faiss("layout", "layout_factory")
            return self._layout

    def _load_faiss(self, file_key: str, factory_key: str) -> VectorIndex:
        path = self.directory / self.state.ann[file_key]
        try:
            return VectorIndex.load(path, self.state.ann[factory_key], self.device)
        except ValueError as err:
            raise DamagedFile(path, str(err)) from None

    def warm(self, wait: bool = False) -> int:
        """Load the FAISS structures (and what searches them) and ask the OS to read the
        segments into its page cache.

        Candidates' rows are scattered over every segment, so a query on a cold cache
        pays a disk read per candidate (measured at 1,000,000 images:
        benchmarks/results/scale.md). The read-ahead runs in a background thread and only
        when the segments fit in WARM_MEMORY_FRACTION of the memory available.
        Returns the bytes asked for (0 when they do not fit).
        """
        for structure in (self.ann, self.layout):
            if structure is not None:
                structure.prepare()
        paths = [Path(s.vectors.filename) for s in self.segments]
        total = sum(p.stat().st_size for p in paths if p.exists())
        if not total or total > WARM_MEMORY_FRACTION * _available_memory():
            return 0

        def readahead() -> None:
            # Plain reads: POSIX_FADV_WILLNEED reads only the first few MB of a file
            # (measured: 8 MB of 1 GB), and mapped pages would count in our RSS.
            buffer = bytearray(READAHEAD_BYTES)
            for path in paths:
                try:
                    with open(path, "rb", buffering=0) as fh:
                        while fh.readinto(buffer):
                            pass
                except OSError:
                    pass  # a newer generation deleted it: that reader warms its own
        thread = threading.Thread(target=readahead, name="retrieval-readahead", daemon=True)
        thread.start()
        if wait:
            thread.join()
        return total

    def live_ids(self) -> np.ndarray:
        """The sorted ids of the images of this generation (removed ones left out)."""
        return self._sorted[~np.isin(self._sorted, self.dead)] if len(self.dead) else self._sorted.copy()

    def live_rows(self, segment: int) -> np.ndarray | None:
        """Image rows of a segment that are not removed; None when all are live."""
        if segment not in self._live_rows:
            ids = self.segments[segment].ids
            dead = np.isin(ids, self.dead) if len(self.dead) else np.zeros(len(ids), bool)
            self._live_rows[segment] = np.flatnonzero(~dead).astype(np.int64) if dead.any() else None
        return self._live_rows[segment]

    def offsets(self, segment: int) -> np.ndarray:
        """Kernel row offsets of a segment's images (image i owns rows i*P .. (i+1)*P-1)."""
        if segment not in self._offsets:
            self._offsets[segment] = np.arange(self.segments[segment].images + 1, dtype=np.int64) * self.patches
        return self._offsets[segment]

    def locate(self, image_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(segment, row) of each live image id; ids not in this state are dropped."""
        image_ids = np.asarray(image_ids, dtype=np.int64)
        if len(self.dead):
            image_ids = image_ids[~np.isin(image_ids, self.dead)]
        pos = np.searchsorted(self._sorted, image_ids)
        pos = np.minimum(pos, max(len(self._sorted) - 1, 0))
        found = (len(self._sorted) > 0) & (self._sorted[pos] == image_ids) if len(self._sorted) else np.zeros(len(image_ids), bool)
        hit = self._order[pos[found]]
        return self._segment_of[hit], self._row_of[hit]

    def windows(self, image_id: int, rows: np.ndarray | None = None) -> np.ndarray:
        """The window vectors of one live image (float32 [P, d]; only `rows` of them if given)."""
        segment, row = self.locate(np.array([image_id]))
        if not len(segment):
            raise KeyError(f"image {image_id} is not in this generation")
        seg, at = self.segments[int(segment[0])], int(row[0]) * self.patches
        vectors = np.asarray(seg.vectors[at:at + self.patches], dtype=np.float32)
        return vectors if rows is None else vectors[rows]


def _available_memory() -> int:
    """MemAvailable in bytes (0 when /proc/meminfo cannot tell)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
