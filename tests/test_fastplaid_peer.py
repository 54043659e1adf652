"""benchmarks/fastplaid_peer.py end to end on 200 synthetic images (skipped without its venv).

The FastPLAID venv (benchmarks/.cache/fastplaid-venv, ~5 GB with the torch fast-plaid pins)
is only created by `python benchmarks/fastplaid_peer.py --setup`; these tests never create
it and never download anything.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "fastplaid_peer.py"
VENV = ROOT / "benchmarks" / ".cache" / "fastplaid-venv"


def _run(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    # run with this interpreter (no fast_plaid here): exercises the re-exec into the venv
    return subprocess.run([sys.executable, str(SCRIPT), *args], check=False, capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env={**os.environ, **(env or {})})


def test_missing_venv_says_run_setup(tmp_path):
    proc = _run("--synthetic", "20", "--venv", str(tmp_path / "no-venv"),
                env={"FASTPLAID_PEER_REEXEC": ""})
    if proc.returncode == 0:
        pytest.skip("fast_plaid is importable by this interpreter itself")
    assert proc.returncode == 3, proc.stderr
    assert "--setup" in proc.stderr


@pytest.mark.skipif(not (VENV / "bin" / "python").exists(),
                    reason=f"{VENV} is absent (create it with `python benchmarks/fastplaid_peer.py --setup`)")
def test_synthetic_200_json(tmp_path):
    out = tmp_path / "peer.json"
    proc = _run("--synthetic", "200", "--synthetic-queries", "20", "--dim", "64",
                "--index-dir", str(tmp_path / "index"), "--json", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "fast-plaid" in proc.stdout and "recall@10" in proc.stdout
    data = json.loads(out.read_text())
    for key in ("peer", "version", "n_docs", "P", "d", "queries", "build_s", "peak_rss_gib",
                "p50_ms", "p95_ms", "recall@10", "params", "machine"):
        assert key in data, key
    assert data["peer"] == "fast-plaid" and data["version"]
    assert (data["n_docs"], data["P"], data["d"], data["queries"]) == (200, 30, 64, 20)
    assert 0.0 <= data["recall@10"] <= 1.0
    assert 0.0 <= data["exact_maxsim_recall@10"] <= 1.0
    assert data["build_s"] > 0 and data["peak_rss_gib"] > 0
    assert data["p50_ms"] > 0 and data["p95_ms"] >= data["p50_ms"] > 0 and data["first_query_ms"] > 0
    assert data["truth_planted_top1"] >= 0.9  # the generator plants the answer
    for key in ("nbits", "kmeans_niters", "n_ivf_probe", "n_full_scores", "threads"):
        assert key in data["params"], key
    assert data["machine"]["cpu"] and data["machine"]["cores"] >= 1
