"""Extraction on a Ray cluster: Ray Data describes the images, the driver stores them.

`RayExtractor` is an `Extractor` whose `extract` sends the jobs through Ray Data instead
of running the network here: `from_items` -> `map_batches` with a stateful class (one
network per actor, images read and decoded in the actor) -> `iter_batches`, streamed back
in job order. Everything downstream (`features.describe`: store commit per image, the
manifest, publishing, skipped reports) is the same code as for a local run, so the
interruption and resume guarantees are unchanged: images already in the store never
become jobs, and a killed driver loses only the images in flight.

Placement: on a cluster with GPUs, one actor per GPU (`num_gpus=1`); otherwise one actor
per node holding all of that node's CPUs (the networks use every core of the process, so
one actor per core would oversubscribe them). An actor that dies is restarted by Ray
Data and its unfinished batches are retried (`max_restarts=-1`, `max_task_retries=-1`,
Ray Data's defaults for actor pools).

Every node must read the input paths (a shared file system), as with any Ray Data read.
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import Iterable, Iterator

import numpy as np

from ..cluster import connect
from ..config import ConfigError, ExtractorConfig, RuntimeConfig
from .extractor import Extracted, Extractor, Job, Skipped
from .patches import region_set
from .progress import Progress

# Images per Ray task: enough windows for several network batches, few enough that a dead
# actor costs little (its in-flight tasks are retried) and the bar moves smoothly.
IMAGES_PER_TASK = 16
# Tasks queued on an actor beyond the running one: hides the hand-over between tasks; a
# dead actor costs at most this many tasks' images, which are retried.
IN_FLIGHT_PER_ACTOR = 2


class RayExtractor(Extractor):
    """An `Extractor` whose network runs in Ray actors; `runtime.ray` names the cluster."""

    def __init__(self, config: ExtractorConfig, runtime: RuntimeConfig) -> None:
        if not runtime.ray:
            raise ValueError("RayExtractor needs runtime.ray (local, auto or an address)")
        super().__init__(config, runtime)

    def load(self) -> "RayExtractor":
        """Check the configuration here (a bad layer fails before anything is written) and
        join the cluster, so that a wrong address is a usage error too."""
        super().load()
        connect(self.runtime.ray)
        return self

    def extract(
        self, jobs: Iterable[Job], *, total: int | None = None, progress: bool = True, desc: str = "extract"
    ) -> Iterator[Extracted | Skipped]:
        """Describe every job on the cluster; yields one Extracted or Skipped per job, in job order."""
        jobs = list(jobs)
        if not jobs:
            return
        ray = connect(self.runtime.ray)
        from ray.data import DataContext

        placement = _placement(ray, self.runtime.device)
        worker_runtime = RuntimeConfig(device=placement["device"], batch_size=self.runtime.batch_size,
                                       workers=self.runtime.workers)
        context = DataContext.get_current()
        saved = context.execution_options.preserve_order, context.enable_progress_bars
        # Our bar counts finished images over the whole cluster; Ray's own bars would print
        # per-operator lines on top of it.
        context.execution_options.preserve_order, context.enable_progress_bars = True, False
        # No execution plan per run on stderr, nor the notice that Ray's bars are off.
        loggers = {name: logging.getLogger(name) for name in ("ray.data", "ray.data._internal.progress")}
        levels = {name: log.level for name, log in loggers.items()}
        loggers["ray.data"].setLevel(logging.WARNING)
        loggers["ray.data._internal.progress"].setLevel(logging.ERROR)
        bar = Progress(len(jobs), f"{desc} (ray: {placement['actors']} actors)", enabled=progress)
        try:
            items = [
                {"seq": seq, "path": job.path, "regions": ",".join(rs.name for rs in job.regions),
                 "crop": list(job.crop) if job.crop is not None else [math.nan] * 4}
                for seq, job in enumerate(jobs)
            ]
            tasks = -(-len(items) // IMAGES_PER_TASK)
            with warnings.catch_warnings():
                # `max_restarts` (in `_dataset`) is how Ray Data 2.60 documents turning actor restarts
                # off, but it has no named parameter for it yet and warns that such keywords
                # are deprecated.
                warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
                ds = self._dataset(ray, items, tasks, placement, worker_runtime)
            waiting: dict[int, Extracted | Skipped] = {}
            expected = 0
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for seq, width, height, data, error in zip(
                    batch["seq"].tolist(), batch["width"].tolist(), batch["height"].tolist(), batch["data"], batch["error"]
                ):
                    waiting[seq] = _result(jobs[seq], width, height, data, str(error))
                while expected in waiting:
                    bar.update(1)
                    yield waiting.pop(expected)
                    expected += 1
            if expected != len(jobs):
                raise RuntimeError(f"Ray returned {expected} of {len(jobs)} images")
        finally:
            context.execution_options.preserve_order, context.enable_progress_bars = saved
            for name, level in levels.items():
                loggers[name].setLevel(level)
            bar.close()


    def _dataset(self, ray, items: list[dict], tasks: int, placement: dict, worker_runtime: RuntimeConfig):
        """The Ray Data pipeline describing `items` on `placement['actors']` actors."""
        return ray.data.from_items(items, override_num_blocks=tasks).map_batches(
            _Describer,
            fn_constructor_args=(self.config.to_dict(), worker_runtime),
            batch_size=IMAGES_PER_TASK,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=min(placement["actors"], tasks),
                                               max_tasks_in_flight_per_actor=IN_FLIGHT_PER_ACTOR),
            num_cpus=placement["num_cpus"],
            num_gpus=placement["num_gpus"] or None,
            # On one machine a dead actor is the machine's trouble, not a lost node that a
            # restart would fix; with restarts on, Ray also prints an error line on every run
            # about restarting actors whose arguments sit in the object store.
            **({"max_restarts": 0} if self.runtime.ray == "local" else {}),
        )


def _placement(ray, device: str) -> dict:
    """How many actors, with which resources, for the cluster as it is now."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if device == "cuda" and not gpus:
        raise ConfigError("--device cuda: the Ray cluster has no GPUs")
    if gpus and device != "cpu":
        return {"actors": gpus, "num_cpus": 1, "num_gpus": 1, "device": "cuda"}
    nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) >= 1]
    if not nodes:
        raise ConfigError("the Ray cluster has no node with a CPU to run the network on")
    return {"actors": len(nodes), "num_cpus": int(min(nodes)), "num_gpus": 0, "device": "cpu"}


def _result(job: Job, width: int, height: int, data: bytes, error: str) -> Extracted | Skipped:
    if error:
        return Skipped(job.path, error, job)
    sizes = [len(rs) for rs in job.regions]
    stacked = np.frombuffer(data, dtype=np.float32).reshape(sum(sizes), -1)
    descriptors, start = {}, 0
    for rs, n in zip(job.regions, sizes):
        descriptors[rs.name] = stacked[start:start + n].copy()
        start += n
    return Extracted(job, int(width), int(height), descriptors)


class _Describer:
    """A Ray Data actor: one network, describing batches of images it reads and decodes itself."""

    def __init__(self, config: dict, runtime: RuntimeConfig) -> None:
        self.extractor = Extractor(ExtractorConfig.from_dict(config), runtime).load()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        jobs = [
            Job(str(path), tuple(region_set(name) for name in str(regions).split(",")),
                None if np.isnan(crop).any() else tuple(float(v) for v in crop))
            for path, regions, crop in zip(batch["path"], batch["regions"], batch["crop"])
        ]
        width, height, data, error = [], [], [], []
        for out in self.extractor.extract(jobs, progress=False):
            if isinstance(out, Skipped):
                width.append(0), height.append(0), data.append(b""), error.append(out.reason)
                continue
            stacked = np.concatenate([out.descriptors[rs.name] for rs in out.job.regions]).astype(np.float32)
            width.append(out.width), height.append(out.height), data.append(stacked.tobytes()), error.append("")
        return {
            "seq": batch["seq"],
            "width": np.array(width, np.int64),
            "height": np.array(height, np.int64),
            "data": np.array(data, dtype=object),
            "error": np.array(error, dtype=object),
        }
