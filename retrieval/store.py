"""The embedded feature store: raw window descriptors in SQLite, keyed by content.

One row per (image content digest, extractor key, region set). Paths are not stored:
a renamed or moved file has the same digest and costs no extraction, and an index or a
classifier may name the same image differently. WAL mode lets a reader (`info`, a
classifier) open the store while a build writes to it, and a killed writer loses at most
the transaction it was in.
"""
from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Iterable

import numpy as np

SCHEMA_VERSION = 1
DEFAULT_STORE_ENV = "RETRIEVAL_STORE"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS configs (key TEXT PRIMARY KEY, config TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    digest TEXT PRIMARY KEY, width INTEGER NOT NULL, height INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS descriptors (
    digest TEXT NOT NULL, config TEXT NOT NULL, region TEXT NOT NULL,
    n INTEGER NOT NULL, dim INTEGER NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (digest, config, region));
"""


def default_store_path() -> Path:
    """`$RETRIEVAL_STORE`, else `$XDG_CACHE_HOME/retrieval/features.sqlite` (~/.cache)."""
    if os.environ.get(DEFAULT_STORE_ENV):
        return Path(os.environ[DEFAULT_STORE_ENV]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "retrieval" / "features.sqlite"


class FeatureStore:
    """Raw (pooled, un-normalized) float32 descriptors of image windows.

    Open with `FeatureStore.open(path)`; use as a context manager or call `close()`.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None

    @classmethod
    def open(cls, path: str | Path | None = None) -> "FeatureStore":
        store = cls(path or default_store_path())
        store._connect()
        return store

    def _connect(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
        row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) != SCHEMA_VERSION:
            raise RuntimeError(
                f"feature store {self.path} has schema {row[0]}, this version reads {SCHEMA_VERSION}; "
                "use another --store"
            )
        self._conn = conn

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            self._connect()
        assert self._conn is not None
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def register_config(self, key: str, config: dict) -> None:
        self.conn.execute(
            "INSERT OR IGNORE INTO configs VALUES (?, ?)", (key, json.dumps(config, sort_keys=True))
        )

    def image_size(self, digest: str) -> tuple[int, int] | None:
        row = self.conn.execute("SELECT width, height FROM images WHERE digest=?", (digest,)).fetchone()
        return (int(row[0]), int(row[1])) if row else None

    def get(self, digest: str, config: str, regions: Iterable[str]) -> dict[str, np.ndarray]:
        """The stored descriptors of `digest` for those of `regions` that are present."""
        regions = list(regions)
        marks = ",".join("?" * len(regions))
        rows = self.conn.execute(
            f"SELECT region, n, dim, data FROM descriptors WHERE digest=? AND config=? AND region IN ({marks})",
            (digest, config, *regions),
        ).fetchall()
        return {
            region: np.frombuffer(data, dtype=np.float32).reshape(n, dim)
            for region, n, dim, data in rows
        }

    def put(
        self, digest: str, config: str, width: int, height: int, arrays: dict[str, np.ndarray]
    ) -> None:
        """Store all region sets of one image in one transaction (all or nothing)."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("INSERT OR REPLACE INTO images VALUES (?, ?, ?)", (digest, width, height))
            conn.executemany(
                "INSERT OR REPLACE INTO descriptors VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (digest, config, region, a.shape[0], a.shape[1], np.ascontiguousarray(a, np.float32).tobytes())
                    for region, a in arrays.items()
                ],
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def count(self, config: str | None = None) -> int:
        """Number of images with at least one region set stored (for `config`, or any)."""
        if config is None:
            return int(self.conn.execute("SELECT COUNT(DISTINCT digest) FROM descriptors").fetchone()[0])
        return int(
            self.conn.execute(
                "SELECT COUNT(DISTINCT digest) FROM descriptors WHERE config=?", (config,)
            ).fetchone()[0]
        )
