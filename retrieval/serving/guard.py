"""Who may use `retrieval serve`, and the record of what they asked: the Host check, the
bearer token and the access log, as one ASGI middleware in front of every route.

Host check: a browser sends the name it resolved in `Host`, so a page on another site
whose name is rebound to this machine's address (DNS rebinding) names itself there; only
the address served, `localhost`, a loopback address and the `--allow-host` names pass.
An IP literal cannot be rebound, so on a wildcard address (0.0.0.0, ::) any IP passes.

Token: every route but the pages themselves (`GET /`, `GET /duplicates` and their static
files, which hold no index data) needs `Authorization: Bearer TOKEN`, or the cookie that `POST /api/session`
sets once the page has proven the token that way: `<img>` tags, which show the
thumbnails, cannot send headers. The cookie is HttpOnly (no script reads it back) and
SameSite=Strict (no other site's page makes the browser send it).
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import time
from http.cookies import SimpleCookie
from typing import Callable, TextIO

COOKIE = "retrieval_token"
SESSION_PATH = "/api/session"
WILDCARDS = {"0.0.0.0", "::", ""}
# The pages: their data comes from the API routes, which the token guards.
PAGES = {"/", "/duplicates"}


def host_name(header: str) -> str:
    """The host of a `Host` header value, lower case, without port or IPv6 brackets."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header[1:]
    if header.count(":") == 1:
        return header.split(":")[0]
    return header


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


class HostPolicy:
    """Which `Host` header names a server listening on `served` answers."""

    def __init__(self, served: str, allow: tuple[str, ...] | list[str] = ()) -> None:
        self.served = served.strip("[]").lower()
        self.names = {self.served, "localhost", *(a.strip().lower() for a in allow)}
        self.any_ip = self.served in WILDCARDS

    def allows(self, name: str) -> bool:
        if name in self.names:
            return True
        ip = _ip(name)
        return ip is not None and (ip.is_loopback or self.any_ip)


class Guard:
    """ASGI middleware: 400 for a foreign `Host`, 401 without the token (when one is set),
    and one access-log line per request (method, path, status, milliseconds) on `log`."""

    def __init__(self, app: Callable, *, hosts: HostPolicy, token: str | None = None,
                 log: TextIO | None = None) -> None:
        self.app = app
        self.hosts = hosts
        self.token = token
        self.log = log

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the client sees if the app fails before it answers

        async def recorded(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, recorded)
        finally:
            if self.log is not None:
                ms = (time.perf_counter() - start) * 1000
                print(f"{scope['method']} {scope['path']} {status} {ms:.1f} ms", file=self.log, flush=True)

    async def _guarded(self, scope: dict, receive: Callable, send: Callable) -> None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        name = host_name(headers.get("host", ""))
        if not self.hosts.allows(name):
            await _json(send, 400, f"Host {name!r} is not served here (DNS rebinding defence); open the page "
                        f"through {self.hosts.served or 'localhost'}, or start the server with --allow-host {name}"
                        if name else "the request has no Host header")
            return
        if self.token is None or _is_page(scope):
            await self.app(scope, receive, send)
            return
        if self._bearer(headers.get("authorization", "")):
            if scope["path"] == SESSION_PATH and scope["method"] == "POST":
                await _session(send, self.token)
                return
            await self.app(scope, receive, send)
            return
        cookie = SimpleCookie(headers.get("cookie", ""))
        if COOKIE in cookie and hmac.compare_digest(cookie[COOKIE].value.encode(), self.token.encode()):
            await self.app(scope, receive, send)
            return
        await _json(send, 401, "this server needs its token: send 'Authorization: Bearer TOKEN' "
                    "(TOKEN as given to retrieval serve --token or RETRIEVAL_TOKEN)",
                    [(b"www-authenticate", b"Bearer")])

    def _bearer(self, header: str) -> bool:
        scheme, _, value = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), self.token.encode())


def _is_page(scope: dict) -> bool:
    return scope["method"] in ("GET", "HEAD") and (scope["path"] in PAGES or scope["path"].startswith("/static/"))


async def _json(send: Callable, status: int, detail: str, extra: list | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _session(send: Callable, token: str) -> None:
    cookie = SimpleCookie()
    cookie[COOKIE] = token
    cookie[COOKIE].update({"path": "/", "httponly": True, "samesite": "Strict"})
    header = cookie[COOKIE].OutputString().encode("latin-1")
    await send({"type": "http.response.start", "status": 204, "headers": [(b"set-cookie", header)]})
    await send({"type": "http.response.body", "body": b""})

