"""`retrieval serve` beyond loopback (issue 23 rows 5, 6, 12, 14): the Host check against DNS
rebinding, the bearer token and the page's cookie, the access log, and a bad --host."""
from __future__ import annotations

import io
import re

import pytest

pytest.importorskip("fastapi", reason="fastapi is not installed (pip install 'retrieval[serve]')")
pytest.importorskip("multipart", reason="python-multipart is not installed (pip install 'retrieval[serve]')")

from fastapi.testclient import TestClient  # noqa: E402

from conftest import run_cli  # noqa: E402
from retrieval.serving.guard import COOKIE, HostPolicy, host_name  # noqa: E402
from retrieval.serving.server import create_app  # noqa: E402
from serving import build_tiny_index, http, serve_process  # noqa: E402

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_index(tmp_path_factory.mktemp("guard"), 3)


@pytest.fixture(scope="module")
def guarded(tiny):
    """An app with a token, served on 0.0.0.0 with one extra allowed name, logging to a buffer."""
    log = io.StringIO()
    app = create_app(tiny[0], host="0.0.0.0", allow_hosts=("photos.lan",), token=TOKEN, access_log=log)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        yield client, log


def test_host_names():
    assert host_name("Example.org:8765") == "example.org"
    assert host_name("[::1]:8765") == "::1" and host_name("127.0.0.1") == "127.0.0.1"
    local = HostPolicy("127.0.0.1")
    assert all(local.allows(h) for h in ("127.0.0.1", "localhost", "::1", "127.0.0.2"))
    assert not any(local.allows(h) for h in ("evil.example", "192.168.1.4", ""))
    lan = HostPolicy("0.0.0.0", ["Photos.lan"])
    assert all(lan.allows(h) for h in ("192.168.1.4", "photos.lan", "localhost"))
    assert not lan.allows("evil.example")
    assert HostPolicy("192.168.1.4").allows("192.168.1.4") and not HostPolicy("192.168.1.4").allows("10.0.0.1")


def test_foreign_host_is_400_before_anything_else(tiny):
    with TestClient(create_app(tiny[0]), base_url="http://127.0.0.1") as client:
        assert client.get("/api/info").status_code == 200
        assert client.get("/api/info", headers={"Host": "localhost:8765"}).status_code == 200
        for path in ("/", "/api/info", "/static/app.js"):
            r = client.get(path, headers={"Host": "evil.example:8765"})
            assert r.status_code == 400, (path, r.text)
            assert "evil.example" in r.json()["detail"] and "--allow-host" in r.json()["detail"]


def test_allow_host_names_another_host(guarded):
    client, _ = guarded
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert client.get("/api/info", headers={**auth, "Host": "photos.lan"}).status_code == 200
    assert client.get("/api/info", headers={**auth, "Host": "10.1.2.3:8765"}).status_code == 200
    assert client.get("/api/info", headers={**auth, "Host": "evil.example"}).status_code == 400


def test_token_needed_everywhere_but_the_page(guarded):
    client, _ = guarded
    assert client.get("/").status_code == 200 and client.get("/static/app.js").status_code == 200
    for method, path in (("GET", "/api/info"), ("GET", "/api/images/1/thumb"), ("GET", "/api/lookup?path=x"),
                         ("POST", "/api/query/1"), ("POST", "/api/query")):
        r = client.request(method, path)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, r.text)
        assert "Authorization: Bearer" in r.json()["detail"]
        wrong = client.request(method, path, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
    r = client.get("/api/info", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and r.json()["images"] == 3


def test_the_page_proves_the_token_once_then_its_cookie_serves_images(tiny, guarded):
    client, _ = guarded
    client.cookies.clear()
    assert client.post("/api/session").status_code == 401  # no cookie for a guess
    r = client.post("/api/session", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 204
    set_cookie = r.headers["set-cookie"]
    assert f"{COOKIE}=" in set_cookie and "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie
    # An <img> tag sends no header, only the cookie.
    thumb = client.get("/api/images/1/thumb")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    client.cookies.clear()
    client.cookies.set(COOKIE, "forged")
    assert client.get("/api/images/1/thumb").status_code == 401
    client.cookies.clear()


def test_access_log_one_line_per_request(guarded):
    client, log = guarded
    log.seek(0)
    log.truncate()
    client.get("/api/info")
    client.get("/api/info", headers={"Authorization": f"Bearer {TOKEN}"})
    client.get("/api/info", headers={"Host": "evil.example"})
    lines = log.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert [line.split()[:3] for line in lines] == [
        ["GET", "/api/info", "401"], ["GET", "/api/info", "200"], ["GET", "/api/info", "400"]]
    assert all(re.fullmatch(r"\S+ \S+ \d{3} \d+\.\d ms", line) for line in lines), lines


def test_serve_with_a_token_over_http(tiny):
    with serve_process(tiny[0], "--token", TOKEN) as url:
        status, _ = http(url + "api/info")
        assert status == 401
        status, _ = http(url)
        assert status == 200


def test_bad_host_blames_the_host(tmp_path):
    out = run_cli("serve", str(tmp_path / "nothing"), "--host", "256.1.1.1", "--port", "0")
    assert out.returncode == 2, out.stderr
    assert "256.1.1.1" in out.stderr and "--host" in out.stderr and "--port" not in out.stderr
    out = run_cli("serve", str(tmp_path / "nothing"), "--token", "", "--port", "0")
    assert out.returncode == 2 and "--token must not be empty" in out.stderr
