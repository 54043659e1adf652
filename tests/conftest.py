"""Shared fixtures: generated images, a tiny random-init extractor, ../shared when present."""
from __future__ import annotations

import contextlib
import os
import select
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MOBILENET = SHARED / "weights" / "mobilenetv2-12-int8.onnx"

# Random-init ResNet-18 fed 64x64 windows: real network, real arithmetic, fast on 2 cores.
TINY_FLAGS = ["--backbone", "resnet18", "--weights", "none", "--input-spec", "size=64",
              "--levels", "1,2", "--pca-dim", "16", "--batch-size", "16", "--quiet"]


# Window vectors are stored in float16: an image's distance to itself is about 0.01
# (rounding of unit vectors, amplified by the square root near 0), not exactly 0.
SELF_DISTANCE = 0.03


def needs_shared(*parts: str):
    """Skip (with the reason) when a file or folder of ../shared is absent."""
    path = SHARED.joinpath(*parts)
    return pytest.mark.skipif(not path.exists(), reason=f"{path} is absent (../shared not mounted)")


def make_scene(seed: int, size=(160, 120)) -> Image.Image:
    """A distinct synthetic photo: coloured shapes on a gradient."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    bg = np.clip(rng.uniform(0, 255, 3) + xx[..., None] * rng.uniform(-1, 1, 3), 0, 255)
    img = Image.fromarray(bg.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(10):
        x0, y0 = int(rng.integers(0, w - 10)), int(rng.integers(0, h - 10))
        box = (x0, y0, x0 + int(rng.integers(8, 60)), y0 + int(rng.integers(8, 50)))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.integers(2) else draw.rectangle)(box, fill=fill)
    return img


@pytest.fixture
def image_dir(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        make_scene(i).save(folder / f"img{i}.jpg", quality=90)
    return folder


@pytest.fixture
def store_env(tmp_path, monkeypatch) -> Path:
    """Point the default feature store at a per-test file (never the user's cache)."""
    path = tmp_path / "features.sqlite"
    monkeypatch.setenv("RETRIEVAL_STORE", str(path))
    return path


def manifest_count(index_dir: Path) -> int:
    """Images committed to an index's manifest, read-only (0 while it does not exist yet)."""
    try:
        with sqlite3.connect(f"file:{index_dir / 'manifest.sqlite'}?mode=ro", uri=True, timeout=1) as conn:
            return conn.execute("SELECT COUNT(*) FROM images").fetchone()[0]
    except sqlite3.Error:
        return 0


def run_cli(*args: str, env: dict | None = None, timeout: int = 300,
            module: str = "retrieval.cli") -> subprocess.CompletedProcess:
    """Run `python -m retrieval.cli ...` the way a user runs `retrieval ...`
    (`module="classify.cli"` for `classify ...`)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True, text=True, env=full_env, timeout=timeout,
    )


@contextlib.contextmanager
def paused_at(args: list[str], point: str, n: int, workdir: Path, *, env: dict | None = None,
              timeout: float = 240) -> Iterator[subprocess.Popen]:
    """Run `args` with the pause hook set (retrieval/engine/pause.py) and yield the process
    while it is held the `n`-th time it reaches `point`: the caller knows exactly what it
    has done. Leaving the block lets it go on (the caller may have killed it instead);
    an error inside the block kills it. Fails, with its stderr, if it exits or times out
    before the point. Its output is in the files `proc.out_file` and `proc.err_file`."""
    fifo = workdir / f"pause-{point}-{n}-{time.monotonic_ns()}"
    os.mkfifo(fifo)
    # O_RDWR never blocks on Linux, and holding a reader lets the hook's open succeed.
    fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    full_env = {**os.environ, **(env or {}), "RETRIEVAL_PAUSE": f"{point}:{n}:{fifo}"}
    out_file, err_file = Path(f"{fifo}.stdout"), Path(f"{fifo}.stderr")
    proc = None
    try:
        with open(out_file, "w") as out, open(err_file, "w") as err:
            proc = subprocess.Popen(args, stdout=out, stderr=err, env=full_env)
        proc.out_file, proc.err_file = out_file, err_file
        deadline = time.monotonic() + timeout
        # Wait for the hook's line; wake up now and then only to notice an early exit.
        while not select.select([fd], [], [], 0.5)[0]:
            assert proc.poll() is None, f"exited ({proc.returncode}) before {point} {n}: {err_file.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"{point} {n} not reached in {timeout} s"
        assert os.read(fd, 256).decode() == f"{point} {n} {proc.pid}\n"
        yield proc
    except BaseException:
        if proc is not None:
            proc.kill()
            proc.wait()
        raise
    finally:
        os.close(fd)  # the hook goes on once no reader is left


def kill_at_pause(args: list[str], point: str, n: int, workdir: Path, *, env: dict | None = None,
                  timeout: float = 240) -> None:
    """Run `args` until it reaches `point` for the `n`-th time (`paused_at`) and SIGKILL it
    there: the caller then knows exactly what it had done."""
    with paused_at(args, point, n, workdir, env=env, timeout=timeout) as proc:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
