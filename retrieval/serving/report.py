"""Showing results: thumbnails, and the self-contained HTML report of `retrieval query --html`.

The report and the search page (`retrieval serve`, retrieval/serving/static/) share one style
sheet, so a hit and its pair of deciding windows look the same in both: the report
inlines `static/style.css` and embeds every thumbnail as a data: URI, so the file opens
offline and can be mailed around on its own.
"""
from __future__ import annotations

import base64
import html
import io
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

from PIL import Image

from ..fileio import replacing
from ..extraction.images import load_rgb

STATIC = Path(__file__).resolve().parent / "static"
# The per-hit colours are the CSS classes c0..c9 of style.css.
COLOURS = 10
THUMB_SIDE = 320


@dataclass(frozen=True)
class Thumb:
    """A JPEG thumbnail and the size of the (upright) image it was made from.

    Boxes of `retrieval query` are in pixels of the upright image, so placing them on the
    thumbnail needs the original size, not the thumbnail's.
    """

    jpeg: bytes
    width: int
    height: int

    def data_uri(self) -> str:
        return "data:image/jpeg;base64," + base64.b64encode(self.jpeg).decode("ascii")


def thumbnail(path: str | Path, max_side: int = THUMB_SIDE) -> Thumb:
    """Decode `path` (as indexing does: EXIF-upright RGB) and shrink it to `max_side` pixels.

    Raises retrieval.extraction.images.ImageError with the reason when the file cannot be decoded.
    """
    img = load_rgb(path)
    width, height = img.size
    img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=82, optimize=True)
    return Thumb(buf.getvalue(), width, height)


@lru_cache(maxsize=1024)
def cached_thumbnail(path: str, digest: str, max_side: int = THUMB_SIDE) -> Thumb:
    """`thumbnail`, memoised on the path and the image's content digest.

    The digest is part of the key so that a file re-indexed with new content is not
    served from a stale entry.
    """
    return thumbnail(path, max_side)


def box_style(box: Sequence[float], width: int, height: int) -> str:
    """CSS placing a pixel box (x0, y0, x1, y1) on an image of width x height, in percent."""
    x0, y0, x1, y1 = box
    return (
        f"left:{100 * x0 / width:.2f}%;top:{100 * y0 / height:.2f}%;"
        f"width:{100 * (x1 - x0) / width:.2f}%;height:{100 * (y1 - y0) / height:.2f}%"
    )


def render_report(
    results: Sequence,
    *,
    skipped: Iterable[dict] = (),
    info: dict | None = None,
    title: str = "retrieval results",
    max_side: int = 256,
) -> str:
    """One HTML page holding every query of `results` (QueryResult), its hits and windows.

    Each hit gets a colour; its deciding window is drawn in that colour both on the hit
    and on the query. Images that cannot be decoded any more are listed with the reason
    instead of a thumbnail.
    """
    thumbs: dict[str, Thumb | str] = {}

    def thumb(path: str) -> Thumb | str:
        if path not in thumbs:
            try:
                thumbs[path] = thumbnail(path, max_side)
            except Exception as err:  # noqa: BLE001 - a vanished file must not lose the report
                thumbs[path] = str(err)
        return thumbs[path]

    e = html.escape
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>{e(title)}</title><style>{(STATIC / 'style.css').read_text()}</style></head><body>",
        f"<header><h1>{e(title)}</h1>",
    ]
    if info:
        parts.append(f"<span class=meta>{e(index_summary(info))}</span>")
    parts.append("</header><main>")
    for result in results:
        parts.append(f"<section class=query><h2>{e(result.query)}</h2><div class=row>")
        q = thumb(result.query)
        parts.append(figure(q, "<span class=name>query</span>", result.query, [
            (i % COLOURS, hit.query_box) for i, hit in enumerate(result.hits)
        ], classes="query-shot"))
        for i, hit in enumerate(result.hits):
            caption = (f"<b>#{hit.rank}</b> distance {hit.distance:.4f}"
                       f"<span class=name>{e(os.path.basename(hit.path))}</span>")
            parts.append(figure(
                thumb(hit.path), caption, f"#{hit.rank}  distance {hit.distance:.4f}"
                + ("" if hit.rerank_distance is None else f", re-ranked {hit.rerank_distance:.4f}") + f"\n{hit.path}",
                [(i % COLOURS, hit.db_box)], classes=f"hit c{i % COLOURS}", swatch=i % COLOURS,
            ))
        if not result.hits:
            parts.append("<p class=note>no hits (the index is empty)</p>")
        parts.append("</div></section>")
    for item in skipped:
        parts.append(
            f"<section class=query><h2>{e(item['path'])}</h2>"
            f"<p class=error>skipped: {e(item['reason'])}</p></section>"
        )
    parts.append("</main></body></html>\n")
    return "".join(parts)


def figure(
    thumb: Thumb | str, caption: str, hover: str, boxes: list[tuple[int, Sequence[float]]],
    *, classes: str, swatch: int | None = None,
) -> str:
    """One image of a page: its thumbnail (or the reason it has none) with `boxes` (colour
    number, pixel box) drawn on it, its caption and a hover text."""
    e = html.escape
    if isinstance(thumb, str):
        frame = f"<p class=error>{e(thumb)}</p>"
    else:
        drawn = "".join(
            f'<div class="box c{c}" style="{box_style(box, thumb.width, thumb.height)}"></div>'
            for c, box in boxes
        )
        frame = f'<div class=frame><img alt="" src="{thumb.data_uri()}">{drawn}</div>'
    mark = f'<span class="swatch c{swatch}"></span>' if swatch is not None else ""
    return f'<figure class="shot {classes}" title="{e(hover)}">{frame}<figcaption>{mark}{caption}</figcaption></figure>'


def index_summary(info: dict) -> str:
    """One line for a header: size and extractor of an index (`Index.info()`)."""
    ext = info.get("extractor", {})
    if ext.get("onnx"):
        net = f"ONNX {os.path.basename(ext['onnx'])}" + (f" @ {ext['onnx_output']}" if ext.get("onnx_output") else "")
    else:
        net = f"{ext.get('backbone')} ({ext.get('weights')})" + (f" @ {ext['layer']}" if ext.get("layer") else "")
    levels = ",".join(str(v) for v in info.get("search", {}).get("levels", []))
    return (
        f"{info.get('images', 0)} images, {info.get('patches', 0)} windows, {net}, "
        f"{ext.get('patch_mode', '?')} levels {levels}, {info.get('index_type', '?')}"
    )


def write_report(path: str | Path, results: Sequence, **kwargs) -> Path:
    """Write `render_report(results, **kwargs)` to `path` atomically; returns the path."""
    return write_page(path, render_report(results, **kwargs))


def write_page(path: str | Path, text: str) -> Path:
    """Write an HTML page to `path` atomically, readable by all; returns the path."""
    path = Path(path)
    with replacing(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a page is meant to be shared
    return path
