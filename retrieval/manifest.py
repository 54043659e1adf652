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


@dataclass(frozen=True)
class Entry:
    id: int
    path: str
    digest: str
    width: int
    height: int


class Manifest:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
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
            self._conn = conn
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

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

    def move(self, entry_id: int, new_path: str) -> None:
        self._transaction([("UPDATE images SET path=? WHERE id=?", (new_path, entry_id))])

    def remove(self, paths: list[str]) -> int:
        before = self.count()
        if paths:
            self._transaction([("DELETE FROM images WHERE path=?", (p,)) for p in paths])
        return before - self.count()
