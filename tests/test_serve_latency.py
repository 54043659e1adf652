"""benchmarks/serve_latency.py's command line: its two modes do not mix. (The kept-index
mode end to end starts a `retrieval serve` process per --max-batch value: 27 s on a
tiny index on the busy 2-core machine, too slow for the suite.)"""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "serve_latency.py"


@pytest.mark.parametrize("args, message", [
    (["--index", "IDX", "--query-indexed", "3", "--requests", "5"], "--requests is for --images"),
    (["--images", "DIR", "--max-batch", "1,32", "--onnx", "x.onnx"], "--max-batch is for --index"),
    (["--index", "IDX"], "--index needs one of --query-images DIR (uploads) and --query-indexed N"),
    (["--index", "IDX", "--query-indexed", "3", "--onnx", "x.onnx"], "a kept index has its own extractor"),
])
def test_options_of_the_other_mode_are_refused(args, message):
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
