"""The list of images in an index: the index's source of truth, one SQLite transaction per change.

Each committed change bumps `generation`. Everything else in the index directory
(whitened vectors, the FAISS index) is derived from the manifest plus the feature store
and is stamped with the generation it was built for, so a stale or half-written derived
file is detected and rebuilt rather than trusted.
"""
from __future__ import annotations

import errno
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..connections import SQLiteFile, ThreadConnections
from ..fileio import connect_read_only, sqlite_storage_error, writable


@dataclass(frozen=True)
class Entry:
    id: int
    path: str
    digest: str
    width: int
    height: int


class ManifestError(RuntimeError):
    """manifest.sqlite is not a readable SQLite database."""


def _create_schema(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(
        """
        CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE IF NOT EXISTS images (
            id INTEGER PRIMARY KEY AUTOINCREMENT, path TEXT NOT NULL UNIQUE,
            digest TEXT NOT NULL, width INTEGER NOT NULL, height INTEGER NOT NULL);
        CREATE INDEX IF NOT EXISTS images_digest ON images (digest);
        INSERT OR IGNORE INTO meta VALUES ('generation', '0');
        """
    )


def _check_readable(conn: sqlite3.Connection) -> None:
    conn.execute("SELECT value FROM meta WHERE key='generation'").fetchone()


class Manifest(SQLiteFile):
    """The images of an index. Any thread may use it: each gets its own connection
    (`retrieval/connections.py`)."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self.refused: OSError | None = None  # why it is open for reading only

    @property
    def read_only(self) -> bool:
        """Whether the index directory cannot be written (a read-only mount): the manifest is
        then only read, never created, upgraded or changed."""
        return self.path.exists() and not writable(self.path.parent)

    def _open_connections(self) -> ThreadConnections:
        if self.read_only:
            return self._open_for_reading(OSError(errno.EROFS, os.strerror(errno.EROFS), str(self.path)))
        conns = ThreadConnections(self.path, _create_schema)
        try:
            conns.get()
        except sqlite3.DatabaseError as err:
            conns.close()
            storage = sqlite_storage_error(err, self.path)
            if storage is not None and self.path.exists() and self.path.stat().st_size > 0:
                return self._open_for_reading(storage)  # a full disk: the published images are still read
            if storage is not None:
                raise storage from err
            raise self._damaged(err) from err
        return conns

    def _open_for_reading(self, refused: OSError) -> ThreadConnections:
        """Read the manifest though writing it is `refused` (read-only mount, full disk);
        every change then raises `refused`."""
        conns = ThreadConnections(self.path, _check_readable, connect=connect_read_only)
        try:
            conns.get()
        except sqlite3.DatabaseError as err:
            conns.close()
            if refused.errno != errno.EROFS:  # never written whole (a first build on a full disk)
                raise refused from err
            raise ManifestError(f"cannot read {self.path} ({err}) nor write it ({refused.strerror})") from err
        self.refused = refused
        return conns

    def _damaged(self, err: sqlite3.DatabaseError) -> ManifestError:
        return ManifestError(
            f"{self.path} is damaged ({err}): it is the list of the index's images and cannot be "
            "rebuilt; restore it from a backup, or build the index again into a new directory "
            "(the feature store keeps the descriptors, so nothing is extracted twice)"
        )

    @property
    def generation(self) -> int:
        return int(self.conn.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0])

    def _bump(self) -> None:
        self.conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key='generation'")

    def count(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM images").fetchone()[0])

    def entries(self) -> list[Entry]:
        rows = self.conn.execute("SELECT id, path, digest, width, height FROM images ORDER BY id")
        return [Entry(*row) for row in rows]

    def get(self, entry_id: int) -> Entry | None:
        row = self.conn.execute(
            "SELECT id, path, digest, width, height FROM images WHERE id=?", (int(entry_id),)
        ).fetchone()
        return Entry(*row) if row else None

    def get_many(self, ids) -> dict[int, Entry]:
        """Entries by id (ids not in the manifest are absent)."""
        out: dict[int, Entry] = {}
        ids = [int(i) for i in ids]
        for start in range(0, len(ids), 500):  # SQLite caps bound parameters
            chunk = ids[start:start + 500]
            rows = self.conn.execute(
                f"SELECT id, path, digest, width, height FROM images WHERE id IN ({','.join('?' * len(chunk))})",
                chunk,
            )
            out.update((row[0], Entry(*row)) for row in rows)
        return out

    def digests(self, ids) -> dict[int, str]:
        return {i: e.digest for i, e in self.get_many(ids).items()}

    def snapshot_ids(self) -> tuple[int, np.ndarray]:
        """(generation, sorted image ids), read in one transaction."""
        conn = self.conn
        conn.execute("BEGIN")
        try:
            generation = self.generation
            ids = np.fromiter((r[0] for r in conn.execute("SELECT id FROM images ORDER BY id")), dtype=np.int64)
        finally:
            conn.execute("COMMIT")
        return generation, ids

    def smallest_digests(self, n: int) -> list[str]:
        """The n smallest distinct content digests: a uniform, reproducible sample of images."""
        return [r[0] for r in self.conn.execute("SELECT DISTINCT digest FROM images ORDER BY digest LIMIT ?", (n,))]

    def under(self, folder: str) -> list[str]:
        """Paths of images inside `folder` (recursively)."""
        prefix = folder.rstrip("/") + "/"
        rows = self.conn.execute(
            "SELECT path FROM images WHERE substr(path, 1, ?) = ? ORDER BY path", (len(prefix), prefix)
        )
        return [r[0] for r in rows]

    def by_path(self, path: str) -> Entry | None:
        row = self.conn.execute(
            "SELECT id, path, digest, width, height FROM images WHERE path=?", (path,)
        ).fetchone()
        return Entry(*row) if row else None

    def by_digest(self, digest: str) -> list[Entry]:
        rows = self.conn.execute(
            "SELECT id, path, digest, width, height FROM images WHERE digest=?", (digest,)
        )
        return [Entry(*row) for row in rows]

    def _transaction(self, statements: list[tuple[str, tuple]]) -> None:
        conn = self.conn
        if self.refused is not None:
            raise OSError(self.refused.errno, self.refused.strerror, self.refused.filename)
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for sql, params in statements:
                    conn.execute(sql, params)
                self._bump()
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # SQLite has already rolled back after a full disk
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as err:
            storage = sqlite_storage_error(err, self.path)
            if storage is None:
                raise
            raise storage from err

    def add(self, path: str, digest: str, width: int, height: int) -> None:
        """Insert an image (replacing a different image previously at the same path)."""
        self._transaction(
            [
                ("DELETE FROM images WHERE path=?", (path,)),
                ("INSERT INTO images (path, digest, width, height) VALUES (?, ?, ?, ?)", (path, digest, width, height)),
            ]
        )

    def copy_entries(self, entries: list[Entry]) -> None:
        """Insert images with their ids kept (the shards of a split index), in one transaction."""
        self._transaction([
            ("INSERT INTO images (id, path, digest, width, height) VALUES (?, ?, ?, ?, ?)",
             (e.id, e.path, e.digest, e.width, e.height))
            for e in entries
        ])

    def move(self, entry_id: int, new_path: str) -> None:
        self._transaction([("UPDATE images SET path=? WHERE id=?", (new_path, entry_id))])

    def remove(self, paths: list[str]) -> list[str]:
        """Delete images by path in one transaction; returns the paths that were present."""
        present = [p for p in dict.fromkeys(paths) if self.by_path(p) is not None]
        if present:
            self._transaction([("DELETE FROM images WHERE path=?", (p,)) for p in present])
        return present
