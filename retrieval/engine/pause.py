"""A test hook: stop a writer at a named point, so a test knows where it kills it.

Normal use never sets it, and then it costs one environment look-up per `Index.add` and
per publish. A test sets, in the writer process's environment,

    RETRIEVAL_PAUSE=POINT:N:FIFO

POINT is one of `POINTS`, N >= 1 and FIFO the path of a named pipe the test made
(`os.mkfifo`) and holds open for reading (on Linux `os.open(fifo, os.O_RDWR)` never
blocks). The N-th time this process reaches POINT, it opens FIFO for writing, writes one
line `POINT N PID`, and then waits, doing nothing else, until the test closes its end of
the FIFO; then it goes on as if nothing happened. In between the test may kill it
(SIGKILL), knowing exactly what the process had done. Every other time it reaches a
point, and every point of another name, does nothing. A malformed value (ValueError)
or a FIFO nobody holds open for reading (OSError) is an error, never ignored or waited
on: a test must neither pass because its pause never fired nor hang.

Points (counted per process, from 1):
- `committed`: `Index.add` has committed an image to the manifest (the N-th image this
  process added, so N images after a fresh build's N-th) and published nothing for it.
- `publish`: a writer has written every derived file of a new generation and is about
  to replace `state.json` (`snapshot.publish`): the files exist, nothing names them.
"""
from __future__ import annotations

import os
import select

ENV = "RETRIEVAL_PAUSE"
POINTS = ("committed", "publish")
_reached: dict[str, int] = {}


def pause_hook(point: str):
    """A callable to run each time `point` is reached, or None when no pause is set for
    it (the usual case: the caller then skips the call entirely)."""
    value = os.environ.get(ENV)
    if not value:
        return None
    name, n, fifo = _parse(value)
    if name != point:
        return None

    def reached() -> None:
        _reached[point] = _reached.get(point, 0) + 1
        if _reached[point] == n:
            _wait(fifo, f"{point} {n} {os.getpid()}\n")

    return reached


def _parse(value: str) -> tuple[str, int, str]:
    name, _, rest = value.partition(":")
    count, _, fifo = rest.partition(":")
    if name not in POINTS or not count.isdigit() or int(count) < 1 or not fifo:
        raise ValueError(f"{ENV}={value!r}: expected POINT:N:FIFO with POINT one of {', '.join(POINTS)} and N >= 1")
    return name, int(count), fifo


def _wait(fifo: str, line: str) -> None:
    # Non-blocking: with no reader this fails (ENXIO) instead of waiting for one forever.
    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, line.encode())
        poller = select.poll()
        poller.register(fd, 0)  # a FIFO's write end reports POLLERR once no reader is left
        while not poller.poll():
            pass
    finally:
        os.close(fd)
