"""Helpers of the `retrieval serve` tests: a tiny index, a server process, multipart bodies."""
from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Iterator

from conftest import make_scene
from retrieval import ExtractorConfig, Index, InputSpec, RuntimeConfig, SearchConfig

CONFIG = ExtractorConfig(backbone="resnet18", weights="none", input_spec=InputSpec(size=(64, 64)))
SEARCH = SearchConfig(levels=(1, 2), pca_dim=16)


def build_tiny_index(root: Path, n: int = 6) -> tuple[Path, list[Path]]:
    """An index of `n` synthetic scenes (random-init ResNet-18 on 64 px windows) under root."""
    images = root / "images"
    images.mkdir(parents=True)
    paths = []
    for i in range(n):
        path = images / f"img{i}.jpg"
        make_scene(i).save(path, quality=90)
        paths.append(path)
    index = root / "idx"
    with Index.create(index, CONFIG, SEARCH, store=root / "features.sqlite",
                      runtime=RuntimeConfig(batch_size=16)) as idx:
        idx.add([str(p) for p in paths], progress=False)
    return index, paths


@contextlib.contextmanager
def serve_process(index: Path, *extra: str, timeout: float = 180) -> Iterator[str]:
    """Run `retrieval serve INDEX --port 0` on 127.0.0.1; yield its base URL; stop it.

    The server prints the address it listens on once the index is loaded; waiting for
    that line (within `timeout`) is the readiness check. Leaving the block sends SIGINT
    and requires a clean exit.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "retrieval.cli", "serve", str(index), "--host", "127.0.0.1", "--port", "0", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    seen: list[str] = []
    url = None
    try:
        deadline = time.monotonic() + timeout
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                continue
            match = re.search(r"on (http://127\.0\.0\.1:\d+/)", seen[-1])
            url = match.group(1) if match else None
        assert url, f"server did not start within {timeout} s (exit {proc.poll()}): {''.join(seen)}"
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise AssertionError("server did not stop within 30 s of SIGINT")
    assert proc.returncode == 0, f"server exited {proc.returncode}: {''.join(seen)}"


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    """Encode a multipart/form-data body; returns (body, content type)."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data) in files.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"
        )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def http(url: str, body: bytes | None = None, content_type: str | None = None, timeout: float = 60) -> tuple[int, bytes]:
    """GET (or POST `body`) over plain HTTP; returns (status, body) for errors too."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type} if content_type else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def http_json(url: str, **kwargs) -> tuple[int, dict]:
    status, body = http(url, **kwargs)
    return status, json.loads(body)
