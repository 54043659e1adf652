"""The embedded feature store: raw window descriptors in SQLite, keyed by content.

One row per (image content digest, extractor key, region set). Paths are not stored:
a renamed or moved file has the same digest and costs no extraction, and an index or a
classifier may name the same image differently. WAL mode lets a reader (`info`, a
classifier) open the store while a build writes to it, and a killed writer loses at most
the transaction it was in.

Descriptors are kept in float16 (half the disk of float32; pooled activations of the
supported networks are far inside its range, and their relative rounding, 5e-4, is below
what changes a ranking). `put` rounds, and `stored_form` gives callers the exact values a
later `get` returns (once, for both), so the first run and every later run see identical
numbers.
Rows too large for float16 are kept in float32. Stores written before float16 storage
(schema 1, all float32) are upgraded in place and read as they are.
"""
from __future__ import annotations

import errno
import json
import os
import sqlite3
from pathlib import Path
from typing import Iterable

import numpy as np

from ..connections import SQLiteFile, ThreadConnections
from ..fileio import connect_read_only, sqlite_storage_error, writable

SCHEMA_VERSION = 2
_FLOAT16_MAX = 60000.0
DEFAULT_STORE_ENV = "RETRIEVAL_STORE"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS configs (key TEXT PRIMARY KEY, config TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    digest TEXT PRIMARY KEY, width INTEGER NOT NULL, height INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS descriptors (
    digest TEXT NOT NULL, config TEXT NOT NULL, region TEXT NOT NULL,
    n INTEGER NOT NULL, dim INTEGER NOT NULL, data BLOB NOT NULL,
    dtype TEXT NOT NULL DEFAULT 'float32',
    PRIMARY KEY (digest, config, region));
"""


class StoreError(RuntimeError):
    """The feature store file cannot be used (not a store, damaged, newer schema)."""


def stored_form(array: np.ndarray) -> np.ndarray:
    """`array` as it is kept on disk: float16, or float32 when out of float16's range (an
    array already in float16 is kept as it is: `put` of `stored_form(a)` converts nothing
    again)."""
    if array.dtype == np.float16:
        return np.ascontiguousarray(array)
    array = np.asarray(array, dtype=np.float32)
    if array.size and float(np.abs(array).max()) > _FLOAT16_MAX:
        return np.ascontiguousarray(array)
    return np.ascontiguousarray(array, dtype=np.float16)


def _encode(array: np.ndarray) -> tuple[bytes, str]:
    stored = stored_form(array)
    return stored.tobytes(), stored.dtype.name


def default_store_path() -> Path:
    """`$RETRIEVAL_STORE`, else `$XDG_CACHE_HOME/retrieval/features.sqlite` (~/.cache)."""
    if os.environ.get(DEFAULT_STORE_ENV):
        return Path(os.environ[DEFAULT_STORE_ENV]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "retrieval" / "features.sqlite"


class FeatureStore(SQLiteFile):
    """Raw (pooled, un-normalized) descriptors of image windows, float16 on disk.

    Open with `FeatureStore.open(path)`; use as a context manager or call `close()`.
    Any thread may use it: each gets its own connection (`retrieval/connections.py`).
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        # Why writes are refused (a read-only mount, a disk too full to open the store for
        # writing): the rows are still read; `put` raises this.
        self.refused: OSError | None = None

    @property
    def read_only(self) -> bool:
        """Opened for reading only (`refused` says why)."""
        return self.refused is not None

    @classmethod
    def open(cls, path: str | Path | None = None) -> "FeatureStore":
        store = cls(path or default_store_path())
        store._opened()
        return store

    def _open_connections(self) -> ThreadConnections:
        if self.path.is_dir():
            raise StoreError(f"feature store {self.path} is a directory; --store takes a file path")
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, "rb") as fh:
                if fh.read(16) != b"SQLite format 3\x00":
                    raise StoreError(
                        f"{self.path} is not a feature store (not an SQLite file); "
                        "choose another --store, or move that file away"
                    )
        if self.path.exists() and not writable(self.path.parent):
            return self._connect_read_only(OSError(errno.EROFS, os.strerror(errno.EROFS), str(self.path)))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conns = ThreadConnections(self.path, self._setup)
        try:
            conns.get()  # the schema is checked (and made) now, not on first use
        except sqlite3.DatabaseError as err:
            conns.close()
            storage = sqlite_storage_error(err, self.path)
            if storage is not None and self.path.stat().st_size > 0:
                return self._connect_read_only(storage)  # a full disk: what is stored is still served
            if storage is not None:
                raise storage from err
            raise self._damaged(err) from err
        return conns

    def _setup(self, conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(_SCHEMA)
        row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) == 1:
            # Schema 1 held float32 only: the new column's default says so.
            columns = [r[1] for r in conn.execute("PRAGMA table_info(descriptors)")]
            if "dtype" not in columns:
                conn.execute("ALTER TABLE descriptors ADD COLUMN dtype TEXT NOT NULL DEFAULT 'float32'")
            conn.execute("UPDATE meta SET value=? WHERE key='schema'", (str(SCHEMA_VERSION),))
        elif int(row[0]) != SCHEMA_VERSION:
            raise StoreError(
                f"feature store {self.path} has schema {row[0]}, this version reads {SCHEMA_VERSION}; "
                "upgrade retrieval or use another --store"
            )

    def _check_schema_read_only(self, conn: sqlite3.Connection) -> None:
        row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None or int(row[0]) != SCHEMA_VERSION:
            raise StoreError(
                f"feature store {self.path} has schema {row[0] if row else 'none'} and cannot be written "
                f"({self.refused.strerror if self.refused else 'read-only'}); this version reads {SCHEMA_VERSION} "
                "and upgrades a store it can write: open it once where it can be written"
            )

    def _connect_read_only(self, refused: OSError) -> ThreadConnections:
        """Open the store for reading only, because writing it was `refused`: every stored
        row is served; `put` raises `refused`."""
        self.refused = refused
        conns = ThreadConnections(self.path, self._check_schema_read_only, connect=connect_read_only)
        try:
            conns.get()
        except sqlite3.DatabaseError as err:
            conns.close()
            self.refused = None
            if refused.errno != errno.EROFS:  # never written whole (a first run on a full disk)
                raise refused from err
            raise StoreError(f"feature store {self.path} cannot be read ({err}) nor written ({refused.strerror})") from err
        return conns

    def _damaged(self, err: sqlite3.DatabaseError) -> StoreError:
        return StoreError(f"feature store {self.path} is damaged ({err}); restore it or choose another --store")

    def _check_writable(self) -> None:
        if self.refused is not None:
            raise OSError(self.refused.errno, self.refused.strerror, self.refused.filename)

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def register_config(self, key: str, config: dict) -> None:
        """Record what an extractor key stands for (`refused` when the store is `read_only`)."""
        self._check_writable()
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
            f"SELECT region, n, dim, data, dtype FROM descriptors WHERE digest=? AND config=? AND region IN ({marks})",
            (digest, config, *regions),
        ).fetchall()
        return {region: _decode(n, dim, data, dtype) for region, n, dim, data, dtype in rows}

    def get_many(self, digests: list[str], config: str, regions: list[str]) -> dict[str, np.ndarray]:
        """`regions` of many images at once: digest -> float32 [sum of region rows, C], the
        regions stacked in the order given. Images lacking any region are left out."""
        marks_r = ",".join("?" * len(regions))
        order = {r: i for i, r in enumerate(regions)}
        parts: dict[str, list] = {}
        for start in range(0, len(digests), 500):  # SQLite caps bound parameters
            chunk = digests[start:start + 500]
            rows = self.conn.execute(
                f"SELECT digest, region, n, dim, data, dtype FROM descriptors WHERE config=? "
                f"AND region IN ({marks_r}) AND digest IN ({','.join('?' * len(chunk))})",
                (config, *regions, *chunk),
            )
            for digest, region, n, dim, data, dtype in rows:
                parts.setdefault(digest, []).append((order[region], _decode(n, dim, data, dtype)))
        return {
            d: np.concatenate([a for _, a in sorted(p, key=lambda t: t[0])])
            for d, p in parts.items() if len(p) == len(regions)
        }

    def put(
        self, digest: str, config: str, width: int, height: int, arrays: dict[str, np.ndarray]
    ) -> None:
        """Store all region sets of one image in one transaction (all or nothing)."""
        self.put_many(config, [(digest, width, height, arrays)])

    def put_many(self, config: str, images: list[tuple[str, int, int, dict[str, np.ndarray]]]) -> None:
        """Store (digest, width, height, {region: array}) of many images in one transaction
        (`refused`, naming the file, when the store is `read_only`)."""
        self._check_writable()
        conn = self.conn
        try:
            self._put_many(conn, config, images)
        except sqlite3.Error as err:
            storage = sqlite_storage_error(err, self.path)
            if storage is None:
                raise
            raise storage from err

    @staticmethod
    def _put_many(conn: sqlite3.Connection, config: str, images: list) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("INSERT OR REPLACE INTO images VALUES (?, ?, ?)", [(d, w, h) for d, w, h, _ in images])
            conn.executemany(
                "INSERT OR REPLACE INTO descriptors (digest, config, region, n, dim, data, dtype) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (digest, config, region, a.shape[0], a.shape[1], *_encode(a))
                    for digest, _, _, arrays in images for region, a in arrays.items()
                ],
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # SQLite has already rolled back after a full disk
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


def _decode(n: int, dim: int, data: bytes, dtype: str) -> np.ndarray:
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(n, dim).astype(np.float32)
