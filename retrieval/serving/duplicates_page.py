"""The groups of `retrieval duplicates` for people: the self-contained HTML page of
`--html` (one row per group), and the data of the serve page's duplicates view.

Each group's first image comes first; every other member gets a colour, and its matched
pair of windows (the closest pair of their windows) is drawn in that colour on it and
on the first image, as `retrieval query --html` draws a hit and its query
(retrieval/serving/report.py, whose style sheet and thumbnails this page shares).
"""
from __future__ import annotations

import html
import os
from pathlib import Path

from ..engine.duplicates import Duplicates, matched_boxes
from ..engine.index import Index
from .report import COLOURS, STATIC, Thumb, figure, index_summary, thumbnail, write_page


def group_boxes(found: Duplicates, idx: Index) -> list[tuple[list, list[tuple[list[float], list[float]]]]]:
    """Per group of `found`: its members' manifest entries, and for each member after the
    first the boxes of their matched windows (on the first image, on the member)."""
    view = idx.view()
    levels = idx.search_config.levels
    out = []
    for group in found.groups:
        entries = idx.manifest.get_many([m.id for m in group])
        members = [entries[m.id] for m in group]
        out.append((members, [matched_boxes(view, levels, members[0], e) for e in members[1:]]))
    return out


def duplicates_json(found: Duplicates, idx: Index) -> dict:
    """`found.to_dict()` with what a page needs to draw it: each member's `width` and
    `height`, and for each member after the first `box` (its matched window) and
    `first_box` (the matched window on the first image)."""
    data = found.to_dict()
    for group, (members, boxes) in zip(data["groups"], group_boxes(found, idx)):
        for m, entry in zip(group["images"], members):
            m.update(width=entry.width, height=entry.height)
        for m, (first_box, box) in zip(group["images"][1:], boxes):
            m.update(box=box, first_box=first_box)
    return data


def render_duplicates(found: Duplicates, idx: Index, *, max_side: int = 256) -> str:
    """The page of `found` (from `idx.duplicates()`); images that cannot be decoded any
    more are shown with the reason instead of a thumbnail."""
    e = html.escape
    title = f"retrieval duplicates {found.index}"
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>{e(title)}</title><style>{(STATIC / 'style.css').read_text()}</style></head><body>",
        f"<header><h1>{e(title)}</h1><span class=meta>{e(index_summary(idx.info()))}; "
        f"{len(found.groups)} groups, max distance {found.max_distance:.4f} ({e(found.rule)})</span></header><main>",
    ]
    for n, (group, (members, boxes)) in enumerate(zip(found.groups, group_boxes(found, idx)), 1):
        first = members[0]
        parts.append(f"<section class=\"query group\"><h2>group {n}: {len(group)} images</h2><div class=row>")
        parts.append(figure(
            _thumb(first.path, max_side), f"<b>first</b><span class=name>{e(os.path.basename(first.path))}</span>",
            first.path, [(i % COLOURS, b[0]) for i, b in enumerate(boxes)], classes="query-shot",
        ))
        for i, (m, b) in enumerate(zip(group[1:], boxes)):
            parts.append(figure(
                _thumb(m.path, max_side),
                f"distance {m.distance:.4f}<span class=name>{e(os.path.basename(m.path))}</span>",
                f"distance {m.distance:.4f}\n{m.path}", [(i % COLOURS, b[1])],
                classes=f"hit c{i % COLOURS}", swatch=i % COLOURS,
            ))
        parts.append("</div></section>")
    if not found.groups:
        parts.append("<p class=note>no groups at this distance</p>")
    parts.append("</main></body></html>\n")
    return "".join(parts)


def _thumb(path: str, max_side: int) -> Thumb | str:
    try:
        return thumbnail(path, max_side)
    except Exception as err:  # noqa: BLE001 - a vanished file must not lose the page
        return str(err)


def write_duplicates_page(path: str | Path, found: Duplicates, idx: Index) -> Path:
    """Write `render_duplicates(found, idx)` to `path` atomically; returns the path."""
    return write_page(path, render_duplicates(found, idx))
