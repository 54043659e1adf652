"""benchmarks/extract_speed.py's mode syntax: MODE, MODE@N, MODE:POOL."""
from __future__ import annotations

import importlib.util

import pytest

from conftest import ROOT
from retrieval.config import ExtractorConfig


@pytest.fixture(scope="module")
def extract_speed():
    spec = importlib.util.spec_from_file_location("extract_speed", ROOT / "benchmarks" / "extract_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mode_names_the_patch_mode_size_and_pooling(extract_speed):
    base = ExtractorConfig(backbone="resnet18", weights="none", pool="max")
    gem = extract_speed.with_mode(base, "pyramid:gem")
    assert (gem.patch_mode, gem.roi_size, gem.pool) == ("pyramid", None, "gem")
    sized = extract_speed.with_mode(base, "pyramid@384:avg")
    assert (sized.patch_mode, sized.roi_size, sized.pool) == ("pyramid", 384, "avg")
    plain = extract_speed.with_mode(base, "crop")
    assert (plain.patch_mode, plain.roi_size, plain.pool) == ("crop", None, "max")  # the backend's own pooling
    with pytest.raises(SystemExit, match="unknown pooling 'sum'"):
        extract_speed.with_mode(base, "roi:sum")
