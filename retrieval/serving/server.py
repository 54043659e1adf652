"""`retrieval serve`: the search page and a JSON API over one index (docs/cli.md section 13).

The index and its network are loaded once, when the app is created. Images are only
ever read by manifest id: no request can name a file to read. Uploaded query images
go to a private temporary file that is deleted as soon as the query is answered.

Routes: `GET /` the page; `GET /api/info`; `POST /api/query` (multipart `image`, and
optional `k`, `aggregate`, `query_levels`, `box` = "x0,y0,x1,y1" in pixels, `nprobe`, and
the re-ranking fields `qe`, `dba`, `query_rotations` = "0,90,180,270", as `retrieval query`);
`POST /api/query/{id}` (same options, an indexed image as the query);
`GET /api/lookup?path=` (the id of an indexed path); `GET /api/images/{id}` and
`GET /api/images/{id}/thumb`.
"""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import io
import ipaddress
import mimetypes
import os
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from fastapi import Depends, FastAPI, File, Form, HTTPException, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from threadpoolctl import threadpool_limits

from ..config import ConfigError, RuntimeConfig, SearchOptions, levels_from_text, rotations_from_text
from ..extraction.images import ImageError, load_rgb
from .report import STATIC, cached_thumbnail

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_K = 1000
# Multipart framing and the small form fields around the image.
FORM_OVERHEAD = 64 * 1024
# Uploads arriving within this many seconds of the first are described in one extractor
# call (and any arriving while the index thread is busy wait for the next such call).
GATHER_S = 0.005
BATCH_LOG = 1000
# Formats every browser shows as they are; anything else is served converted to PNG.
BROWSER_FORMATS = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp"}


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
    """Owns the open Index on one dedicated thread; every index call runs there.

    One thread, rather than a lock around `search`: the manifest and the feature store
    hold SQLite connections that may only be used by the thread that opened them, and the
    network and the native kernel are shared and already use every core for one query,
    so running queries one at a time costs no throughput. Uploads, decoding and
    thumbnails run beside it on the server's other threads. Uploaded query images that
    arrive together are described together (`search_upload`): one network call for all
    of them, in full batches, rather than one call each.
    """

    def __init__(self, index_dir: str | Path, runtime: RuntimeConfig | None = None) -> None:
        # Uploads waiting to be described together (see `search_upload`).
        self._lock = threading.Lock()
        self._waiting: list[tuple[str, Any, dict, cf.Future]] = []
        self._drain_queued = False
        self.batches: list[int] = []  # uploads per description batch (the last BATCH_LOG ones)
        # A query whitens a handful of vectors, too few for BLAS threads to pay for waking
        # up: on the shared 2-core machine they made a store-hit search ~4x slower (about
        # 34 ms against 8.5 ms; benchmarks/results/serve.md). The limit is process-wide,
        # which suits a server process; the network and the kernel keep their own threads.
        threadpool_limits(1, user_api="blas")
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retrieval-index")
        self.index = self._pool.submit(self._open, index_dir, runtime).result()

    @staticmethod
    def _open(index_dir: str | Path, runtime: RuntimeConfig | None):
        from ..engine.index import Index

        idx = Index.open(index_dir, runtime=runtime)
        try:
            idx.extractor.load()  # the first query should not pay for loading the network
            idx.warm()  # ... nor for loading the published vectors, FAISS, or cold disk pages
        except BaseException:
            idx.close()
            raise
        return idx

    async def run(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """Run `fn(index, *args, **kwargs)` on the index thread and await its result."""
        return await asyncio.wrap_future(self._pool.submit(fn, self.index, *args, **kwargs))

    async def search_upload(self, path: str, crop: tuple | None, options: SearchOptions) -> dict:
        """`_search` of an uploaded image, described together with the other uploads
        waiting: those that arrive within GATHER_S of each other, or while the index
        thread is busy (describing the previous batch), go through the network in one
        extractor call (full batches mixing their windows), and each is searched on its own
        as soon as its image is described and stored (its descriptors are then store hits),
        while the network goes on with the others. The hits are those of a query alone."""
        future: cf.Future = cf.Future()
        with self._lock:
            self._waiting.append((path, crop, options, future))
            if not self._drain_queued:
                self._drain_queued = True
                self._pool.submit(self._drain)
        return await asyncio.wrap_future(future)

    def _drain(self) -> None:
        """On the index thread: describe every waiting upload at once, answering each as
        soon as its image is described."""
        time.sleep(GATHER_S)
        with self._lock:
            batch, self._waiting = self._waiting, []
            self._drain_queued = False
        batch = [b for b in batch if b[3].set_running_or_notify_cancel()]  # a client gone: dropped
        self.batches = [*self.batches[-BATCH_LOG + 1:], len(batch)]
        try:
            _answer_together(self.index, batch)
        finally:  # no request may wait forever, whatever went wrong
            for *_, future in batch:
                if not future.done():
                    future.set_exception(RuntimeError("the query could not be answered"))

    def close(self) -> None:
        self._pool.submit(self.index.close).result()
        self._pool.shutdown()


def create_app(
    index_dir: str | Path,
    *,
    runtime: RuntimeConfig | None = None,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
) -> FastAPI:
    """The FastAPI app serving the index at `index_dir` (opened now, closed on shutdown).

    Raises IndexUsageError when `index_dir` is not an index.
    """
    worker = IndexWorker(index_dir, runtime)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        worker.close()

    app = FastAPI(title="retrieval", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker
    app.add_middleware(_BodyLimit, limit=max_upload_bytes + FORM_OVERHEAD)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/api/info")
    async def info() -> dict:
        return await worker.run(lambda idx: idx.info())

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
                width, height = await run_in_threadpool(_decoded_size, tmp)
            except ImageError as err:
                raise HTTPException(400, f"{name}: {err}; upload a JPEG, PNG, WebP, BMP, GIF or TIFF image") from None
            crop = _box(box, width, height)
            result = await worker.search_upload(tmp, crop, options)
        finally:
            os.unlink(tmp)
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
        result = await worker.run(_search, entry.path, crop, options)
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
        entry = await worker.run(lambda idx: idx.manifest.by_path(path))
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
             nprobe: str | None = None) -> SearchOptions:
    """The SearchOptions of the optional query fields (absent or empty: the default); a bad
    one is a 400 saying what is allowed: SearchOptions' verdict, and the server's own
    ceiling of MAX_K on k, qe and dba."""
    given: dict[str, Any] = {}
    for name, value in (("k", k), ("qe", qe), ("dba", dba), ("nprobe", nprobe)):
        if value not in (None, ""):
            given[name] = _whole_number(name, value)
    if aggregate not in (None, ""):
        given["aggregate"] = aggregate
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


def _form_options(
    k: str | None = Form(None),
    aggregate: str | None = Form(None),
    query_levels: str | None = Form(None),
    qe: str | None = Form(None),
    dba: str | None = Form(None),
    query_rotations: str | None = Form(None),
    nprobe: str | None = Form(None),
) -> SearchOptions:
    """The query routes' optional form fields as one SearchOptions (a FastAPI dependency)."""
    return _options(k, aggregate, query_levels, qe, dba, query_rotations, nprobe)


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


def _decoded_size(path: str) -> tuple[int, int]:
    return load_rgb(path).size


def _png(path: str) -> bytes:
    buf = io.BytesIO()
    load_rgb(path).save(buf, "PNG")
    return buf.getvalue()


def _answer_together(idx, batch: list) -> None:
    """Answer the uploads of `batch` (path, crop, options, future), describing their images
    in one extractor call per set of query levels, as `Index.search` would describe each
    (its levels, at its rotations). Each upload is searched, its descriptors now store
    hits, as soon as its last image is described, while the network goes on with the
    others. An upload whose image fails is searched after the rest: its own search
    describes it again and says why."""
    from ..extraction.extractor import Skipped
    from ..extraction.features import describe
    from ..extraction.patches import level_names

    def answer(entry) -> None:
        path, crop, options, future = entry
        try:
            future.set_result(_search(idx, path, crop, options))
        except BaseException as err:  # noqa: BLE001 - raised in the request's task
            future.set_exception(err)

    if len(batch) == 1:
        answer(batch[0])
        return
    groups: dict[tuple, list] = {}
    later = []
    for entry in batch:
        options = entry[2].for_index(idx.search_config)  # checked when the request was read
        groups.setdefault(tuple(options.query_levels), []).append((entry, options.rotations))
    for levels, members in groups.items():
        waiting = {(entry[0], entry[1]): [entry, len(rotations)] for entry, rotations in members}
        items = [(entry[0], entry[1], r) for entry, rotations in members for r in rotations]
        try:
            for out in describe(items, idx.extractor, idx.store, level_names(levels), progress=False, desc="query"):
                if isinstance(out, Skipped):
                    key = next((k for k in waiting if k[0] == out.path), None)
                    if key is not None:
                        later.append(waiting.pop(key)[0])
                    continue
                state = waiting.get((out.path, out.crop))
                if state is not None:
                    state[1] -= 1
                    if state[1] == 0:
                        answer(waiting.pop((out.path, out.crop))[0])
        except Exception:  # noqa: BLE001 - each query left describes itself again and says why
            pass
        later.extend(state[0] for state in waiting.values())
    for entry in later:
        answer(entry)


def _search(idx, path: str, crop: tuple | None, options: SearchOptions) -> dict:
    """One query on the index thread: the query JSON of docs/cli.md section 5, each hit with its id and size."""
    from ..engine.index import IndexUsageError

    item = path if crop is None else (path, crop)
    try:
        (result,) = idx.search([item], options=options)
    except IndexUsageError as err:  # e.g. dba asked of an index whose neighbours were not computed
        raise HTTPException(400, str(err)) from None
    if result.error is not None:
        raise HTTPException(400, f"cannot query this image: {result.error}")
    hits = []
    for hit in result.hits:
        entry = idx.entry(hit.id)
        hits.append({**hit.to_dict(), "id": hit.id,
                     "width": entry.width if entry else None, "height": entry.height if entry else None})
    return {"query": result.query, "hits": hits}


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
) -> None:
    """Serve `index_dir` until interrupted (Ctrl-C or SIGTERM). Port 0 picks a free port.

    The address actually listened on is printed on stderr once the index is loaded.
    """
    import uvicorn

    if not is_loopback(host):
        print(
            f"retrieval serve: warning: listening on {host}: anyone who can reach this machine can "
            "search the index and download every indexed image; use --host 127.0.0.1 to stay local",
            file=sys.stderr, flush=True,
        )
    app = create_app(index_dir, runtime=runtime, max_upload_bytes=max_upload_bytes)
    sock = _listen(host, port)
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
    except OSError as err:
        sock.close()
        raise OSError(
            f"cannot listen on {host}:{port}: {err.strerror or err}; choose another --port (0 = any free port)"
        ) from err
    sock.listen(128)
    return sock
