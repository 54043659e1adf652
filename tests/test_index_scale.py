"""benchmarks/index_scale.py end to end on a few hundred synthetic images (public API only)."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "index_scale.py"


def test_index_scale_small_run_reports_every_measure(tmp_path):
    out = tmp_path / "out.json"
    png = tmp_path / "p50.png"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--images", "200,400", "--raw-dim", "64", "--pca-dim", "32",
         "--queries", "10", "--peer-max", "0", "--grid", "4:16", "--quiet", "--workdir", str(tmp_path / "w"),
         "--json", str(out), "--plot", str(png)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert [r["images"] for r in data["rows"]] == [200, 400] and "cores" in data["machine"]
    for row in data["rows"]:
        for key in ("build_s", "build_peak_rss_gib", "store_bytes_per_image", "index_bytes_per_image",
                    "add_1000_s", "remove_1000_s", "p50_ms", "p95_ms"):
            assert row[key] > 0, key
        assert row["p50_ms"] <= row["p95_ms"]
        assert row["structure"]["search"] == "exact" and row["recall@10"] == 1.0
        assert [(g["nprobe"], g["per_patch"]) for g in row["grid"]] == [(4, 16)] and row["grid"][0]["p50_ms"] > 0
        # The planted scene mates are what exact search finds first.
        assert row["exact_top1_in_group"] >= 0.9
        # float16 everywhere: 30 windows x 64 raw dims x 2 bytes, plus SQLite's overhead
        assert 30 * 64 * 2 <= row["store_bytes_per_image"] < 2 * 30 * 64 * 2 + 1500
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_index_scale_rejects_bad_sizes():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--images", "ten"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "--images" in proc.stderr
