"""`retrieval export-onnx --int8 --calibrate DIR`: a statically quantized model that loads
with --onnx and describes images like the float model; and its usage errors."""
from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime.quantization")
pytest.importorskip("torchvision")

from conftest import SHARED, make_scene, run_cli  # noqa: E402
from retrieval.cli.app import main  # noqa: E402
from retrieval.config import ExtractorConfig, InputSpec, RuntimeConfig  # noqa: E402
from retrieval.extraction.extractor import Extractor, Job  # noqa: E402
from retrieval.extraction.patches import level_regions  # noqa: E402

UKBENCH = SHARED / "data" / "ukbench" / "full"
# Random-init ResNet-18 cut at layer3, fed 64 x 64 windows: a real network, fast on 2 cores.
MODEL = ["--backbone", "resnet18", "--weights", "none", "--layer", "layer3", "--input-spec", "size=64"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """12 photos: UKBench images when ../shared is mounted, generated scenes otherwise."""
    folder = tmp_path_factory.mktemp("calib")
    if UKBENCH.is_dir():
        for p in sorted(UKBENCH.glob("*.jpg"))[:12]:
            shutil.copy(p, folder / p.name)
    else:
        for i in range(12):
            make_scene(100 + i, size=(320, 240)).save(folder / f"scene{i:02d}.jpg", quality=90)
    return folder


@pytest.fixture(scope="module")
def int8_export(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "r18_layer3_int8.onnx"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["export-onnx", str(out), *MODEL, "--int8", "--calibrate", str(photos),
                     "--calibrate-images", "8", "--json", "--quiet"])
    assert code == 0
    return out, json.loads(buf.getvalue())


def test_int8_export_reports_calibration_and_agreement(int8_export, photos):
    path, info = int8_export
    assert path.is_file() and info["path"] == str(path)
    q = info["int8"]
    assert q["format"] == "qdq" and q["pre_processed"]
    assert q["calibration"]["images"] == 8 and q["calibration"]["windows"] == 8 * 4
    assert q["calibration"]["dir"] == str(photos.resolve()) and q["calibration"]["skipped"] == []
    agr = q["agreement"]
    assert agr["heldout"] and agr["images"] == 4 and agr["windows"] == 4 * 4 and agr["pool"] == "avg"
    assert 0.98 <= agr["min_cosine"] <= agr["mean_cosine"] <= 1.0
    assert q["bytes"] < q["float_bytes"] / 3  # int8 weights
    # QuantizeLinear / DequantizeLinear nodes, and the export's metadata kept
    import onnx

    m = onnx.load(str(path))
    ops = {n.op_type for n in m.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta["retrieval.layer"] == "layer3" and "qdq" in meta["retrieval.int8"]


def test_int8_model_loads_with_onnx_and_agrees_with_float(int8_export, photos):
    path, info = int8_export
    spec = InputSpec.parse(info["input_spec"])
    paths = sorted(str(p) for p in photos.glob("*.jpg"))[:3]
    regions = (level_regions(1), level_regions(2))

    def describe(config):
        ex = Extractor(config, RuntimeConfig("cpu", 16, 1))
        out = [r.descriptors for r in ex.extract([Job(p, regions) for p in paths], progress=False)]
        return ex, np.concatenate([np.concatenate([d[k] for k in sorted(d)]) for d in out])

    ex, got = describe(ExtractorConfig(onnx=str(path), input_spec=spec))
    d = ex.backbone.summary()
    assert d["kind"] == "onnx" and d["output"] == "features" and not d["dequantized"]
    assert d["output_kind"] == "map" and d["output_shape"] == [256, 4, 4]
    _, ref = describe(ExtractorConfig(backbone="resnet18", weights="none", layer="layer3", input_spec=spec))
    assert got.shape == ref.shape == (3 * 5, 256)
    cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() >= 0.98, cos


def test_int8_qoperator_format_and_an_unreadable_image(photos, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for p in sorted(photos.glob("*.jpg"))[:4]:
        shutil.copy(p, folder / p.name)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "q.onnx"
    r = run_cli("export-onnx", str(out), *MODEL, "--int8", "--int8-format", "qoperator",
                "--calibrate", str(folder), "--calibrate-images", "3")
    # done, but an input was skipped (SPEC exit 3), and named
    assert r.returncode == 3, r.stderr
    assert f"skipped {folder / 'broken.jpg'}" in r.stderr
    assert "mean cosine" in r.stdout and "3 images" in r.stdout and "1 held-out" in r.stdout
    import onnx

    assert "QLinearConv" in {n.op_type for n in onnx.load(str(out)).graph.node}


@pytest.mark.parametrize("flags, message", [
    (["--int8"], "--int8 needs --calibrate DIR"),
    (["--calibrate", "{photos}"], "add --int8"),
    (["--int8", "--calibrate", "{photos}", "--calibrate-images", "0"], "--calibrate-images must be >= 1"),
    (["--int8", "--calibrate", "{missing}"], "no such folder"),
    (["--int8", "--calibrate", "{empty}"], "no image files"),
    (["--int8", "--calibrate", "{broken}"], "no readable image"),
    (["--int8", "--calibrate", "{photos}", "--int8-format", "int4"], "invalid choice"),
])
def test_int8_usage_errors_write_nothing(tmp_path, photos, flags, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "broken" / "b.png").write_bytes(b"")
    names = {"photos": photos, "missing": tmp_path / "nope", "empty": tmp_path / "empty",
             "broken": tmp_path / "broken"}
    out = tmp_path / "out" / "m.onnx"
    r = run_cli("export-onnx", str(out), *MODEL, *[f.format(**names) for f in flags])
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert not out.parent.exists()


def test_agreement_cosine_is_scale_free():
    from retrieval.extraction.onnx_export import cosines

    rng = np.random.default_rng(0)
    a = rng.random((4, 1280)) * 1e-9  # a random-init MobileNetV2's pooled features are this small
    assert np.allclose(cosines(a, 3 * a), 1.0)
    assert np.allclose(cosines(a, -a), -1.0)
    assert cosines(np.zeros((1, 3)), np.zeros((1, 3)))[0] == 1.0
    assert cosines(np.zeros((1, 3)), np.ones((1, 3)))[0] == 0.0
