"""One SQLite connection per thread, for the feature store and an index's manifest.

An `Index` is shared by the threads of a service, and a `sqlite3.Connection` may only
be used by one thread at a time. Each thread gets its own connection on first use: in
WAL mode readers never wait for the writer (nor for each other), and each reads the last
committed transaction. `setup` (schema, migrations) runs on the first connection only,
so a reader thread arriving while another thread writes does not queue behind it.
"""
from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Callable


class ThreadConnections:
    """Connections to one SQLite file, one per thread, all closed by `close()`."""

    def __init__(self, path: Path, setup: Callable[[sqlite3.Connection], None],
                 connect: Callable[[Path], sqlite3.Connection] | None = None) -> None:
        """`connect` opens one connection (default: read-write); it must allow `close()`
        from another thread (`check_same_thread=False`)."""
        self.path = path
        self._setup: Callable[[sqlite3.Connection], None] | None = setup
        self._connect = connect or _read_write
        self._lock = threading.Lock()
        self._local = threading.local()
        self._by_thread: dict[int, sqlite3.Connection] = {}

    def get(self) -> sqlite3.Connection:
        """This thread's connection (opened now if it has none; `setup`'s errors pass on)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        with self._lock:
            self._close_orphans()
            # Opened for this thread only, but closable by `close()` from any thread.
            conn = self._connect(self.path)
            try:
                if self._setup is not None:
                    self._setup(conn)
                    self._setup = None
            except BaseException:
                conn.close()
                raise
            self._by_thread[threading.get_ident()] = conn
        self._local.conn = conn
        return conn

    def _close_orphans(self) -> None:
        """Close the connections of threads that have ended (a server's pool may replace
        its threads), and any left under this thread's id by an ended thread."""
        alive = {t.ident for t in threading.enumerate()} - {threading.get_ident()}
        for ident in [i for i in self._by_thread if i not in alive]:
            self._by_thread.pop(ident).close()

    def close(self) -> None:
        """Close every thread's connection; a later `get` opens a new one."""
        with self._lock:
            for conn in self._by_thread.values():
                conn.close()
            self._by_thread.clear()
            self._local = threading.local()


class SQLiteFile:
    """Base of the feature store and the manifest: `conn` is the calling thread's
    connection, the first one opened by `_open_connections` (which picks read-write or
    read-only), and `close()` closes them all (a later `conn` opens again). A
    `sqlite3.DatabaseError` on opening becomes the subclass's `_damaged` error."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conns: ThreadConnections | None = None

    def _open_connections(self) -> ThreadConnections:
        raise NotImplementedError

    def _damaged(self, err: sqlite3.DatabaseError) -> Exception:
        raise NotImplementedError

    def _opened(self) -> ThreadConnections:
        with self._lock:
            if self._conns is None:
                self._conns = self._open_connections()
            return self._conns

    @property
    def conn(self) -> sqlite3.Connection:
        """The calling thread's connection (each thread has its own)."""
        try:
            return self._opened().get()
        except sqlite3.DatabaseError as err:
            raise self._damaged(err) from err

    def close(self) -> None:
        with self._lock:
            if self._conns is not None:
                self._conns.close()
                self._conns = None


def _read_write(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn
