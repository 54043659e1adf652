"""`retrieval serve` (docs/cli.md section 13): every API route through FastAPI's TestClient, then a real
server process queried over HTTP on 127.0.0.1."""
from __future__ import annotations

import io
import json
import tempfile

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="fastapi is not installed (pip install 'retrieval[serve]')")
pytest.importorskip("multipart", reason="python-multipart is not installed (pip install 'retrieval[serve]')")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from conftest import SELF_DISTANCE, make_scene, run_cli  # noqa: E402
from retrieval.serving.server import create_app, is_loopback  # noqa: E402
from serving import build_tiny_index, http, http_json, multipart, serve_process  # noqa: E402

SPEC_HIT = {"rank", "path", "distance", "query_box", "db_box"}
LIMIT = 200_000  # upload limit of the test app; the test images are ~10 KB
# The served address: the TestClient's own "testserver" would fail the Host check.
BASE = "http://127.0.0.1"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The index, its image paths, and the id of an indexed image whose file is gone."""
    root = tmp_path_factory.mktemp("serve")
    index, paths = build_tiny_index(root, 6)
    gone = root / "images" / "gone.jpg"
    make_scene(99).save(gone, quality=90)
    from retrieval import Index

    with Index.open(index) as idx:
        idx.add([str(gone)], progress=False)
        gone_id = next(h.id for h in idx.search([str(gone)], k=1)[0].hits)
    gone.unlink()
    return index, paths, gone_id


@pytest.fixture(scope="module")
def client(tiny):
    with TestClient(create_app(tiny[0], max_upload_bytes=LIMIT), base_url=BASE) as c:
        yield c


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """Uploads land in this folder, so a test can see that none is left behind."""
    folder = tmp_path / "uploads"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _upload(client, path, name="query.jpg", **fields):
    return client.post("/api/query", files={"image": (name, path.read_bytes(), "image/jpeg")},
                       data={k: str(v) for k, v in fields.items()})


def _ids(client, paths):
    return {str(p): client.get("/api/lookup", params={"path": str(p)}).json()["id"] for p in paths}


def test_page_and_static_files(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/static/app.js" in page.text and "/static/style.css" in page.text
    for name in ("app.js", "style.css", "index.html"):
        assert client.get(f"/static/{name}").status_code == 200
    # Nothing on the page comes from another host.
    assert "http://" not in page.text and "https://" not in page.text


def test_info_is_the_index_info(client, tiny):
    info = client.get("/api/info").json()
    assert {"images", "patches", "dim", "extractor", "index_type", "faiss_device", "native_kernel", "store"} <= set(info)
    assert (info["images"], info["patches"], info["dim"]) == (7, 35, 16)
    assert info["extractor"]["backbone"] == "resnet18"
    assert info["batching"]["max_batch"] == 32 and 0 <= info["batching"]["return_share"] <= 1


def test_info_reports_the_batches_of_the_queries_answered(client, tiny):
    _, paths, _ = tiny
    before = client.get("/api/info").json()["batching"]
    for p in paths[:3]:
        assert _upload(client, p, name="q.jpg", k=2).status_code == 200
    after = client.get("/api/info").json()["batching"]
    assert after["batches"] == before["batches"] + 3 and after["mean_batch"] >= 1, (before, after)


def test_upload_query_returns_the_spec_json_with_ids(client, tiny, private_tmp):
    _, paths, _ = tiny
    r = _upload(client, paths[2], name="holiday.jpg", k=3)
    assert r.status_code == 200, r.text
    (result,) = r.json()["results"]
    assert result["query"] == "holiday.jpg" and (result["width"], result["height"]) == (160, 120)
    hits = result["hits"]
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert all(SPEC_HIT | {"id"} <= set(h) for h in hits)
    assert hits[0]["path"] == str(paths[2]) and hits[0]["distance"] < SELF_DISTANCE
    assert hits[0]["id"] == _ids(client, [paths[2]])[str(paths[2])]
    assert all(a["distance"] <= b["distance"] for a, b in zip(hits, hits[1:]))
    for h in hits:
        assert len(h["query_box"]) == 4 and len(h["db_box"]) == 4
        assert 0 <= h["db_box"][0] < h["db_box"][2] <= h["width"]
        assert 0 <= h["db_box"][1] < h["db_box"][3] <= h["height"]
    assert list(private_tmp.iterdir()) == []  # the uploaded file is deleted after the query


def test_upload_options_crop_aggregate_levels(client, tiny):
    _, paths, _ = tiny
    r = _upload(client, paths[1], k=2, box="40,30,120,90", aggregate="min", query_levels="1")
    assert r.status_code == 200, r.text
    for h in r.json()["results"][0]["hits"]:
        # Level 1 only: the deciding query window is the whole crop.
        assert h["query_box"] == [40.0, 30.0, 120.0, 90.0]
    hits = _upload(client, paths[1], k=50).json()["results"][0]["hits"]
    assert len(hits) == 7  # k above the index size returns every image


def test_upload_with_query_expansion_and_rotations(client, tiny):
    _, paths, _ = tiny
    r = _upload(client, paths[2], k=3, qe="2", query_rotations="0,90")
    assert r.status_code == 200, r.text
    hits = r.json()["results"][0]["hits"]
    assert hits[0]["path"] == str(paths[2]) and hits[0]["rotation"] == 0
    assert all(SPEC_HIT | {"id", "rotation"} <= set(h) for h in hits)
    auto = _upload(client, paths[2], k=3, query_rotations="auto")
    assert auto.status_code == 200, auto.text
    assert [h["rotation"] for h in auto.json()["results"][0]["hits"]] == [0] * 3  # an upright query stays upright
    assert _upload(client, paths[2], query_rotations="sometimes").status_code == 400


def test_concurrent_uploads_are_answered_together_with_the_hits_of_sequential_ones(tmp_path):
    """8 uploads arriving together are answered as one batch of the server's SearchBatcher:
    one extractor call per set of search options, and each upload gets exactly the hits
    it gets when the 8 come one by one (on a twin index with its own store, so both runs
    extract)."""
    import threading
    from pathlib import Path

    queries = []
    for i in range(8):
        path = tmp_path / "q" / f"new{i}.jpg"
        path.parent.mkdir(exist_ok=True)
        make_scene(40 + i).save(path, quality=90)
        queries.append(path)
    # Several option sets: a batch is searched once per set, and rotations/boxes ride along.
    fields = [{"k": 6}, {"k": 6, "query_levels": "1"}, {"k": 3, "box": "10,10,150,110"},
              {"k": 6, "query_rotations": "0,90"}, {"k": 6}, {"k": 6, "query_levels": "1"}, {"k": 6}, {"k": 4}]

    def answer(r):
        assert r.status_code == 200, r.text
        return [(Path(h["path"]).name, h["id"], h["rank"], h["query_box"], h["db_box"], h.get("rotation"),
                 h["distance"]) for h in r.json()["results"][0]["hits"]]

    seq_index, _ = build_tiny_index(tmp_path / "sequential", 6)
    with TestClient(create_app(seq_index, max_upload_bytes=LIMIT), base_url=BASE) as c:
        sequential = [answer(_upload(c, q, name=q.name, **f)) for q, f in zip(queries, fields)]

    con_index, _ = build_tiny_index(tmp_path / "concurrent", 6)
    with TestClient(create_app(con_index, max_upload_bytes=LIMIT), base_url=BASE) as c:
        worker = c.app.state.worker
        extractor = worker.index.extractor
        calls, extract = [], extractor.extract
        extractor.extract = lambda jobs, **kw: (calls.append(len(jobs)), extract(jobs, **kw))[1]
        # The batch is answered once all 8 wait (or after a minute), whatever the timing.
        worker.batcher.wait_s, worker.batcher.max_batch = 60, 8
        out: dict[int, object] = {}
        threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, _upload(c, queries[i], name=queries[i].name,
                                                                               **fields[i])))
                   for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        concurrent = [answer(out[i]) for i in range(8)]
        assert list(worker.batcher.batches)[-1] == 8
    # one call per set of options (k 6 x3, k 6 at level 1 x2, k 3, k 6 at two rotations, k 4)
    assert sorted(calls) == [1, 1, 2, 2, 3]
    # The same hits: images, ids, ranks, boxes, rotations; the distances agree to float
    # rounding (the network sums in another order when windows of several images share a batch).
    assert [[h[:-1] for h in hits] for hits in concurrent] == [[h[:-1] for h in hits] for hits in sequential]
    np.testing.assert_allclose([h[-1] for hits in concurrent for h in hits],
                               [h[-1] for hits in sequential for h in hits], rtol=1e-3)


def test_max_batch_1_answers_one_at_a_time_with_the_hits_of_the_default(client, tiny):
    """`create_app(..., max_batch=1)`, the baseline of `retrieval serve --max-batch 1`: four
    uploads sent at once are searched one per batch, and every upload gets exactly the hits
    (ids, boxes, distances) the default server gives it."""
    import threading

    _, paths, _ = tiny

    def hits(r):
        assert r.status_code == 200, r.text
        return r.json()["results"][0]["hits"]

    default = [hits(_upload(client, p, k=4)) for p in paths[:4]]
    with TestClient(create_app(tiny[0], max_upload_bytes=LIMIT, max_batch=1), base_url=BASE) as c:
        batcher = c.app.state.worker.batcher
        batcher.wait_s = 60  # a batch would wait for all four; max_batch 1 must not
        out: dict[int, list] = {}
        threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, hits(_upload(c, paths[i], k=4))))
                   for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert sorted(out) == [0, 1, 2, 3]
        assert list(batcher.batches) == [1, 1, 1, 1]
    assert [out[i] for i in range(4)] == default


@pytest.mark.parametrize("value", ["0", "-2"])
def test_serve_refuses_max_batch_below_1_and_writes_nothing(tiny, value):
    index = tiny[0]
    before = {p: p.stat().st_mtime_ns for p in index.rglob("*")}
    out = run_cli("serve", str(index), "--port", "0", "--max-batch", value)
    assert out.returncode == 2
    assert f"--max-batch must be a whole number >= 1 (got {value})" in out.stderr
    assert {p: p.stat().st_mtime_ns for p in index.rglob("*")} == before


def test_query_from_an_indexed_image(client, tiny):
    _, paths, _ = tiny
    ids = _ids(client, paths)
    r = client.post(f"/api/query/{ids[str(paths[4])]}", data={"k": "2"})
    assert r.status_code == 200, r.text
    (result,) = r.json()["results"]
    assert result["query"] == str(paths[4]) and result["query_id"] == ids[str(paths[4])]
    assert result["hits"][0]["id"] == ids[str(paths[4])] and len(result["hits"]) == 2
    assert all(SPEC_HIT | {"id"} <= set(h) for h in result["hits"])
    # No form at all: the defaults.
    assert len(client.post(f"/api/query/{ids[str(paths[0])]}").json()["results"][0]["hits"]) == 7


@pytest.mark.parametrize("fields, needle", [
    ({"k": "0"}, "k must be a whole number"),
    ({"k": "ten"}, "k must be a whole number"),
    ({"aggregate": "max"}, "aggregate must be one of"),
    ({"query_levels": "1,7"}, "query_levels"),
    ({"box": "1,2,3"}, "box must be four numbers"),
    ({"box": "0,0,500,90"}, "the image is 160x120 pixels"),
    ({"box": "50,50,10,90"}, "0 <= x0 < x1"),
    ({"qe": "-1"}, "qe must be a whole number"),
    ({"query_rotations": "0,45"}, "query_rotations"),
    ({"dba": "50"}, "retrieval dba"),
    ({"rerank": "maybe"}, "rerank must be true or false"),
    ({"rerank": "true", "rerank_margin": "-1"}, "rerank_margin"),
])
def test_bad_options_are_400_with_the_reason(client, tiny, fields, needle):
    r = _upload(client, tiny[1][0], **fields)
    assert r.status_code == 400 and needle in r.json()["detail"], r.text


@pytest.mark.parametrize("data, reason", [
    (b"this is a text file, not a JPEG\n", "not an image"),
    (b"", "empty file"),
    ("truncated", "truncated"),
])
def test_non_image_upload_is_400_with_the_reason(client, tiny, private_tmp, data, reason):
    if data == "truncated":
        data = tiny[1][0].read_bytes()[:1500]
    r = client.post("/api/query", files={"image": ("notes.jpg", data, "image/jpeg")})
    assert r.status_code == 400 and reason in r.json()["detail"], r.text
    assert "notes.jpg" in r.json()["detail"]
    assert list(private_tmp.iterdir()) == []


def test_missing_image_field_is_400(client):
    r = client.post("/api/query", data={"k": "3"})
    assert r.status_code == 400 and "multipart file field 'image'" in r.json()["detail"]


def test_oversized_upload_is_413(client, private_tmp):
    big = io.BytesIO()
    Image.effect_noise((400, 400), 80).convert("RGB").save(big, "PNG")  # noise does not compress
    assert big.tell() > LIMIT
    r = client.post("/api/query", files={"image": ("big.png", big.getvalue(), "image/png")})
    assert r.status_code == 413 and "limit" in r.json()["detail"]

    def chunks():  # no Content-Length: the limit must hold while the body streams in
        yield b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x\"\r\n\r\n"
        for _ in range(40):
            yield b"\0" * 10_000
    r = client.post("/api/query", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413
    assert list(private_tmp.iterdir()) == []


def test_images_by_id_only(client, tiny):
    _, paths, gone_id = tiny
    ids = _ids(client, paths)
    full = client.get(f"/api/images/{ids[str(paths[3])]}")
    assert full.status_code == 200 and full.content == paths[3].read_bytes()
    assert full.headers["content-type"] == "image/jpeg"
    thumb = client.get(f"/api/images/{ids[str(paths[3])]}/thumb")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 320
    for bad in ("0", "999", "-1", "1.0", "abc", "%2Fetc%2Fpasswd", "..%2F..%2Fetc%2Fpasswd", "1%20OR%201"):
        for suffix in ("", "/thumb"):
            r = client.get(f"/api/images/{bad}{suffix}")
            assert r.status_code == 404, (bad, suffix, r.status_code)
            assert b"root:" not in r.content
    r = client.get(f"/api/images/{gone_id}")
    assert r.status_code == 404 and "no longer on disk" in r.json()["detail"]
    assert client.get(f"/api/images/{gone_id}/thumb").status_code == 404
    r = client.post(f"/api/query/{gone_id}")
    assert r.status_code == 400 and "file not found" in r.json()["detail"]
    for bad in ("999", "abc", "..%2Fx"):
        assert client.post(f"/api/query/{bad}").status_code == 404


def test_no_request_can_read_a_file_outside_the_index(client, tiny, tmp_path):
    secret = tmp_path / "secret.jpg"
    make_scene(7).save(secret)
    r = client.get("/api/lookup", params={"path": str(secret)})
    assert r.status_code == 404 and "not in the index" in r.json()["detail"]
    assert client.get("/api/lookup", params={"path": str(tiny[1][0])}).status_code == 200
    for url in ("/static/../../pyproject.toml", "/static/%2e%2e/%2e%2e/pyproject.toml",
                "/static/..%2F..%2Fpyproject.toml", f"/static/{secret}", f"/api/images/{secret}"):
        r = client.get(url)
        assert r.status_code == 404 and b"[project]" not in r.content, url
    # A path in the query form is not a query image.
    r = client.post("/api/query", data={"image": str(secret)})
    assert r.status_code in (400, 422)


def test_loopback_detection():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.4", "example.org"))


def test_serve_warns_off_loopback_and_refuses_a_non_index(tmp_path):
    out = run_cli("serve", str(tmp_path / "nothing"), "--host", "0.0.0.0", "--port", "0")
    assert out.returncode == 2
    assert "warning: listening on 0.0.0.0" in out.stderr and "--host 127.0.0.1" in out.stderr


def test_serve_process_over_http(tiny, store_env):
    """A real `retrieval serve` on an ephemeral loopback port, queried, then stopped."""
    index, paths, _ = tiny
    cli_info = json.loads(run_cli("info", str(index), "--json").stdout)
    with serve_process(index) as url:
        status, info = http_json(url + "api/info")
        assert status == 200 and info.pop("batching")["max_batch"] == 32 and info == cli_info
        status, page = http(url)
        assert status == 200 and b"app.js" in page
        body, ctype = multipart({"k": "3"}, {"image": ("q.jpg", paths[5].read_bytes())})
        status, result = http_json(url + "api/query", body=body, content_type=ctype)
        assert status == 200, result
        top = result["results"][0]["hits"][0]
        assert top["path"] == str(paths[5]) and SPEC_HIT | {"id"} <= set(top)
        status, thumb = http(f"{url}api/images/{top['id']}/thumb")
        assert status == 200 and thumb[:2] == b"\xff\xd8"
        status, _ = http(url + "api/images/12345")
        assert status == 404
        body, ctype = multipart({}, {"image": ("x.jpg", b"not an image")})
        status, err = http_json(url + "api/query", body=body, content_type=ctype)
        assert status == 400 and "not an image" in err["detail"]


def test_upload_above_the_pixel_cap_is_413_before_decoding(tiny, private_tmp, monkeypatch):
    """Issue 23 row 7: the header's size decides; nothing is decoded (a refused upload never
    reaches the decoder)."""
    import retrieval.serving.server as server

    _, paths, _ = tiny
    decoded = []
    monkeypatch.setattr(server, "_shrink", lambda *a: decoded.append(a))
    with TestClient(create_app(tiny[0], max_upload_pixels=10_000), base_url=BASE) as small:
        r = _upload(small, paths[0])
    assert r.status_code == 413, r.text
    assert "160x120" in r.json()["detail"] and "0.01 megapixel limit" in r.json()["detail"]
    assert "--max-upload-mpx" in r.json()["detail"]
    assert decoded == [] and list(private_tmp.iterdir()) == []


def _peak_decodes(tiny, monkeypatch, uploads: int) -> int:
    """The most uploads decoded at once while `uploads` are sent together. Each decode
    holds its slot until one more than the limit is decoding (which never happens while
    the limit holds) or a second has passed, so that every upload that can pile in does."""
    import threading

    import retrieval.serving.server as server

    state = {"inside": 0, "peak": 0}
    turn = threading.Condition()
    shrink = server._shrink

    def counted(*args):
        with turn:
            state["inside"] += 1
            state["peak"] = max(state["peak"], state["inside"])
            turn.notify_all()
            turn.wait_for(lambda: state["inside"] > server.DECODES_AT_ONCE, timeout=1.0)
        try:
            return shrink(*args)
        finally:
            with turn:
                state["inside"] -= 1

    monkeypatch.setattr(server, "_shrink", counted)
    _, paths, _ = tiny
    answers = [None] * uploads
    with TestClient(create_app(tiny[0]), base_url=BASE) as c:
        threads = [threading.Thread(target=lambda i=i: answers.__setitem__(i, _upload(c, paths[i % len(paths)])))
                   for i in range(uploads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert [a.status_code for a in answers] == [200] * uploads
    return state["peak"]


def test_uploads_are_decoded_at_most_two_at_once(tiny, monkeypatch):
    """Issue 23 row 7: six uploads sent together are decoded two at a time (the decode
    slots), never more, whatever the server's thread pool would allow."""
    import retrieval.serving.server as server

    assert server.DECODES_AT_ONCE == 2
    assert _peak_decodes(tiny, monkeypatch, 6) == 2


def test_large_upload_is_queried_decoded_smaller_with_boxes_in_its_own_pixels(client, tiny, private_tmp, monkeypatch):
    """An upload above UPLOAD_SIDE is decoded at a reduced scale (here 160 px wide at a side
    of 50: the JPEG's DCT scale 1/2, as 1/4 would be under 50); its hits are still found and its boxes are given in the pixels
    of the image as uploaded."""
    import retrieval.serving.server as server

    _, paths, _ = tiny
    monkeypatch.setattr(server, "UPLOAD_SIDE", 50)
    read = []
    shrink = server._shrink
    monkeypatch.setattr(server, "_shrink", lambda *a: read.append(shrink(*a)) or read[-1])
    r = _upload(client, paths[2], box="8,6,152,114")
    assert r.status_code == 200, r.text
    result = r.json()["results"][0]
    assert read == [(80, 60)]
    assert (result["width"], result["height"]) == (160, 120)
    assert result["hits"][0]["path"] == str(paths[2])
    boxes = np.array([h["query_box"] for h in result["hits"]])
    assert boxes[:, 2].max() > 80 and (boxes[:, 0] >= 8 - 3).all() and (boxes[:, 2] <= 152 + 3).all()
    assert list(private_tmp.iterdir()) == []


def test_load_rgb_max_side_uses_the_jpeg_scale_and_upright_size(tmp_path):
    from retrieval.extraction.images import load_rgb, upright_size

    jpeg = tmp_path / "wide.jpg"
    Image.effect_noise((1000, 400), 40).convert("RGB").save(jpeg, quality=90)
    assert load_rgb(jpeg, max_side=200).size == (250, 100)  # DCT scale 1/4: 250 in [200, 400)
    assert load_rgb(jpeg).size == (1000, 400) and load_rgb(jpeg, max_side=1000).size == (1000, 400)
    png = tmp_path / "wide.png"
    Image.effect_noise((1000, 400), 40).convert("RGB").save(png)
    assert load_rgb(png, max_side=300).size == (334, 134)  # reduced by 3
    turned = tmp_path / "turned.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    Image.new("RGB", (300, 200)).save(turned, exif=exif)
    assert upright_size(turned) == (200, 300) == load_rgb(turned).size
def test_duplicates_route_returns_the_groups_with_their_windows(client, tiny):
    r = client.get("/api/duplicates", params={"max_distance": "10"})  # every image near every other
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["max_distance"] == 10 and body["max_distance_rule"] == "given"
    [group] = body["groups"]
    first, *rest = group["images"]
    assert len(group["images"]) == body["images"] and first["distance"] == 0
    assert all(len(m["box"]) == 4 and len(m["first_box"]) == 4 and m["width"] > 0 for m in rest)
    for bad in ({"max_distance": "abc"}, {"max_distance": "-1"}, {"min_size": "1"}, {"min_size": "x"}):
        r = client.get("/api/duplicates", params=bad)
        assert r.status_code == 400 and r.json()["detail"], (bad, r.text)


def test_adaptive_reranking_fields(client, tiny):
    """`rerank` / `rerank_margin` as `retrieval query --rerank --rerank-margin`: the image
    itself stays first, and every re-ranked hit carries the distance that orders it beside
    its plain one."""
    _, paths, _ = tiny
    plain = _upload(client, paths[0], rerank="false").json()["results"][0]["hits"]
    reranked = _upload(client, paths[0], rerank="true", rerank_margin="0.5").json()["results"][0]["hits"]
    assert all("rerank_distance" not in h for h in plain) and all("rerank_distance" in h for h in reranked)
    by_path = {h["path"]: h["distance"] for h in plain}
    assert all(by_path[h["path"]] == h["distance"] for h in reranked if h["path"] in by_path)
    assert plain[0]["path"] == reranked[0]["path"] == str(paths[0])
