"""Whole-file replacement: the one way derived files of an index are written."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def replacing(path: str | Path, suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temporary path beside `path`; when the block ends without error, fsync it
    and rename it over `path`, so a reader (or a process killed midway) never sees half a
    file. The temporary file is removed on error. `suffix` must keep any extension a
    writer insists on (np.savez appends ".npz" otherwise)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    """Replace `path` with `text`, atomically."""
    with replacing(path) as tmp:
        Path(tmp).write_text(text)
