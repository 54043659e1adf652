"""Whole-file replacement: the one way derived files of an index are written; and what a
refused write (full disk, read-only mount) is called, wherever it happens."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path
from typing import Iterator

NEARLY_FULL_BYTES = 1 << 20
# Writes the storage refused: the disk, not the program or the data, is what to fix.
STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for this file system (or the process's file size limit)",
    errno.EROFS: "read-only file system",
}


def storage_message(err: BaseException) -> str | None:
    """"no space left on device: PATH" (and the like) for a write the storage refused, with
    what to do; None for any other error."""
    if not isinstance(err, OSError) or err.errno not in STORAGE_ERRNOS:
        return None
    where = f": {err.filename}" if err.filename else ""
    if err.errno == errno.EROFS:
        return (f"{STORAGE_ERRNOS[err.errno]}{where}; it can be read (query, info, serve) but not changed "
                "here: copy the index (and its store) to a writable place to change it")
    return (f"{STORAGE_ERRNOS[err.errno]}{where}; free some space there (or choose another place) and run "
            "the same command again: everything committed so far is kept")


def sqlite_storage_error(err: sqlite3.Error, path: str | Path) -> OSError | None:
    """The OSError an SQLite error stands for when the storage refused a write (the database
    or its journal is full, or on a read-only file system), naming `path`; None otherwise."""
    code = getattr(err, "sqlite_errorcode", None)
    primary = None if code is None else code & 0xFF  # extended codes keep the primary in the low byte
    # A write of the WAL index (-shm) that finds the disk full is reported as an I/O error,
    # without the errno: a nearly full file system says which it was.
    if primary == sqlite3.SQLITE_FULL or (primary == sqlite3.SQLITE_IOERR and _nearly_full(Path(path).parent)):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    if primary == sqlite3.SQLITE_READONLY:
        return OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
    return None


def connect_read_only(path: str | Path) -> sqlite3.Connection:
    """Open an SQLite database in a directory this process cannot write (a read-only mount).

    A WAL database needs its `-shm` index beside it: when a writer elsewhere has it open,
    it is used (`mode=ro`); when there is none, no writer can be changing the file and
    it is opened as immutable. A `-wal` log left without its index (a writer killed on
    a machine that then mounted the folder read-only) would be ignored by that, so it
    is refused, naming the file, rather than read without its last changes."""
    path = Path(path)
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA schema_version").fetchone()  # the file is opened on first use
        return conn
    except sqlite3.OperationalError:
        conn.close()
    wal = Path(f"{path}-wal")
    if wal.exists() and wal.stat().st_size > 0:
        raise sqlite3.OperationalError(
            f"{path} is on a read-only file system and {wal.name} holds changes not yet written into it; "
            "open it once where it can be written (any `retrieval info` does), then mount it read-only again"
        )
    return sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True, timeout=60, isolation_level=None, check_same_thread=False)


def _nearly_full(directory: Path) -> bool:
    """Less room left than SQLite needs to grow a WAL and its index by a step."""
    try:
        return shutil.disk_usage(directory).free < NEARLY_FULL_BYTES
    except OSError:
        return False


def writable(directory: str | Path) -> bool:
    """Whether this process may create files in `directory` (False on a read-only mount)."""
    return os.access(directory, os.W_OK)


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
    except OSError as err:
        if err.filename is not None:
            raise
        # A failed write() names no file: name the one being written. numpy's short write
        # ("N requested and M written") does not even keep the errno; a nearly full file
        # system says which it was.
        code = err.errno if err.errno is not None else errno.ENOSPC if _nearly_full(path.parent) else None
        if code is None:
            raise OSError(f"{err}: {path}") from err
        raise OSError(code, os.strerror(code), str(path)) from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    """Replace `path` with `text`, atomically."""
    with replacing(path) as tmp:
        Path(tmp).write_text(text)
