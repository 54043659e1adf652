"""`index.json`: an index's configuration on disk (extractor, search settings, index type,
store, `--whiten-on` sources), written once at creation and read at every open."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from ..config import ExtractorConfig, SearchConfig
from ..fileio import write_text

FILE = "index.json"
FORMAT_VERSION = 2
# The settings an existing index must share with a `build` that reopens it to resume.
CONFIGURATION = ("extractor", "search", "index_type", "whiten_on")


class MetaError(ValueError):
    """index.json is missing, damaged or of an unsupported format (the message says which)."""


def new_meta(extractor: ExtractorConfig, search: SearchConfig, index_type: str | None, store: Path,
             whiten_on: Sequence[str] | None) -> dict:
    """The index.json of a new index, as it will read back (JSON round trip)."""
    return _normalised({
        "format": FORMAT_VERSION,
        "extractor": extractor.to_dict(),
        "search": search.to_dict(),
        "index_type": index_type,
        "store": str(store),
        "whiten_on": [_absolute_input(w) for w in whiten_on] if whiten_on else None,
    })


def read_meta(directory: Path) -> dict:
    """The parsed index.json of `directory`; MetaError saying what is wrong and the fix."""
    path = directory / FILE
    if not path.is_file():
        if (directory / "shards.json").is_file():
            raise MetaError(
                f"{directory} holds the shards of a split index: `retrieval query` and `info` take it "
                "(Python: retrieval.ShardedIndex); add to or remove from the source index, then split again"
            )
        raise MetaError(f"{directory} is not an index (no {FILE}); create one with `retrieval build`")
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        for key in ("extractor", "search", "store"):
            if key not in meta:
                raise KeyError(key)
    except (ValueError, KeyError, TypeError) as err:
        raise MetaError(
            f"{directory} is not a valid index: {FILE} is damaged ({type(err).__name__}: {err}); "
            "restore it, or build the index again into a new directory"
        ) from None
    if meta.get("format") not in (1, FORMAT_VERSION):
        raise MetaError(
            f"{directory}: index format {meta.get('format')!r} is not supported by this version "
            f"(it reads {FORMAT_VERSION})"
        )
    return meta


def write_meta(directory: Path, meta: dict) -> None:
    """Write `meta` as the index.json of `directory` (atomically)."""
    write_text(directory / FILE, json.dumps(meta, indent=2, sort_keys=True))


def differing(existing: dict, wanted: dict) -> list[str]:
    """The configuration keys in which two index.json contents differ."""
    return [k for k in CONFIGURATION if _normalised(existing.get(k)) != wanted[k]]


def _normalised(value):
    """Compare configurations as stored: tuples and lists alike (JSON round trip)."""
    return json.loads(json.dumps(value))


def _absolute_input(item: str) -> str:
    """An INPUT with its path made absolute (`@list.txt` keeps its @)."""
    if item.startswith("@"):
        return "@" + str(Path(item[1:]).resolve())
    return str(Path(item).resolve())
