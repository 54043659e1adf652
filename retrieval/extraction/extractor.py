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
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from ..blas import one_blas_thread
from ..config import ExtractorConfig, RuntimeConfig
from .images import ImageError
from .inputs import Job, prepare_inputs
from .pooling import pool_map, pyramid_layout, pyramid_pool, roi_pool
from .progress import Progress

# Modes whose network outputs are feature maps of the whole image, windows pooled later.
MAP_MODES = ("roi", "pyramid")
# Finished images the network thread may get ahead of the caller (who commits them), on top
# of one batch's worth: enough to ride out a slow commit and to hand over a whole batch of
# one-input images (roi) without waiting, few enough that an interrupted run has little
# in flight.
OUTPUT_AHEAD = 16


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
        mode, how, average = self.config.patch_mode, self.config.pool, self.config.pyramid_average
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
                return prepare_inputs(job, size, mode, roi_size)
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
                        state.outputs[slot] = feat if mode in MAP_MODES else pool_map(feat, how)
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
                out = Extracted(state.job, *state.size, state.assemble(mode, how, average))
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
        return max(1, len(pyramid_layout(job.regions).needs))
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

    def assemble(self, mode: str, how: str, average: str) -> dict[str, np.ndarray]:
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
                return pyramid_pool(self.job.regions, self.outputs, how, average)
        whole = self.outputs[0]
        mirror = self.outputs[1] if len(self.outputs) > 1 else None
        for rs in self.job.regions:
            vecs = []
            for box, flip in zip(rs.boxes, rs.flips):
                if flip:
                    # Pooling is symmetric, so the mirrored window of box b is the mirror
                    # image's map pooled over the mirrored box.
                    x0, y0, x1, y1 = box
                    vecs.append(roi_pool(mirror, (1 - x1, y0, 1 - x0, y1), how))
                else:
                    vecs.append(roi_pool(whole, box, how))
            out[rs.name] = np.stack(vecs).astype(np.float32)
        return out
