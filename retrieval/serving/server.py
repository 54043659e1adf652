"""`retrieval serve`: the search page and a JSON API over one index (docs/cli.md section 13).

The index and its network are loaded once, when the app is created. Images are only
ever read by manifest id: no request can name a file to read. Uploaded query images
go to a private temporary file that is deleted as soon as the query is answered.

Routes: `GET /` the page; `GET /api/info`; `POST /api/query` (multipart `image`, and
optional `k`, `aggregate`, `query_levels`, `box` = "x0,y0,x1,y1" in pixels, `nprobe`, and
the re-ranking fields `qe`, `dba`, `rerank` = true/false, `rerank_margin`, `query_rotations` =
"0,90,180,270" or "auto", as `retrieval query`);
`POST /api/query/{id}` (same options, an indexed image as the query);
`GET /api/lookup?path=` (the id of an indexed path); `GET /api/images/{id}` and
`GET /api/images/{id}/thumb`. Who may call them (the Host check, the token and its
`POST /api/session` cookie) and the access log: guard.py, in front of every route.
The index may be a split one (`retrieval split`): its shards are searched in threads.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import ipaddress
import mimetypes
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, TextIO

from fastapi import Depends, FastAPI, File, Form, HTTPException, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from threadpoolctl import threadpool_limits

from ..config import MAX_BATCH, ConfigError, RuntimeConfig, SearchOptions, levels_from_text, rotations_from_text
from ..engine.batcher import SearchBatcher
from ..extraction.images import ImageError, load_rgb, upright_size
from .guard import Guard, HostPolicy
from .report import STATIC, cached_thumbnail

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
# Checked from the image header before anything is decoded: a 20 MB JPEG can hold 9400 x
# 9400 pixels, 265 MB once decoded (benchmarks/results/serve.md).
MAX_UPLOAD_PIXELS = 50_000_000
# A larger upload is decoded at a reduced scale (a JPEG straight from its DCT, never whole)
# to a long side from UPLOAD_SIDE to twice that, and queried so: the network sees each
# window at a few hundred pixels, far fewer than this, whatever the image's size.
UPLOAD_SIDE = 4096
# Uploads decoded at once, each at most (2 * UPLOAD_SIDE)^2 RGB pixels while it is.
DECODES_AT_ONCE = 2
MAX_K = 1000
# Multipart framing and the small form fields around the image.
FORM_OVERHEAD = 64 * 1024
# Formats every browser shows as they are; anything else is served converted to PNG.
BROWSER_FORMATS = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp"}


class TooManyPixels(HTTPException):
    """Raised when an upload's header gives more pixels than the server's limit."""

    def __init__(self, name: str, width: int, height: int, limit: int) -> None:
        super().__init__(
            413,
            f"{name} is {width}x{height} = {width * height / 1e6:.1f} megapixels, above the "
            f"{limit / 1e6:g} megapixel limit; send a smaller image or start the server with a "
            "larger --max-upload-mpx",
        )


class UploadTooLarge(HTTPException):
    """Raised while the request body streams in, before it is all buffered."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            413,
            f"the upload is larger than the {limit / 2**20:.0f} MiB limit; send a smaller image "
            "or start the server with a larger --max-upload-mb",
        )


class _BodyLimit:
    """ASGI middleware: refuse a POST body above `limit` bytes while it is received.

    The multipart parser spools a whole upload to disk before a route sees it, so the
    size has to be enforced here, on the declared length and on the bytes as they come.
    UploadTooLarge is an HTTPException so that FastAPI's body parsing, which turns other
    errors into a 400, passes it on as a 413.
    """

    def __init__(self, app: Callable, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            err = UploadTooLarge(self.limit - FORM_OVERHEAD)
            await JSONResponse({"detail": err.detail}, err.status_code)(scope, receive, send)
            return
        received = 0

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise UploadTooLarge(self.limit - FORM_OVERHEAD)
            return message

        await self.app(scope, limited, send)


class IndexWorker:
    """The open Index, shared by the server's threads, and the batcher every query goes
    through (`retrieval/engine/batcher.py`).

    An Index is safe to share between threads, so the routes call it from the server's
    thread pool. Queries arriving together (uploads or indexed images) are answered
    together: their images described in one network call, their candidates found in one
    FAISS batch search, one batch at a time, each batch using every core; at most
    `max_batch` queries a batch (1: one query at a time, the server before the batcher).
    """

    def __init__(self, index_dir: str | Path, runtime: RuntimeConfig | None = None, *,
                 max_batch: int = MAX_BATCH) -> None:
        # A query whitens a handful of vectors, too few for BLAS threads to pay for waking
        # up: on the shared 2-core machine they made a store-hit search ~4x slower (about
        # 34 ms against 8.5 ms; benchmarks/results/serve.md). The limit is process-wide,
        # which suits a server process; the network and the kernel keep their own threads.
        threadpool_limits(1, user_api="blas")
        self.index = self._open(index_dir, runtime)
        try:
            self.batcher = SearchBatcher(self.index, max_batch=max_batch)
        except BaseException:
            self.index.close()
            raise

    @staticmethod
    def _open(index_dir: str | Path, runtime: RuntimeConfig | None):
        from ..engine.sharded import open_index

        idx = open_index(index_dir, runtime=runtime)  # a split index's shards are searched in threads
        try:
            idx.extractor.load()  # the first query should not pay for loading the network
            idx.warm()  # ... nor for loading the published vectors, FAISS, or cold disk pages
        except BaseException:
            idx.close()
            raise
        return idx

    async def run(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """Run `fn(index, *args, **kwargs)` in the server's thread pool and await its result."""
        return await run_in_threadpool(fn, self.index, *args, **kwargs)

    async def search(self, path: str, crop: tuple | None, options: SearchOptions) -> dict:
        """The query JSON of docs/cli.md section 5 for one query image, each hit with its id
        and size; answered by the batcher together with the queries waiting beside it."""
        from ..engine.index import IndexUsageError

        item = path if crop is None else (path, crop)
        try:
            result = await asyncio.wrap_future(self.batcher.submit(item, options))
        except IndexUsageError as err:  # e.g. dba asked of an index whose neighbours were not computed
            raise HTTPException(400, str(err)) from None
        if result.error is not None:
            raise HTTPException(400, f"cannot query this image: {result.error}")
        return _hits_json(result)

    def close(self) -> None:
        self.batcher.close()
        self.index.close()


def create_app(
    index_dir: str | Path,
    *,
    runtime: RuntimeConfig | None = None,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    max_upload_pixels: int = MAX_UPLOAD_PIXELS,
    host: str = "127.0.0.1",
    allow_hosts: tuple[str, ...] = (),
    token: str | None = None,
    access_log: TextIO | None = None,
    max_batch: int = MAX_BATCH,
) -> FastAPI:
    """The FastAPI app serving the index at `index_dir` (opened now, closed on shutdown).

    `host` is the address served and `allow_hosts` the other names a request's `Host`
    header may give; `token`, when given, is needed by every route but the page (see
    guard.py); `access_log` receives one line per request; `max_batch` is the most
    concurrent queries answered in one search (1: one at a time).
    Raises IndexUsageError when `index_dir` is not an index, ValueError when max_batch < 1.
    """
    worker = IndexWorker(index_dir, runtime, max_batch=max_batch)
    decode_slots = asyncio.Semaphore(DECODES_AT_ONCE)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        worker.close()

    app = FastAPI(title="retrieval", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker
    app.add_middleware(_BodyLimit, limit=max_upload_bytes + FORM_OVERHEAD)
    # Added last, so outermost: a refused request never reaches the routes, and the log
    # sees every answer, the body limit's included.
    app.add_middleware(Guard, hosts=HostPolicy(host, allow_hosts), token=token, log=access_log)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/api/info")
    async def info() -> dict:
        return {**await worker.run(lambda idx: idx.info()), "batching": worker.batcher.stats()}

    @app.post("/api/query")
    async def query_upload(
        image: UploadFile | None = File(None),
        box: str | None = Form(None),
        options: SearchOptions = Depends(_form_options),
    ) -> dict:
        if image is None:
            raise HTTPException(400, "no query image: send it as the multipart file field 'image'")
        data = await image.read()
        if len(data) > max_upload_bytes:
            raise UploadTooLarge(max_upload_bytes)
        name = os.path.basename(image.filename or "") or "upload"
        fd, tmp = tempfile.mkstemp(prefix="retrieval-query-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            try:
                width, height = await run_in_threadpool(upright_size, tmp)
                if width * height > max_upload_pixels:
                    raise TooManyPixels(name, width, height, max_upload_pixels)
                crop = _box(box, width, height)
                async with decode_slots:
                    queried = await run_in_threadpool(_shrink, tmp, UPLOAD_SIDE, (width, height))
            except ImageError as err:
                raise HTTPException(400, f"{name}: {err}; upload a JPEG, PNG, WebP, BMP, GIF or TIFF image") from None
            sx, sy = width / queried[0], height / queried[1]
            if crop is not None:
                crop = (crop[0] / sx, crop[1] / sy, crop[2] / sx, crop[3] / sy)
            result = await worker.search(tmp, crop, options)
        finally:
            os.unlink(tmp)
        if (sx, sy) != (1, 1):  # boxes back in pixels of the image as uploaded
            for hit in result["hits"]:
                x0, y0, x1, y1 = hit["query_box"]
                hit["query_box"] = [x0 * sx, y0 * sy, x1 * sx, y1 * sy]
        result.update(query=name, width=width, height=height)
        return {"results": [result]}

    @app.post("/api/query/{image_id}")
    async def query_indexed(
        image_id: str,
        box: str | None = Form(None),
        options: SearchOptions = Depends(_form_options),
    ) -> dict:
        entry = await _entry(image_id)
        crop = _box(box, entry.width, entry.height)
        result = await worker.search(entry.path, crop, options)
        result.update(query=entry.path, query_id=entry.id, width=entry.width, height=entry.height)
        return {"results": [result]}

    @app.get("/duplicates", include_in_schema=False)
    async def duplicates_page() -> FileResponse:
        return FileResponse(STATIC / "duplicates.html", media_type="text/html")

    @app.get("/api/duplicates")
    async def duplicates(max_distance: str | None = None, min_size: str | None = None) -> dict:
        # The groups as `retrieval duplicates --json`, plus what the page draws with.
        from ..engine.index import IndexUsageError
        from .duplicates_page import duplicates_json

        try:
            distance = float(max_distance) if max_distance else None
        except ValueError:
            raise HTTPException(400, f"max_distance must be a number >= 0 (got {max_distance!r})") from None
        size = _whole_number("min_size", min_size) if min_size else 2

        def find(idx) -> dict:
            return duplicates_json(idx.duplicates(distance, size), idx)

        try:
            return await worker.run(find)
        except IndexUsageError as err:
            raise HTTPException(400, str(err)) from None

    @app.get("/api/lookup")
    async def lookup(path: str) -> dict:
        # Compared with the manifest's paths as a string; the file itself is never touched.
        entry = await worker.run(lambda idx: idx.by_path(path))
        if entry is None:
            raise HTTPException(404, f"{path} is not in the index; paste the path exactly as the hits show it")
        return {"id": entry.id, "path": entry.path, "width": entry.width, "height": entry.height}

    @app.get("/api/images/{image_id}")
    async def image_file(image_id: str) -> Response:
        entry = await _entry(image_id)
        if not os.path.isfile(entry.path):
            raise HTTPException(404, f"image {entry.id} ({entry.path}) is no longer on disk")
        if Path(entry.path).suffix.lower() in BROWSER_FORMATS:
            media = mimetypes.guess_type(entry.path)[0] or "application/octet-stream"
            return FileResponse(entry.path, media_type=media, headers=_CACHE)
        try:
            png = await run_in_threadpool(_png, entry.path)
        except ImageError as err:
            raise HTTPException(404, f"image {entry.id} ({entry.path}) cannot be read any more: {err}") from None
        return Response(png, media_type="image/png", headers=_CACHE)

    @app.get("/api/images/{image_id}/thumb")
    async def image_thumb(image_id: str) -> Response:
        entry = await _entry(image_id)
        try:
            thumb = await run_in_threadpool(cached_thumbnail, entry.path, entry.digest)
        except ImageError as err:
            raise HTTPException(404, f"image {entry.id} ({entry.path}) cannot be read any more: {err}") from None
        return Response(thumb.jpeg, media_type="image/jpeg", headers=_CACHE)

    async def _entry(image_id: str):
        # Ids are manifest row numbers; anything else (a path, "../x", "1.5") is no image.
        if not (image_id.isascii() and image_id.isdigit() and len(image_id) < 19):
            raise HTTPException(404, f"no image with id {image_id!r} in the index (ids are whole numbers)")
        entry = await worker.run(lambda idx: idx.entry(int(image_id)))
        if entry is None:
            raise HTTPException(404, f"no image with id {image_id} in the index")
        return entry

    return app


# Ids are never reused (AUTOINCREMENT), but a file may be re-indexed with new content.
_CACHE = {"Cache-Control": "private, max-age=300"}


def _options(k: str | None = None, aggregate: str | None = None, query_levels: str | None = None,
             qe: str | None = None, dba: str | None = None, query_rotations: str | None = None,
             nprobe: str | None = None, rerank: str | None = None, rerank_margin: str | None = None) -> SearchOptions:
    """The SearchOptions of the optional query fields (absent or empty: the default); a bad
    one is a 400 saying what is allowed: SearchOptions' verdict, and the server's own
    ceiling of MAX_K on k, qe and dba."""
    given: dict[str, Any] = {}
    for name, value in (("k", k), ("qe", qe), ("dba", dba), ("nprobe", nprobe)):
        if value not in (None, ""):
            given[name] = _whole_number(name, value)
    if aggregate not in (None, ""):
        given["aggregate"] = aggregate
    if rerank not in (None, ""):
        if rerank.lower() not in _BOOLEANS:
            raise HTTPException(400, f"rerank must be true or false (got {rerank!r})")
        given["rerank"] = _BOOLEANS[rerank.lower()]
    if rerank_margin not in (None, ""):
        try:
            given["rerank_margin"] = float(rerank_margin)
        except ValueError:
            raise HTTPException(400, f"rerank_margin must be a number >= 0 (got {rerank_margin!r})") from None
    for name, value, parse in (("query_levels", query_levels, levels_from_text),
                               ("query_rotations", query_rotations, rotations_from_text)):
        if value not in (None, ""):
            try:
                given[name] = parse(value)
            except ConfigError as err:
                raise HTTPException(400, f"{name}: {err}") from None
    try:
        options = SearchOptions(**given)
    except ConfigError as err:
        raise HTTPException(400, str(err)) from None
    for name in ("k", "qe", "dba"):
        if name in given and given[name] > MAX_K:
            low = 1 if name == "k" else 0
            raise HTTPException(400, f"{name} must be a whole number from {low} to {MAX_K} (got {given[name]})")
    return options


_BOOLEANS = {"true": True, "1": True, "on": True, "false": False, "0": False, "off": False}


def _form_options(
    k: str | None = Form(None),
    aggregate: str | None = Form(None),
    query_levels: str | None = Form(None),
    qe: str | None = Form(None),
    dba: str | None = Form(None),
    query_rotations: str | None = Form(None),
    nprobe: str | None = Form(None),
    rerank: str | None = Form(None),
    rerank_margin: str | None = Form(None),
) -> SearchOptions:
    """The query routes' optional form fields as one SearchOptions (a FastAPI dependency)."""
    return _options(k, aggregate, query_levels, qe, dba, query_rotations, nprobe, rerank, rerank_margin)


def _whole_number(name: str, text: str) -> int:
    """A form field's integer (a sign and digits); 400 otherwise."""
    digits = text[1:] if text[:1] in "+-" else text
    if not (digits.isascii() and digits.isdigit() and len(digits) < 19):
        raise HTTPException(400, f"{name} must be a whole number (got {text!r})")
    return int(text)


def _box(text: str | None, width: int, height: int) -> tuple[float, float, float, float] | None:
    """Parse the crop box "x0,y0,x1,y1" (pixels) and check it lies inside the image."""
    if text in (None, ""):
        return None
    try:
        x0, y0, x1, y1 = (float(v) for v in text.split(","))
    except ValueError:
        raise HTTPException(400, f"box must be four numbers x0,y0,x1,y1 in pixels (got {text!r})") from None
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise HTTPException(
            400, f"box {text!r} must satisfy 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height} "
            f"(the image is {width}x{height} pixels)",
        )
    return (x0, y0, x1, y1)


def _shrink(path: str, side: int, full: tuple[int, int]) -> tuple[int, int]:
    """Decode the upload at `path`, `full` pixels upright (ImageError if it cannot be); one
    larger than `side` is written back there decoded smaller (`load_rgb`'s max_side), for
    the query to read instead. Returns the size of the image the query will read."""
    img = load_rgb(path, max_side=side)
    if img.size != full:
        img.save(path, "PNG", compress_level=1)
    return img.size


def _png(path: str) -> bytes:
    buf = io.BytesIO()
    load_rgb(path).save(buf, "PNG")
    return buf.getvalue()


def _hits_json(result) -> dict:
    """A QueryResult as the query JSON, each hit with its manifest id and size."""
    hits = [{**hit.to_dict(), "id": hit.id, "width": hit.width, "height": hit.height} for hit in result.hits]
    return {"query": result.query, "hits": hits, **({"note": result.note} if result.note is not None else {})}


def is_loopback(host: str) -> bool:
    """True when `host` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    index_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8765,
    *,
    runtime: RuntimeConfig | None = None,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    max_upload_pixels: int = MAX_UPLOAD_PIXELS,
    allow_hosts: tuple[str, ...] = (),
    token: str | None = None,
    quiet: bool = False,
    max_batch: int = MAX_BATCH,
) -> None:
    """Serve `index_dir` until interrupted (Ctrl-C or SIGTERM). Port 0 picks a free port.

    The address actually listened on is printed on stderr once the index is loaded, then
    one access-log line per request unless `quiet`. `max_batch`: as create_app's.
    """
    import uvicorn

    if not is_loopback(host) and token is None:
        print(
            f"retrieval serve: warning: listening on {host} without a token: anyone who can reach this "
            "machine can search the index and download every indexed image; set --token (or "
            "RETRIEVAL_TOKEN), or use --host 127.0.0.1 to stay local",
            file=sys.stderr, flush=True,
        )
    sock = _listen(host, port)  # before loading the index: a bad --host fails at once
    try:
        app = create_app(index_dir, runtime=runtime, max_upload_bytes=max_upload_bytes,
                         max_upload_pixels=max_upload_pixels, host=host,
                         allow_hosts=allow_hosts, token=token, access_log=None if quiet else sys.stderr,
                         max_batch=max_batch)
    except BaseException:
        sock.close()
        raise
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(f"retrieval serve: {index_dir} on http://{shown}:{bound}/ (Ctrl-C stops)", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        # Ctrl-C is the normal way to stop a server: uvicorn has already shut down cleanly
        # and re-raises the signal only to let the caller know.
        pass
    print("retrieval serve: stopped", file=sys.stderr, flush=True)


def _listen(host: str, port: int) -> socket.socket:
    # Bound here rather than by uvicorn so that the real port (for --port 0) can be printed
    # and a busy port gets a message that says what to do.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except socket.gaierror as err:
        sock.close()
        raise ConfigError(f"cannot listen on {host}: {err.strerror or err}; give --host an IP address or "
                          "name of this machine (127.0.0.1: this machine only, 0.0.0.0: every interface)") from err
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRNOTAVAIL:
            raise ConfigError(f"cannot listen on {host}: no network interface of this machine has that "
                              "address; give --host one of its own addresses (127.0.0.1: this machine "
                              "only, 0.0.0.0: every interface)") from err
        raise OSError(
            f"cannot listen on {host}:{port}: {err.strerror or err}; choose another --port (0 = any free port)"
        ) from err
    sock.listen(128)
    return sock
