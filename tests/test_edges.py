"""Issue 9, "every edge a user hits": clear errors, right exit codes, nothing half-written."""
from __future__ import annotations

import pytest

from conftest import TINY_FLAGS, run_cli


@pytest.mark.parametrize("spec,form", [
    ("size=abc", "size=N"),
    ("size=64/x", "size=N"),
    ("scale=abc", "scale=1"),
    ("mean=0.5,0.5,zero", "mean=R/G/B"),
    ("std=nan", "std=R/G/B"),
])
def test_input_spec_bad_number_is_a_usage_error(tmp_path, image_dir, store_env, spec, form):
    flags = list(TINY_FLAGS)
    flags[flags.index("--input-spec") + 1] = spec
    idx = tmp_path / "idx"
    out = run_cli("build", str(idx), str(image_dir), *flags)
    assert out.returncode == 2, out.stderr
    assert "--input-spec" in out.stderr and form in out.stderr and "ValueError" not in out.stderr
    assert not idx.exists() and not store_env.exists()
