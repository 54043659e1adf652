"""The factor study: `retrieval layers`, cutting a quantized model anywhere, `classify
factors` (grid, store reuse, fusion, plot) and `retrieval_map.py --sweep` over layers."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import MOBILENET, ROOT, SHARED, make_scene, needs_shared

SQUEEZENET = SHARED / "weights" / "squeezenet1.1-fp16.onnx"
R18 = ["--backbone", "resnet18", "--weights", "none", "--input-spec", "size=64", "--device", "cpu",
       "--workers", "1", "--quiet"]


def _retrieval(capsys, *argv: str) -> tuple[int, str, str]:
    from retrieval.cli import app as cli

    try:
        code = cli.main(list(argv))
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def _layers(capsys, *flags: str) -> dict:
    code, out, err = _retrieval(capsys, "layers", *flags, "--json")
    assert code == 0, err
    return {lay["name"]: lay for lay in json.loads(out)["layers"]}


@needs_shared("weights", "mobilenetv2-12-int8.onnx")
def test_layers_of_int8_mobilenet(capsys):
    layers = _layers(capsys, "--onnx", str(MOBILENET))
    assert layers["627"]["shape"] == [1280, 7, 7] and layers["627"]["kind"] == "map"
    assert not layers["627"]["quantized"]
    block = layers["356_quantized"]  # output of block 5 of 17
    assert block["shape"] == [32, 28, 28] and block["kind"] == "map"
    assert block["quantized"] and block["dtype"] == "uint8" and 0.2 < block["depth"] < 0.3
    assert layers["output"]["shape"] == [1000] and layers["output"]["kind"] == "vector"
    depths = [lay["depth"] for lay in layers.values()]
    assert depths == sorted(depths)


@needs_shared("weights", "squeezenet1.1-fp16.onnx")
def test_layers_of_fp16_squeezenet(capsys):
    layers = _layers(capsys, "--onnx", str(SQUEEZENET))
    assert layers["fire9/concat_1"]["shape"] == [512, 13, 13] and layers["fire9/concat_1"]["kind"] == "map"
    assert layers["fire3/concat_1"]["shape"] == [128, 55, 55]
    assert layers["fire9/concat_1"]["dtype"] == "float16"
    # the Dropout's mask is a bool tensor: listed, not usable
    assert all(lay["kind"] == "other" for lay in layers.values() if lay["dtype"] == "bool")


def test_layers_of_random_torchvision_model(capsys):
    layers = _layers(capsys, "--backbone", "resnet18", "--weights", "none")
    assert layers["layer4.1.relu_1"]["shape"] == [512, 7, 7] and layers["layer4.1.relu_1"]["kind"] == "map"
    assert layers["layer2.1.relu_1"]["shape"] == [128, 28, 28]
    assert layers["penultimate"]["shape"] == [512] and layers["penultimate"]["kind"] == "vector"
    code, out, _ = _retrieval(capsys, "layers", "--backbone", "resnet18", "--input-spec", "size=64", "--maps-only")
    assert code == 0 and "layer3.1.relu_1" in out and "2x2" in out and "penultimate" not in out
    code, _, err = _retrieval(capsys, "layers", "--backbone", "resnet18", "--onnx", "x.onnx")
    assert code == 2 and "not allowed with" in err


@needs_shared("weights", "mobilenetv2-12-int8.onnx")
def test_quantized_cut_is_dequantized_with_the_producers_scale():
    """Cut at a uint8 tensor: the backbone returns (q - zero_point) * scale, in float32."""
    import onnx
    import onnxruntime as ort

    from retrieval.extraction.backbones import load_backbone
    from retrieval.config import ExtractorConfig
    from retrieval.extraction.onnx_backbone import cut_onnx, quantization_of

    images = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    bb = load_backbone(ExtractorConfig(onnx=str(MOBILENET), onnx_output="391_quantized"), "cpu")
    got = bb(images)
    assert got.dtype == np.float32 and got.shape == (2, 64, 14, 14) and bb.summary()["dequantized"]

    model = onnx.load(str(MOBILENET))
    raw = ort.InferenceSession(cut_onnx(model, "391_quantized", out_type=onnx.TensorProto.UINT8).SerializeToString(),
                               providers=["CPUExecutionProvider"])
    q = raw.run(None, {"input": bb._prep(images)})[0]
    assert q.dtype == np.uint8
    scale_name, zero_name = quantization_of(model, "391_quantized")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    expected = (q.astype(np.float32) - inits[zero_name].astype(np.float32)) * inits[scale_name]
    assert np.allclose(got, expected, atol=1e-6)


def _dataset(root):
    """Two classes of generated scenes (train 4 + test 2 each)."""
    for split, n in (("train", 4), ("test", 2)):
        for c, cls in enumerate(("a", "b")):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                make_scene(100 * c + 10 * (split == "test") + i, size=(96, 72)).save(folder / f"{i}.jpg")
    return root


def _factors(capsys, *argv):
    from classify import cli

    code = cli.main(["factors", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_classify_factors_grid_store_and_plot(tmp_path, capsys):
    data = _dataset(tmp_path / "data")
    store, plot = tmp_path / "s.sqlite", tmp_path / "f.png"
    argv = [str(data), *R18, "--layer", "layer2,layer3", "--pool", "avg,max", "--pca-dim", "0,4", "--cv", "2",
            "--store", str(store), "--json"]
    code, out, err = _factors(capsys, *argv, "--plot", str(plot))
    assert code == 0, err
    result = json.loads(out)
    rows = result["rows"]
    assert len(rows) == 8
    assert {(r["layer"], r["pool"], r["pca_dim"]) for r in rows} == {
        (lay, pool, pca) for lay in ("layer2", "layer3") for pool in ("avg", "max") for pca in (0, 4)}
    dims = {(r["layer"], r["pca_dim"]): r["dim"] for r in rows}
    assert dims == {("layer2", 0): 128, ("layer3", 0): 256, ("layer2", 4): 4, ("layer3", 4): 4}
    # each (layer, pooling) extracted the 12 images once, charged to its first row
    assert result["extracted"] == 4 * 12 and sorted(r["extracted"] for r in rows) == [0] * 4 + [12] * 4
    assert all(r["train"] == 8 and r["test"] == 4 and 0 <= r["accuracy"] <= 1 for r in rows)
    assert rows[0]["depth"] < rows[-1]["depth"]  # layer2 before layer3
    with Image.open(plot) as img:
        img.load()
        assert img.format == "PNG" and img.width > 300

    code, out, err = _factors(capsys, *argv)
    assert code == 0, err
    again = json.loads(out)
    assert again["extracted"] == 0 and all(r["from_store"] == 12 for r in again["rows"])
    assert [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in rows]


def test_classify_factors_fusion_has_summed_dimension(tmp_path, capsys):
    data = _dataset(tmp_path / "data")
    code, out, err = _factors(capsys, str(data), *R18, "--layer", "layer2", "--fuse", "layer2+layer3",
                              "--power-norm", "on,off", "--cv", "2", "--store", str(tmp_path / "s.sqlite"), "--json")
    assert code == 0, err
    rows = {(r["layer"], r["power_norm"]): r for r in json.loads(out)["rows"]}
    assert set(rows) == {("layer2", True), ("layer2", False), ("layer2+layer3", True), ("layer2+layer3", False)}
    assert rows[("layer2+layer3", False)]["dim"] == 128 + 256 and rows[("layer2+layer3", False)]["depth"] is None
    assert rows[("layer2+layer3", False)]["parts"] == ["layer2", "layer3"]


@pytest.mark.parametrize("flags", [
    ["--pool", "avg,median"], ["--pca-dim", "0,-8"], ["--jitter", "1,3"], ["--power-norm", "maybe"],
    ["--method", "knn"], ["--fuse", "layer2"], ["--layer", "layer9"], ["--onnx-output", "x"],
])
def test_classify_factors_bad_flags_are_usage_errors_and_write_nothing(tmp_path, capsys, flags):
    data = _dataset(tmp_path / "data")
    store, plot = tmp_path / "s.sqlite", tmp_path / "f.png"
    code, out, err = _factors(capsys, str(data), *R18, *flags, "--store", str(store), "--plot", str(plot))
    assert code == 2 and "error" in err and out == ""
    assert not plot.exists() and not store.exists()


def test_retrieval_map_sweeps_layers_and_poolings(tmp_path):
    import subprocess
    import sys

    root = tmp_path / "ukbench"
    (root / "full").mkdir(parents=True)
    for g in range(2):
        scene = make_scene(300 + g, size=(200, 150))
        for j, img in enumerate([scene, scene.crop((10, 8, 190, 140)), scene.crop((0, 0, 180, 150)),
                                 scene.crop((20, 0, 200, 150))]):
            img.resize((160, 120)).save(root / "full" / f"ukbench{4 * g + j:05d}.jpg")
    out, plot = tmp_path / "sweep.json", tmp_path / "sweep.png"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "retrieval_map.py"), "--dataset", "ukbench", "--root", str(root),
         *R18, "--levels", "1", "--pca-dim", "0", "--timing-sample", "0", "--store", str(tmp_path / "s.sqlite"),
         "--sweep", "--layer-grid", "layer2,layer3", "--pool-grid", "avg,gem", "--json", str(out),
         "--plot", str(plot)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert {(r["config"]["extractor"]["layer"], r["config"]["extractor"]["pool"]) for r in rows} == {
        (lay, pool) for lay in ("layer2", "layer3") for pool in ("avg", "gem")}
    assert all(r["metric"] == "ns" and 1 <= r["value"] <= 4 for r in rows)
    assert any("--layer layer3 " in r["command"] and "--pool gem " in r["command"] for r in rows)
    with Image.open(plot) as img:
        assert img.format == "PNG"
