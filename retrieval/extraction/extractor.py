"""Images -> raw window descriptors, batched across images and windows.

A pipeline of overlapping stages: decoding, cropping and resizing run in worker threads
ahead of the network (Pillow releases the GIL); the network runs in its own thread on
full batches that mix windows of several images, and pools its outputs; each finished
image is yielded, in job order, to the caller's thread, which stores it while the
network runs on (ONNX Runtime and torch release the GIL). So an interrupted run loses
at most the images in flight, and the caller's SQLite connections stay in its thread.
`Extractor.timings` holds the seconds each stage was busy in the last `extract`.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
from functools import lru_cache
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from .. import config as _config
from ..blas import one_blas_thread
from ..config import ExtractorConfig, RuntimeConfig
from .images import ImageError, load_rgb_at_least
from .patches import RegionSet
from .progress import Progress

GEM_P = 3.0
# Modes whose network outputs are feature maps of the whole image, windows pooled later.
MAP_MODES = ("roi", "pyramid")
# Finished images the network thread may get ahead of the caller (who commits them), on top
# of one batch's worth: enough to ride out a slow commit and to hand over a whole batch of
# one-input images (roi) without waiting, few enough that an interrupted run has little
# in flight.
OUTPUT_AHEAD = 16
# PIL's counter-clockwise turns: lossless (pixels are moved, not resampled).
_TRANSPOSE = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}


@dataclass(frozen=True)
class Job:
    """One image to describe: `crop` (pixels x0, y0, x1, y1) restricts it to a box first,
    then `rotation` (0, 90, 180 or 270 degrees counter-clockwise) turns what is left."""

    path: str
    regions: tuple[RegionSet, ...]
    crop: tuple[float, float, float, float] | None = None
    tag: object = None
    rotation: int = 0


@dataclass
class Extracted:
    job: Job
    width: int
    height: int
    descriptors: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Skipped:
    path: str
    reason: str
    job: Job | None = None


class Extractor:
    """Turns images into raw (pooled, not yet normalized) descriptors of their windows.

    Parameters are stored only; the network is loaded on first use.

    >>> ex = Extractor(ExtractorConfig(backbone="resnet18", weights="none"))
    >>> for out in ex.extract([Job("a.jpg", (level_regions(1),))]): ...
    """

    def __init__(self, config: ExtractorConfig, runtime: RuntimeConfig | None = None) -> None:
        self.config = config
        self.runtime = runtime or RuntimeConfig()
        self._backbone = None
        self._load_lock = threading.Lock()
        self._key: str | None = None
        # Seconds per stage of the last extract (prepare: summed over decode threads;
        # network and pool: network thread; assemble and caller_waits: caller's thread).
        self.timings: collections.Counter = collections.Counter()

    @property
    def backbone(self):
        # Threads sharing an index may ask at once: the network is loaded once.
        with self._load_lock:
            if self._backbone is None:
                from .backbones import load_backbone

                self._backbone = load_backbone(self.config, self.runtime.device)
                mode = self.config.patch_mode
                if mode in MAP_MODES and self._backbone.output_kind != "map":
                    raise ValueError(
                        f"--patch-mode {mode} needs a convolutional feature map, but the chosen "
                        "layer/output is a vector; pick a conv layer or use --patch-mode crop"
                    )
                if mode == "pyramid" and not self._backbone.dynamic_size:
                    raise ValueError(
                        "--patch-mode pyramid feeds the image at several sizes and needs a network "
                        "that accepts any input size; this one is fixed (use --patch-mode crop)"
                    )
            return self._backbone

    def load(self) -> "Extractor":
        """Load the network now rather than on first use; raises on a bad configuration."""
        self.backbone  # noqa: B018 - the property loads and validates
        return self

    @property
    def key(self) -> str:
        if self._key is None:
            self._key = self.config.key()
        return self._key

    def summary(self) -> dict:
        """The configuration, the store key of its descriptors and what the network is."""
        return {**self.config.to_dict(), "key": self.key, "backbone_info": self.backbone.summary()}

    def extract(
        self, jobs: Iterable[Job], *, total: int | None = None, progress: bool = True, desc: str = "extract"
    ) -> Iterator[Extracted | Skipped]:
        """Describe every job; yields one Extracted or Skipped per job, in job order.

        A pipeline of three stages that overlap: worker threads decode and cut the images
        ahead of the network; a network thread fills batches with the windows of as many
        images as it takes (full batches) and pools what comes out; this generator, in the
        caller's thread, assembles each finished image and yields it, so whatever the caller
        does with it (commit it to SQLite, whose connections stay in their thread) runs while
        the network works on the next batches. At most `OUTPUT_AHEAD` + one batch of finished
        images wait for the caller; when it stops iterating, the other stages stop too, and an
        error in the network thread is raised here.
        """
        backbone = self.backbone
        size = (int(backbone.input_size[0]), int(backbone.input_size[1]))
        if self.config.roi_size and not backbone.dynamic_size:
            raise ValueError("--roi-size needs a network that accepts any input size; this one is fixed")
        mode, how = self.config.patch_mode, self.config.pool
        workers = self.runtime.workers  # 0: the network thread decodes and cuts between its batches
        batch_size = self.runtime.batch_size
        # Decoded inputs kept ready: the next two batches, and at least 4 images per thread.
        ahead_inputs, ahead_images = 2 * batch_size, max(4, 4 * workers)
        timings = self.timings = collections.Counter()
        pool = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="retrieval-decode") if workers else None
        submit = pool.submit if pool is not None else _Later
        done: queue.Queue = queue.Queue(maxsize=OUTPUT_AHEAD + batch_size)
        stop = threading.Event()
        roi_size = self.config.roi_size
        lock = threading.Lock()

        def prepare(job: Job):
            t0 = time.perf_counter()
            try:
                return _prepare(job, size, mode, roi_size)
            finally:
                with lock:
                    timings["prepare"] += time.perf_counter() - t0

        def hand_over(item) -> bool:
            """Queue one finished image (or the end, or an error) for the caller; False when told to stop."""
            while not stop.is_set():
                try:
                    done.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def network() -> None:
            in_flight: collections.deque[_Pending] = collections.deque()
            batch: list[np.ndarray] = []
            owners: list[tuple[_Pending, int]] = []

            def run_batch() -> None:
                # Inputs share a shape except in roi mode with --roi-size (aspect kept):
                # one forward pass per shape.
                by_shape: dict[tuple, list[int]] = {}
                for i, arr in enumerate(batch):
                    by_shape.setdefault(arr.shape, []).append(i)
                for members in by_shape.values():
                    t0 = time.perf_counter()
                    feats = backbone(np.stack([batch[i] for i in members]))
                    t1 = time.perf_counter()
                    for i, feat in zip(members, feats):
                        state, slot = owners[i]
                        state.outputs[slot] = feat if mode in MAP_MODES else _pool(feat, how)
                        state.left -= 1
                    timings["network"] += t1 - t0
                    timings["pool"] += time.perf_counter() - t1
                    timings["batches"] += 1
                    timings["inputs"] += len(members)
                batch.clear()
                owners.clear()

            def finished() -> bool:
                while in_flight and in_flight[0].left == 0:
                    if not hand_over(in_flight.popleft()):
                        return False
                return True

            futures: collections.deque[tuple[Job, cf.Future, int]] = collections.deque()
            queued = 0  # network inputs expected from the jobs in `futures`
            job_iter = iter(jobs)
            try:
                while not stop.is_set():
                    while (len(futures) < ahead_images or queued < ahead_inputs) and (
                        job := next(job_iter, None)
                    ) is not None:
                        futures.append((job, submit(prepare, job), _inputs_hint(job, mode)))
                        queued += futures[-1][2]
                    if not futures:
                        break
                    job, fut, hint = futures.popleft()
                    queued -= hint
                    t0 = time.perf_counter()
                    try:
                        image_size, inputs = fut.result()
                    except (ImageError, OSError, ValueError) as err:
                        reason = str(err) if isinstance(err, ImageError) else f"cannot decode: {err}"
                        in_flight.append(_Pending(job, (0, 0), 0, Skipped(job.path, reason, job)))
                        if not finished():
                            return
                        continue
                    finally:
                        timings["network_waits_input"] += time.perf_counter() - t0
                    state = _Pending(job, image_size, len(inputs))
                    in_flight.append(state)
                    for slot, arr in enumerate(inputs):
                        batch.append(arr)
                        owners.append((state, slot))
                        if len(batch) >= batch_size:
                            run_batch()
                            if not finished():
                                return
                    if not finished():  # an image without windows is done at once
                        return
                run_batch()
                if finished():
                    hand_over(_END)
            except BaseException as err:  # noqa: BLE001 - handed to the caller's thread, raised there
                hand_over(_Failure(err))

        thread = threading.Thread(target=network, name="retrieval-network", daemon=True)
        bar = Progress(total, desc, enabled=progress)
        thread.start()
        try:
            while True:
                t0 = time.perf_counter()
                state = done.get()
                timings["caller_waits"] += time.perf_counter() - t0
                if state is _END:
                    break
                if isinstance(state, _Failure):
                    raise state.error
                bar.update(1)
                if state.skipped:
                    yield state.skipped
                    continue
                t0 = time.perf_counter()
                out = Extracted(state.job, *state.size, state.assemble(mode, how))
                timings["assemble"] += time.perf_counter() - t0
                yield out
        finally:
            stop.set()
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
            thread.join()
            bar.close()


def _inputs_hint(job: Job, mode: str) -> int:
    """Network inputs `job` will give, as known before decoding: one per window, except
    roi (the whole image) and pyramid (the whole image at each scale its windows need)."""
    if mode == "roi":
        return 1
    if mode == "pyramid":
        return max(1, len(_layout_of(job.regions).needs))
    return max(1, sum(len(rs) for rs in job.regions))


class _Later:
    """A future-like for `--workers 0`: the work runs when its result is asked for."""

    __slots__ = ("fn", "args")

    def __init__(self, fn, *args) -> None:
        self.fn, self.args = fn, args

    def result(self):
        return self.fn(*self.args)


class _Failure:
    """An exception raised in the network thread, to be raised again in the caller's."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


_END = object()  # the network thread has handed over every job


class _Pending:
    """An image whose network inputs are queued; `outputs` fill in as batches run."""

    __slots__ = ("job", "size", "left", "skipped", "outputs")

    def __init__(self, job: Job, size: tuple[int, int], n_inputs: int, skipped: Skipped | None = None):
        self.job, self.size, self.left, self.skipped = job, size, n_inputs, skipped
        self.outputs: list = [None] * n_inputs

    def assemble(self, mode: str, how: str) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        if mode == "crop":
            start = 0
            for rs in self.job.regions:
                out[rs.name] = np.stack(self.outputs[start : start + len(rs)]).astype(np.float32)
                start += len(rs)
            return out
        if mode == "pyramid":
            # This runs while the network's threads hold the cores: BLAS threads would spin
            # against them (a 29-window pooling product took 25-50 ms with two threads and
            # 2-6 ms with one on the 2 loaded cores; benchmarks/results/describe.md).
            with one_blas_thread():
                return pyramid_pool(self.job.regions, self.outputs, how)
        whole = self.outputs[0]
        mirror = self.outputs[1] if len(self.outputs) > 1 else None
        for rs in self.job.regions:
            vecs = []
            for box, flip in zip(rs.boxes, rs.flips):
                if flip:
                    # Pooling is symmetric, so the mirrored window of box b is the mirror
                    # image's map pooled over the mirrored box.
                    x0, y0, x1, y1 = box
                    vecs.append(_roi_pool(mirror, (1 - x1, y0, 1 - x0, y1), how))
                else:
                    vecs.append(_roi_pool(whole, box, how))
            out[rs.name] = np.stack(vecs).astype(np.float32)
        return out


def _prepare(
    job: Job, size: tuple[int, int], mode: str, roi_size: int | None = None
) -> tuple[tuple[int, int], list[np.ndarray]]:
    """Decode one image and cut its network inputs (uint8 H x W x 3).

    crop: one input per window, in region-set order. roi: the whole image (at the
    network's size, or with its long side at `roi_size`), plus its mirror if any region
    set mirrors; windows are pooled from the feature map later. pyramid: the whole image
    resized to a square at each scale of `pyramid_plan` that a window needs (and mirrored
    where a mirrored window needs it), in the plan's order; the larger size is a square
    of side `roi_size`, or PYRAMID_RATIO times the network's input size.
    """
    img, full = load_rgb_at_least(job.path, decode_need(job, size, mode, roi_size))
    if job.crop is not None:
        x0, y0, x1, y1 = job.crop
        box = (max(0, int(x0)), max(0, int(y0)), min(img.width, int(round(x1))), min(img.height, int(round(y1))))
        if box[2] - box[0] < 1 or box[3] - box[1] < 1:
            raise ImageError(f"crop box {job.crop} is empty for a {img.width}x{img.height} image")
        img = img.crop(box)
        full = img.size
    if job.rotation:
        img = img.transpose(_TRANSPOSE[job.rotation])
        full = full[::-1] if job.rotation in (90, 270) else full
    # Windows are cut in the decoded image's pixels (fewer than `full` when a JPEG was
    # decoded at a reduced scale); the size reported is the full one.
    w, h = img.size
    out_h, out_w = size
    if mode == "pyramid":
        big_w = roi_size or round(out_w * _config.PYRAMID_RATIO)
        shapes = [(out_w, out_h), (big_w, max(32, round(out_h * big_w / out_w)))]
        inputs = []
        resized: dict[int, np.ndarray] = {}
        for scale_index, flip in _layout_of(job.regions).needs:
            if scale_index not in resized:
                resized[scale_index] = np.asarray(img.resize(shapes[scale_index], Image.BILINEAR))
            arr = resized[scale_index]
            inputs.append(np.ascontiguousarray(arr[:, ::-1]) if flip else arr)
        return full, inputs
    if mode == "roi":
        if roi_size:
            scale = roi_size / max(w, h)
            out_w, out_h = max(32, round(w * scale)), max(32, round(h * scale))
        whole = np.asarray(img.resize((out_w, out_h), Image.BILINEAR))
        inputs = [whole]
        if any(rs.flips.any() for rs in job.regions):
            inputs.append(np.ascontiguousarray(whole[:, ::-1]))
        return full, inputs
    scale = np.array([w, h, w, h], dtype=np.float64)
    inputs = []
    for rs in job.regions:
        for box, flip in zip(rs.boxes * scale, rs.flips):
            piece = img.resize((out_w, out_h), Image.BILINEAR, box=tuple(float(v) for v in box))
            if flip:
                piece = piece.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            inputs.append(np.asarray(piece))
    return full, inputs


def decode_need(
    job: Job, size: tuple[int, int], mode: str, roi_size: int | None = None
) -> tuple[float, float] | None:
    """The smallest upright image (width, height) from which every network input of `job`
    is cut by shrinking, never enlarging: a JPEG decoded at a reduced scale that keeps this
    much gives nearly the descriptors of the full decode. None (decode in full) when the
    job's crop box is in full-resolution pixels or it has no windows."""
    boxes = [rs.boxes for rs in job.regions if len(rs)]
    if job.crop is not None or not boxes:
        return None
    out_h, out_w = size
    if mode == "crop":
        sides = np.concatenate(boxes)
        need = (out_w / float((sides[:, 2] - sides[:, 0]).min()), out_h / float((sides[:, 3] - sides[:, 1]).min()))
    elif mode == "pyramid":
        big = roi_size or round(out_w * _config.PYRAMID_RATIO)
        larger = any(scale == 1 for scale, _ in _layout_of(job.regions).needs)
        need = (big, max(32, round(out_h * big / out_w))) if larger else (out_w, out_h)
    else:
        # roi keeps the aspect with --roi-size: its short side is not known before decoding.
        need = (roi_size, roi_size) if roi_size else (out_w, out_h)
    return need[::-1] if job.rotation in (90, 270) else need


def _pool(feat: np.ndarray, how: str) -> np.ndarray:
    """Pool one feature map [C, h, w] into a vector; a vector [C] passes through."""
    if feat.ndim == 1:
        return feat.astype(np.float32)
    flat = feat.reshape(feat.shape[0], -1)
    if how == "avg":
        return flat.mean(axis=1)
    if how == "max":
        return flat.max(axis=1)
    return _gem_root(np.mean(_gem_power(flat), axis=1))


def _gem_power(x: np.ndarray) -> np.ndarray:
    """GeM's first step, max(x, 1e-6) ** GEM_P, by multiplication for the default p = 3:
    the generic power is the bulk of pyramid's GeM pooling (7x avg's cost with `**`)."""
    x = np.maximum(x, np.float32(1e-6))
    if GEM_P != 3.0:
        return x ** GEM_P
    cube = np.multiply(x, x)
    return np.multiply(cube, x, out=cube)  # in place: one temporary of the map's size, not two


def _gem_root(x: np.ndarray) -> np.ndarray:
    """GeM's last step, x ** (1 / GEM_P)."""
    return np.cbrt(x) if GEM_P == 3.0 else x ** (1.0 / GEM_P)


def _roi_pool(fmap: np.ndarray, box, how: str) -> np.ndarray:
    """Pool the cells of a [C, h, w] map that a relative box covers (at least one cell)."""
    _, h, w = fmap.shape
    x0, y0, x1, y1 = box
    c0 = min(w - 1, int(np.floor(x0 * w + 1e-6)))
    r0 = min(h - 1, int(np.floor(y0 * h + 1e-6)))
    c1 = max(c0 + 1, int(np.ceil(x1 * w - 1e-6)))
    r1 = max(r0 + 1, int(np.ceil(y1 * h - 1e-6)))
    return _pool(fmap[:, r0:r1, c0:c1], how)


def pyramid_scales_of(box) -> tuple[int, ...]:
    """pyramid mode: the inputs a window is pooled from, 0 being the input at the network's
    size and 1 the larger one. (0,) when the window covers at least PYRAMID_WHOLE of the
    image side (geometric mean of its relative width and height: level 1), whose pooling
    from the network's size is crop's own descriptor; (0, 1) for every smaller window,
    whose two poolings are averaged (`pyramid_pool`). Depends on the box alone, so a
    window's descriptor is the same whichever other windows are extracted with it."""
    x0, y0, x1, y1 = (float(v) for v in box)
    side = np.sqrt(max(x1 - x0, 1e-9) * max(y1 - y0, 1e-9))
    return (0,) if side >= _config.PYRAMID_WHOLE - 1e-9 else (0, 1)


def pyramid_plan(regions) -> tuple[list[tuple[int, bool]], list[list[tuple[int, ...]]]]:
    """pyramid mode: the network inputs an image needs, as (scale index, mirrored) in
    ascending order, and for every region set the inputs each of its windows is pooled
    from (indices into the first list, in the order of `pyramid_scales_of`)."""
    layout = _layout_of(regions)
    return list(layout.needs), [list(per_set) for per_set in layout.where]  # copies: the layout is shared


def _layout_of(regions: Sequence[RegionSet]) -> "_PyramidLayout":
    return _pyramid_layout(_regions_key(regions))


def _regions_key(regions: Sequence[RegionSet]) -> tuple:
    """What a pyramid layout depends on: the windows and their mirror flags (not the
    names: a region set cut to some of its windows keeps its name)."""
    return tuple((np.asarray(rs.boxes, np.float64).tobytes(), np.asarray(rs.flips, bool).tobytes()) for rs in regions)


@dataclass(frozen=True)
class _PyramidLayout:
    """Everything about an image's pyramid that depends on its region sets alone, worked
    out once per region sets rather than per image (the Python loops over windows cost
    an eighth of the pyramid's CPU beside the network; benchmarks/results/describe.md)."""

    needs: tuple  # network inputs, (scale index, mirrored), ascending
    where: tuple  # per region set, per window: the inputs it is pooled from
    boxes: np.ndarray  # [n, 4] every window, mirrored ones as boxes of the mirrored input
    columns: tuple  # per depth k: ((input, window rows, their boxes), ...) for the k-th input of windows
    counts: np.ndarray  # [n, 1] inputs per window
    ends: np.ndarray  # where each region set's windows end


@lru_cache(maxsize=64)
def _pyramid_layout(key: tuple) -> _PyramidLayout:
    regions = [(np.frombuffer(b, np.float64).reshape(-1, 4), np.frombuffer(f, bool)) for b, f in key]
    windows = [[(pyramid_scales_of(box), bool(flip)) for box, flip in zip(boxes, flips)] for boxes, flips in regions]
    needs = sorted({(scale, flip) for per_set in windows for scales, flip in per_set for scale in scales})
    slot = {need: i for i, need in enumerate(needs)}
    where = [[tuple(slot[(scale, flip)] for scale in scales) for scales, flip in per_set] for per_set in windows]
    slots = [s for per_set in where for s in per_set]
    boxes = np.concatenate([b for b, _ in regions]) if regions else np.zeros((0, 4))
    flips = np.concatenate([f for _, f in regions]) if regions else np.zeros(0, bool)
    boxes[flips] = boxes[flips][:, [2, 1, 0, 3]] * [-1, 1, -1, 1] + [1, 0, 1, 0]
    depth = max((len(s) for s in slots), default=1)
    columns = []
    for k in range(depth):
        column = np.array([s[k] if k < len(s) else -1 for s in slots], dtype=np.int64)
        members = [np.flatnonzero(column == i) for i in np.unique(column[column >= 0])]
        columns.append(tuple((int(column[m[0]]), m, _boxes_key(boxes[m])) for m in members))
    counts = np.array([len(s) for s in slots], np.float32)[:, None]
    ends = np.cumsum([len(per_set) for per_set in where])
    boxes.flags.writeable = counts.flags.writeable = ends.flags.writeable = False
    return _PyramidLayout(tuple(needs), tuple(tuple(w) for w in where), boxes, tuple(columns), counts, ends)


def pyramid_pool(regions: Sequence[RegionSet], maps: list[np.ndarray], how: str) -> dict[str, np.ndarray]:
    """pyramid mode: the [n, C] descriptors of every region set's windows, by name, from
    the maps of the image's inputs (in the order of `pyramid_plan`). A window pooled from
    two maps gets the mean of the two L2-normalised poolings at the norm of the first (the
    network's size), so that every level keeps the scale of level 1 for the whitening; the
    average beat the larger map alone on UKBench, Paris and rParis
    (benchmarks/results/describe.md). Every window a map gives is pooled in one product:
    per region set, GeM's power of the same map was computed again for each level."""
    layout = _layout_of(regions)
    n = len(layout.boxes)
    channels = maps[0].shape[0] if n else 0
    vecs = np.zeros((len(layout.columns), n, channels), np.float32)
    for k, column in enumerate(layout.columns):
        for slot, members, boxes in column:
            vecs[k, members] = _area_pool_many(maps[slot], boxes, how)
    if len(layout.columns) > 1:
        norms = np.linalg.norm(vecs, axis=2, keepdims=True)
        unit = vecs / np.maximum(norms, 1e-12)
        vecs = (norms[0] * unit.sum(axis=0) / layout.counts)[None].astype(np.float32, copy=False)
    return {rs.name: part for rs, part in zip(regions, np.split(vecs[0], layout.ends[:-1]))}


def _cell_weights(n: int, lo: float, hi: float) -> np.ndarray:
    """How much of each of n equal cells over [0, 1] the interval [lo, hi] covers,
    normalised to sum 1 (the nearest cell when the interval is empty)."""
    edges = np.arange(n + 1) / n
    w = np.clip(np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo), 0.0, None)
    if w.sum() <= 0:
        w = np.zeros(n)
        w[min(n - 1, max(0, int((lo + hi) / 2 * n)))] = 1.0
    return w / w.sum()


@lru_cache(maxsize=256)
def _window_weights(h: int, w: int, boxes: tuple) -> np.ndarray:
    """[h * w, n] cell weights of n relative boxes over an h x w map (cached: every image
    of a collection asks for the same few)."""
    weights = np.stack(
        [np.outer(_cell_weights(h, y0, y1), _cell_weights(w, x0, x1)).ravel() for x0, y0, x1, y1 in boxes], axis=1
    ).astype(np.float32)
    weights.flags.writeable = False
    return weights


def _boxes_key(boxes: np.ndarray) -> tuple:
    return tuple(tuple(float(v) for v in box) for box in boxes)


def _area_pool_many(fmap: np.ndarray, boxes: np.ndarray | tuple, how: str) -> np.ndarray:
    """`_area_pool` of many boxes of one map, [n, C]: avg and GeM as one matrix product.
    `boxes` as an array, or as `_boxes_key` gives them (what the weights are cached by)."""
    if how == "max":
        return np.stack([_area_pool(fmap, box, how) for box in boxes]).astype(np.float32)
    c, h, w = fmap.shape
    weights = _window_weights(h, w, boxes if isinstance(boxes, tuple) else _boxes_key(boxes))
    flat = fmap.reshape(c, h * w).astype(np.float32, copy=False)
    if how == "avg":
        return (flat @ weights).T
    return _gem_root((_gem_power(flat) @ weights).T)


def _area_pool(fmap: np.ndarray, box, how: str) -> np.ndarray:
    """Pool a [C, h, w] map over a relative box with fractional cells: each cell weighs by
    the part of it the box covers (avg and GeM); max takes the cells the box covers at
    least half of along each axis (the most covered one when none is)."""
    _, h, w = fmap.shape
    x0, y0, x1, y1 = (float(v) for v in box)
    wy, wx = _cell_weights(h, y0, y1), _cell_weights(w, x0, x1)
    if how == "max":
        rows = wy * h * (y1 - y0) >= 0.5 - 1e-6 if y1 > y0 else wy > 0
        cols = wx * w * (x1 - x0) >= 0.5 - 1e-6 if x1 > x0 else wx > 0
        rows = rows if rows.any() else wy == wy.max()
        cols = cols if cols.any() else wx == wx.max()
        return fmap[:, rows][:, :, cols].reshape(fmap.shape[0], -1).max(axis=1)
    if how == "avg":
        return np.einsum("chw,h,w->c", fmap, wy, wx, optimize=True).astype(np.float32)
    return _gem_root(np.einsum("chw,h,w->c", _gem_power(fmap), wy, wx, optimize=True)).astype(np.float32)
