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


def test_torch_backends_take_a_checkpoint_from_torch_weights_when_there_is_one(extract_speed, tmp_path):
    import argparse

    (tmp_path / "mobilenet_v2.pt").write_bytes(b"")  # only its presence is read here
    args = argparse.Namespace(weights=str(tmp_path), torch_weights=str(tmp_path),
                              backends="torch-mobilenet_v2,torch-resnet50,torch-squeezenet1_1")
    got = extract_speed.backends(args)
    assert got["torch-mobilenet_v2"].weights == str((tmp_path / "mobilenet_v2.pt").resolve())
    assert got["torch-resnet50"].weights == "none"  # no resnet50.pt: random init
    assert got["torch-squeezenet1_1"].input_spec.order == "bgr"  # Caffe's input
    args.torch_weights = None
    assert extract_speed.backends(args)["torch-mobilenet_v2"].weights == "none"
