"""Backbones: torch (random init, checkpoints, layers), ONNX export and generic ONNX cutting."""
from __future__ import annotations

import urllib.error
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

from retrieval.extraction.backbone import preprocess  # noqa: E402
from retrieval.extraction.backbones import load_backbone  # noqa: E402
from retrieval.extraction.onnx_export import export_onnx  # noqa: E402
from retrieval.extraction.torch_backbone import WeightsUnavailableError  # noqa: E402
from retrieval.config import ConfigError, ExtractorConfig, InputSpec  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WEIGHTS = SHARED / "weights"
UKBENCH = SHARED / "data" / "ukbench" / "full"
needs_shared = pytest.mark.skipif(
    not (WEIGHTS / "mobilenetv2-12-int8.onnx").is_file() or not UKBENCH.is_dir(),
    reason=f"../shared weights/images not present at {SHARED} (pretrained ONNX models and UKBench)",
)


def _images(n: int, size: int = 224, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


SMALL = InputSpec(size=(64, 64))  # keeps the torch tests fast on 2 cores


def _r18(**kw) -> ExtractorConfig:
    return ExtractorConfig(backbone="resnet18", weights=kw.pop("weights", "none"), input_spec=SMALL, **kw)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def r18():
    return load_backbone(_r18(), "cpu")


# ---------------------------------------------------------------------------- torch


def test_resnet18_default_layer_is_last_conv_map(r18):
    out = r18(_images(2, 64))
    assert r18.output_kind == "map" and out.dtype == np.float32
    assert out.shape == (2, 512, 2, 2)
    d = r18.summary()
    assert d["kind"] == "torch" and d["layer"] == "layer4" and d["weights"] == "random-init"
    assert d["device"] == "cpu" and r18.input_size == (64, 64) and r18.dynamic_size
    # other spatial sizes are accepted (roi mode feeds whole images)
    assert r18(_images(1, 128)).shape == (1, 512, 4, 4)
    assert r18(_images(0, 64)).shape == (0, 512, 2, 2)


def test_mobilenet_v3_default_and_penultimate():
    cfg = ExtractorConfig(backbone="mobilenet_v3_small", weights="none")
    bb = load_backbone(cfg, "cpu")
    assert bb.summary()["layer"] == "features" and bb.input_size == (224, 224)  # default size
    assert bb(_images(2)).shape == (2, 576, 7, 7)
    pen = load_backbone(
        ExtractorConfig(backbone="mobilenet_v3_small", weights="none", layer="penultimate", input_spec=SMALL), "cpu"
    )
    assert pen.output_kind == "vector"
    assert pen(_images(3, 64)).shape == (3, 1024)  # the hidden fc before the last Linear


def test_resnet18_penultimate_and_named_layer(r18):
    x = _images(2, 64, seed=3)
    pen = load_backbone(_r18(layer="penultimate"), "cpu")
    v = pen(x)
    assert pen.output_kind == "vector" and v.shape == (2, 512)
    # resnet: input of fc = global average of layer4
    np.testing.assert_allclose(v, r18(x).mean(axis=(2, 3)), rtol=1e-4, atol=1e-5)
    l3 = load_backbone(_r18(layer="layer3"), "cpu")
    assert l3.output_kind == "map" and l3(x).shape == (2, 256, 4, 4)


def test_bad_layer_lists_valid_names():
    with pytest.raises(ValueError) as err:
        load_backbone(_r18(layer="layer9"), "cpu")
    msg = str(err.value)
    assert "layer9" in msg and "layer4.1.relu_1" in msg and "penultimate" in msg


def test_bad_names_for_backbone_and_weights():
    with pytest.raises(ConfigError, match="resnet18"):
        load_backbone(ExtractorConfig(backbone="resnet181", weights="none"), "cpu")
    with pytest.raises(ConfigError, match="IMAGENET1K_V1"):
        load_backbone(ExtractorConfig(backbone="resnet18", weights="IMAGENET1K_V9"), "cpu")


def test_random_init_is_deterministic_and_leaves_caller_rng_alone(r18):
    x = _images(2, 64, seed=5)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    again = load_backbone(_r18(), "cpu")
    assert torch.equal(torch.get_rng_state(), state)
    np.testing.assert_array_equal(again(x), r18(x))


def test_bf16_precision_describes_close_to_fp32_and_is_stored_apart(tmp_path, monkeypatch):
    """--precision bf16: the extractor's descriptors of real image files stay within cosine
    0.999 of fp32's at every window; the store key differs (never mixed with fp32's), while
    fp32 keeps the key of a configuration written before the option existed."""
    import warnings

    import retrieval.extraction.torch_backbone as tb
    from conftest import make_scene
    from retrieval.extraction.extractor import Extractor, Job
    from retrieval.extraction.patches import level_regions

    monkeypatch.setattr(tb, "native_bf16", lambda device="cpu": True)  # this test checks values, not speed
    paths = []
    for seed in range(3):
        make_scene(seed).save(tmp_path / f"{seed}.jpg", quality=90)
        paths.append(str(tmp_path / f"{seed}.jpg"))
    regions = (level_regions(1), level_regions(2))
    described = {}
    for precision in ("fp32", "bf16"):
        ex = Extractor(_r18(precision=precision))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # native bf16 (patched): no warning
            out = list(ex.extract([Job(p, regions) for p in paths], progress=False))
        described[precision] = np.concatenate([np.concatenate(list(o.descriptors.values())) for o in out])
        assert ex.backbone.summary()["precision"] == precision
    a, b = described["fp32"], described["bf16"]
    assert not np.array_equal(a, b)  # bf16 did run
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert len(cosine) == 3 * 5 and cosine.min() >= 0.999
    fp32, bf16 = _r18(), _r18(precision="bf16")
    assert bf16.key() != fp32.key()
    before_the_option = {k: v for k, v in fp32.to_dict().items() if k != "precision"}
    assert ExtractorConfig.from_dict(before_the_option).key() == fp32.key()
    assert ExtractorConfig.from_dict(bf16.to_dict()) == bf16


def test_bf16_without_native_support_warns_and_onnx_or_export_refuse_it(tmp_path, monkeypatch):
    import retrieval.extraction.torch_backbone as tb

    monkeypatch.setattr(tb, "native_bf16", lambda device="cpu": False)
    with pytest.warns(RuntimeWarning, match="no native bf16 here.*--precision fp32"):
        bb = load_backbone(_r18(precision="bf16"), "cpu")
    assert bb(_images(1, 64)).dtype == np.float32
    with pytest.raises(ConfigError, match="applies to torch backbones"):
        ExtractorConfig(onnx="model.onnx", precision="bf16")
    with pytest.raises(ConfigError, match="fp32, bf16"):
        ExtractorConfig(precision="fp16")
    with pytest.raises(ConfigError, match="drop --precision bf16"):
        export_onnx(_r18(precision="bf16"), str(tmp_path / "m.onnx"))
    assert not (tmp_path / "m.onnx").exists()


def test_download_failure_is_explained(monkeypatch):
    import torchvision.models._api as api

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailableError) as err:
        load_backbone(ExtractorConfig(backbone="resnet18", weights="DEFAULT"), "cpu")
    msg = str(err.value)
    assert "--weights none" in msg and "--onnx" in msg and "IMAGENET1K_V1" in msg


def test_local_checkpoint(tmp_path, r18):
    torch.manual_seed(1)  # other weights than the seeded random init
    model = torchvision.models.resnet18().eval()
    sd = model.state_dict()
    x = _images(2, 64, seed=7)
    plain = tmp_path / "r18.pth"
    torch.save(sd, plain)
    wrapped = tmp_path / "r18_wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, wrapped)
    outs = []
    for path in (plain, wrapped):
        bb = load_backbone(_r18(weights=str(path), layer="penultimate"), "cpu")
        assert bb.summary()["weights"] == f"checkpoint:{path.resolve()}"
        outs.append(bb(x))
    np.testing.assert_array_equal(outs[0], outs[1])
    with torch.inference_mode():
        ref = torch.flatten(
            torch.nn.Sequential(*list(model.children())[:-1])(torch.from_numpy(preprocess(x, InputSpec()))), 1
        ).numpy()
    assert _rel(outs[0], ref) < 1e-4
    assert _rel(r18(x).mean(axis=(2, 3)), ref) > 1e-2  # really other weights


def test_checkpoint_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": Path("x")}, path)
    with pytest.raises(ConfigError, match="weights-only"):
        load_backbone(_r18(weights=str(path)), "cpu")


# ---------------------------------------------------------------------------- ONNX export / generic ONNX


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "r18_layer4.onnx"
    info = export_onnx(_r18(layer="layer4"), str(path))
    return path, info


def test_export_onnx_parity(exported, r18):
    path, info = exported
    assert info["path"] == str(path) and path.is_file()
    assert info["input"] == "input" and info["output"] == "features"
    assert info["max_rel_error"] <= 1e-4
    # independent check, at the default size and a larger one (dynamic H/W) and another batch
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n, size in ((2, 64), (3, 96)):
        x = _images(n, size, seed=size)
        got = sess.run(["features"], {"input": preprocess(x, r18.spec)})[0]
        ref = r18(x)
        assert got.shape == ref.shape == (n, 512, size // 32, size // 32)
        assert _rel(got, ref) <= 1e-4


def test_onnx_generic_cut_at_intermediate_tensor(exported):
    path, _ = exported
    model = onnx.load(str(path))
    # layer3's output feeds layer4's stride-2 1x1 downsample conv (the last such conv)
    def attr(node, name):
        return [list(a.ints) for a in node.attribute if a.name == name]

    downs = [
        n for n in model.graph.node
        if n.op_type == "Conv" and attr(n, "kernel_shape") == [[1, 1]] and attr(n, "strides") == [[2, 2]]
    ]
    tensor = downs[-1].input[0]
    bb = load_backbone(ExtractorConfig(onnx=str(path), onnx_output=tensor, input_spec=SMALL), "cpu")
    x = _images(3, 64, seed=11)
    got = bb(x)
    assert bb.output_kind == "map" and bb.dynamic_size and got.shape == (3, 256, 4, 4)
    d = bb.summary()
    assert d["kind"] == "onnx" and d["output"] == tensor and d["provider"] == "CPUExecutionProvider"
    ref = load_backbone(_r18(layer="layer3"), "cpu")(x)
    assert _rel(got, ref) <= 1e-4
    assert bb(_images(1, 128)).shape == (1, 256, 8, 8)
    # default output: the graph's first output; the size defaults to 224 (symbolic H/W)
    full = load_backbone(ExtractorConfig(onnx=str(path)), "cpu")
    assert full.input_size == (224, 224) and full(x).shape == (3, 512, 2, 2)


def test_onnx_bad_tensor_name(exported):
    path, _ = exported
    with pytest.raises(ValueError) as err:
        load_backbone(ExtractorConfig(onnx=str(path), onnx_output="no_such_tensor"), "cpu")
    msg = str(err.value)
    assert str(path) in msg and "features" in msg


def _pinned_batch_model(path: Path) -> None:
    """Conv then a Reshape to a constant [1, 4, 30, 30]: neither batch nor size can change."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["y"]),
        helper.make_node("Reshape", ["y", "shape"], ["z"]),
        helper.make_node("Relu", ["z"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes, "pinned",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 30, 30])],
        initializer=[numpy_helper.from_array(w, "w"),
                     numpy_helper.from_array(np.array([1, 4, 30, 30], np.int64), "shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_onnx_fixed_batch_is_looped(tmp_path):
    path = tmp_path / "pinned.onnx"
    _pinned_batch_model(path)
    bb = load_backbone(ExtractorConfig(onnx=str(path)), "cpu")
    assert bb.input_size == (32, 32) and not bb.dynamic_size
    assert bb.summary()["batch"] == 1
    x = _images(3, 32, seed=2)
    out = bb(x)
    assert out.shape == (3, 4, 30, 30)
    for i in range(3):
        np.testing.assert_array_equal(out[i : i + 1], bb(x[i : i + 1]))
    with pytest.raises(ValueError, match="32x32"):
        bb(_images(1, 64))


def test_preprocess_applies_order_scale_mean_std_dtype():
    img = np.zeros((1, 2, 2, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 10, 20, 30  # R, G, B
    spec = InputSpec.parse("order=bgr,scale=255,mean=104/117/123,std=1,dtype=float16")
    x = preprocess(img, spec)
    assert x.dtype == np.float16 and x.shape == (1, 3, 2, 2)
    np.testing.assert_allclose(x[0, :, 0, 0], [30 - 104, 20 - 117, 10 - 123])
    y = preprocess(img, InputSpec())
    np.testing.assert_allclose(y[0, :, 0, 0], (np.array([10, 20, 30]) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225], rtol=1e-5)


# ---------------------------------------------------------------------------- real pretrained models (../shared)


def _ukbench(n: int, size: int = 224) -> np.ndarray:
    from PIL import Image

    files = sorted(UKBENCH.glob("ukbench*.jpg"))[:n]
    return np.stack([np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BILINEAR)) for f in files])


@pytest.mark.shared
@needs_shared
def test_mobilenetv2_int8_cut_at_627():
    path = WEIGHTS / "mobilenetv2-12-int8.onnx"
    bb = load_backbone(ExtractorConfig(onnx=str(path), onnx_output="627"), "cpu")
    x = _ukbench(3)
    out = bb(x)
    assert out.shape == (3, 1280, 7, 7) and out.dtype == np.float32
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() > 0  # ReLU6 map
    assert bb.dynamic_size and bb.spec.dtype == "float32" and bb.input_size == (224, 224)
    big = bb(_ukbench(1, 448))
    assert big.shape == (1, 1280, 14, 14)
    # the same values as the uncut graph's own tensor
    full = onnx.load(str(path))
    full.graph.output.append(onnx.helper.make_tensor_value_info("627", onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(full.SerializeToString(), providers=["CPUExecutionProvider"])
    ref_map, ref_logits = sess.run(["627", "output"], {"input": preprocess(x, InputSpec())})
    assert _rel(out, ref_map) <= 1e-5
    # logits: same argmax as the uncut model, whatever the batch composition
    logits = load_backbone(ExtractorConfig(onnx=str(path), onnx_output="output"), "cpu")
    assert logits.output_kind == "vector"
    top = logits(x).argmax(1)
    np.testing.assert_array_equal(top, ref_logits.argmax(1))
    np.testing.assert_array_equal(top[1:2], logits(x[1:2]).argmax(1))


@pytest.mark.shared
@needs_shared
def test_squeezenet_fp16_fixed_batch_cut():
    path = WEIGHTS / "squeezenet1.1-fp16.onnx"
    text = "order=bgr,scale=255,mean=104/117/123,std=1"
    spec = InputSpec.parse(text)
    assert (spec.order, spec.scale, spec.mean, spec.std) == ("bgr", 255.0, (104.0, 117.0, 123.0), (1.0, 1.0, 1.0))
    bb = load_backbone(ExtractorConfig(onnx=str(path), onnx_output="fire9/concat_1", input_spec=spec), "cpu")
    assert bb.spec.dtype == "float16"  # from the graph, the user did not say
    assert bb.input_size == (224, 224)
    x = _ukbench(2)
    out = bb(x)
    assert out.shape == (2, 512, 13, 13) and out.dtype == np.float32 and np.isfinite(out).all()
    # reference: the uncut graph, one image at a time (its batch is fixed to 1)
    full = onnx.load(str(path))
    full.graph.output.append(onnx.helper.make_tensor_value_info("fire9/concat_1", onnx.TensorProto.FLOAT16, None))
    sess = ort.InferenceSession(full.SerializeToString(), providers=["CPUExecutionProvider"])
    xin = preprocess(x, bb.spec)
    ref = np.concatenate([sess.run(["fire9/concat_1"], {"data_0": xin[i : i + 1]})[0] for i in range(2)])
    assert _rel(out, ref.astype(np.float32)) <= 1e-2


def test_prepared_onnx_graph_is_reused_without_importing_onnx(exported, tmp_path):
    """A second process loading the same model, output and spec restores the prepared
    graph from the cache: the same outputs, no `onnx` import, no probing."""
    import json
    import os
    import subprocess
    import sys

    path, _ = exported
    env = {**os.environ, "RETRIEVAL_ONNX_CACHE": str(tmp_path / "cache")}
    script = (
        "import json, sys, numpy as np\n"
        "from retrieval.config import ExtractorConfig, InputSpec\n"
        "from retrieval.extraction.backbones import load_backbone\n"
        f"bb = load_backbone(ExtractorConfig(onnx={str(path)!r}, input_spec=InputSpec(size=(64, 64))), 'cpu')\n"
        "x = np.random.default_rng(5).integers(0, 256, size=(2, 96, 64, 3), dtype=np.uint8)\n"
        "print(json.dumps({'onnx': 'onnx' in sys.modules, 'out': bb(x).ravel()[::97].tolist(),\n"
        "                  'info': bb.summary()}))\n"
    )
    runs = [json.loads(subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                                      check=True, timeout=300).stdout) for _ in range(2)]
    assert runs[0]["onnx"] and not runs[1]["onnx"]
    assert runs[0]["out"] == runs[1]["out"] and runs[0]["info"] == runs[1]["info"]
    assert len(list((tmp_path / "cache").glob("*.onnx"))) == 1
