"""benchmarks/pretrained_torch.py: the shared pretrained ONNX models as torchvision checkpoints."""
from __future__ import annotations

import importlib.util
import json

from conftest import ROOT, needs_shared


def _module():
    spec = importlib.util.spec_from_file_location("pretrained_torch", ROOT / "benchmarks" / "pretrained_torch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_shared("weights", "squeezenet1.1-fp16.onnx")
@needs_shared("weights", "mobilenetv2-12-int8.onnx")
@needs_shared("data", "ukbench")
def test_checkpoints_compute_what_the_onnx_models_compute(tmp_path, capsys):
    assert _module().main(["--out", str(tmp_path), "--check-count", "4"]) == 0
    report = {k: v for line in capsys.readouterr().out.splitlines() for k, v in json.loads(line).items()}
    # fp16 weights in float: the same network
    assert report["squeezenet1_1"]["min_cosine"] >= 0.9999
    # float activations against the graph's uint8 ones: close, not equal (0.93-0.96 at the
    # last conv on UKBench; a weight put in the wrong convolution gives far less)
    assert report["mobilenet_v2"]["min_cosine"] >= 0.9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mobilenet_v2.pt", "squeezenet1_1.pt"]


def _export_int8(tmp_path, name: str, *flags: str) -> tuple[int, str]:
    """`retrieval export-onnx --int8` of the pretrained `name` made from ../shared -> (exit code, stdout)."""
    import contextlib
    import io

    import torch

    from retrieval.cli.app import main

    module = _module()
    _, _, layer, spec = module.MODELS[name]
    checkpoint = tmp_path / f"{name}.pt"
    torch.save(module.torch_state(name, module.SHARED / "weights"), checkpoint)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["export-onnx", str(tmp_path / f"{name}-int8.onnx"), "--backbone", name, "--weights",
                     str(checkpoint), "--layer", layer, *(["--input-spec", spec] if spec else []), "--int8",
                     "--calibrate", str(module.SHARED / "data" / "paris6k-mini" / "paris"), "--quiet", *flags])
    return code, out.getvalue()


@needs_shared("weights", "squeezenet1.1-fp16.onnx")
@needs_shared("data", "paris6k-mini", "paris")
def test_a_pretrained_network_exported_int8_agrees_with_float(tmp_path):
    """Random weights agree easily; real ones have the wide activation ranges that int8 clips."""
    code, out = _export_int8(tmp_path, "squeezenet1_1", "--json")
    assert code == 0
    agreement = json.loads(out)["int8"]["agreement"]
    assert agreement["heldout"] and agreement["windows"] == 64
    # 0.9975 / 0.991 measured (global min-max ranges: 0.9967 / 0.985)
    assert agreement["mean_cosine"] >= 0.99 and agreement["min_cosine"] >= 0.98


@needs_shared("weights", "mobilenetv2-12-int8.onnx")
@needs_shared("data", "paris6k-mini", "paris")
def test_a_low_int8_agreement_says_how_to_check_the_rankings(tmp_path):
    code, out = _export_int8(tmp_path, "mobilenet_v2")  # mean cosine 0.968 measured
    assert code == 0
    assert "mean cosine under 0.98" in out and f"--onnx {tmp_path / 'mobilenet_v2-int8.onnx'}" in out
    assert "--onnx-output features" in out and "order=rgb" in out
