"""`retrieval query --html`: the self-contained report (rendering; the browser test opens it)."""
from __future__ import annotations

import io
import re

from PIL import Image

from retrieval import Index
from retrieval.serving.report import render_report, thumbnail, write_report

from conftest import make_scene, run_cli
from serving import build_tiny_index


def test_report_embeds_every_query_hit_and_window(tmp_path):
    index, paths = build_tiny_index(tmp_path, 4)
    with Index.open(index) as idx:
        results = idx.search([str(paths[0]), str(paths[2])], k=3)
        info = idx.info()
    gone = tmp_path / "gone.jpg"
    make_scene(5).save(gone)
    results[1].hits[2].path = str(gone)  # a hit whose file vanished since indexing
    gone.unlink()
    skipped = [{"path": "/x/notes.jpg", "reason": "not an image (unrecognised format)"}]
    out = write_report(tmp_path / "r.html", results, skipped=skipped, info=info, title="t <&>")
    text = out.read_text()
    assert text.count("<section class=query>") == 3 and "t &lt;&amp;&gt;" in text
    assert text.count("figure class=\"shot hit") == 6
    # 2 queries + 5 readable hits, all embedded; nothing is fetched from anywhere.
    assert len(re.findall(r'src="data:image/jpeg;base64,', text)) == 7
    assert not re.search(r'(src|href)="(?!data:)', text)
    assert "file not found" in text and "not an image (unrecognised format)" in text
    assert "4 images" in text and "resnet18" in text
    # One box per hit on the query, one on each readable hit, colours c0..c2.
    assert text.count('class="box c') == 3 + 3 + 3 + 2
    assert 'class="box c2" style="left:' in text


def test_thumbnail_keeps_the_original_size(tmp_path):
    path = tmp_path / "wide.png"
    make_scene(1, size=(900, 300)).save(path)
    thumb = thumbnail(path, max_side=120)
    assert (thumb.width, thumb.height) == (900, 300)
    assert Image.open(io.BytesIO(thumb.jpeg)).size == (120, 40)
    assert render_report([]).startswith("<!doctype html>")


def test_query_html_flag_writes_the_report(tmp_path):
    index, paths = build_tiny_index(tmp_path, 4)
    report = tmp_path / "out" / "report.html"
    out = run_cli("query", str(index), str(paths[1]), str(tmp_path / "missing.jpg"), "-k", "2", "--html", str(report))
    assert out.returncode == 2 and "its folder does not exist" in out.stderr and not report.exists()
    report.parent.mkdir()
    out = run_cli("query", str(index), str(paths[1]), str(tmp_path / "missing.jpg"), "-k", "2", "--html", str(report))
    assert out.returncode == 3, out.stderr  # the missing query is skipped, and named in the report
    text = report.read_text()
    assert text.count("<section class=query>") == 2 and "file not found" in text
    assert text.count('figure class="shot hit') == 2 and str(paths[1]) in text
