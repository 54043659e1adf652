"""The list of images in an index: the index's source of truth, one SQLite transaction per change.

Each committed change bumps `generation`. Everything else in the index directory
(whitened vectors, the FAISS index) is derived from the manifest plus the feature store
and is stamped with the generation it was built for, so a stale or half-written derived
file is detected and rebuilt rather than trusted.
"""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..extraction.connections import ThreadConnections


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


class Manifest:
    """The images of an index. Any thread may use it: each gets its own connection
    (`retrieval/extraction/connections.py`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._conns = ThreadConnections(self.path, _create_schema)

    @property
    def conn(self) -> sqlite3.Connection:
        """The calling thread's connection."""
        try:
            return self._conns.get()
        except sqlite3.DatabaseError as err:
            raise ManifestError(
                f"{self.path} is damaged ({err}): it is the list of the index's images and cannot be "
                "rebuilt; restore it from a backup, or build the index again into a new directory "
                "(the feature store keeps the descriptors, so nothing is extracted twice)"
            ) from err

    def close(self) -> None:
        self._conns.close()

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
        conn.execute("BEGIN IMMEDIATE")
        try:
            for sql, params in statements:
                conn.execute(sql, params)
            self._bump()
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

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
