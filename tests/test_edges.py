"""Issue 9, "every edge a user hits": clear errors, right exit codes, nothing half-written."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from classify import cli as classify_cli
from conftest import SELF_DISTANCE, TINY_FLAGS, make_scene, run_cli
from retrieval.cli import app as retrieval_cli
from retrieval.cli.util import EXIT_BROKEN_PIPE
from retrieval.extraction.images import load_rgb


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


def _stretch_reference(arr: np.ndarray) -> np.ndarray:
    """The 16-bit -> 8-bit conversion spelled out on a whole array: [min, max] -> 0..255."""
    a = arr.astype(np.float64)
    return ((a - a.min()) / (a.max() - a.min()) * 255.0).astype(np.uint8)


def test_large_16bit_png_decodes_right_in_bounded_memory(tmp_path):
    rng = np.random.default_rng(3)
    tile = rng.integers(0, 65536, size=(40, 50), dtype=np.uint16)
    tile[0, 0], tile[0, 1] = 0, 65535  # every tile holds the global min and max
    small = tmp_path / "small16.png"
    Image.fromarray(tile).save(small)
    expected_tile = _stretch_reference(tile)
    got_small = np.asarray(load_rgb(small))
    assert got_small.shape == (40, 50, 3)
    assert all(np.array_equal(got_small[..., c], expected_tile) for c in range(3))

    reps = (75, 80)  # 3000 x 4000 pixels
    big = tmp_path / "big16.png"
    Image.fromarray(np.tile(tile, reps)).save(big)
    with Image.open(big) as probe:
        assert probe.mode == "I;16"
    # tracemalloc sees what numpy and Python allocate (the conversion's working memory),
    # not the buffers Pillow decodes into, which the RGB result needs anyway.
    tracemalloc.start()
    try:
        img = load_rgb(big)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    h, w = 40 * reps[0], 50 * reps[1]
    assert img.size == (w, h) and img.mode == "RGB"
    # The uint8 result (h * w bytes per band) is the floor; a float64 copy of the whole
    # image alone would be 8 * h * w.
    assert peak < 3 * h * w, f"peak {peak / 1e6:.0f} MB for a {h * w / 1e6:.0f} Mpx image"
    got = np.asarray(img)
    assert np.array_equal(got[..., 0], np.tile(expected_tile, reps))
    assert np.array_equal(got[..., 2], got[..., 0])


CLASSIFY_TINY = ["--backbone", "resnet18", "--weights", "none", "--input-spec", "size=64",
                 "--batch-size", "16", "--quiet"]


def _class_folders(root, classes, per_class):
    for split, n in (("train", per_class), ("test", 1)):
        for ci, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                make_scene(100 * ci + 10 * (split == "test") + i, size=(48, 40)).save(folder / f"{i}.jpg")
    return root


@pytest.mark.parametrize("cv,message", [
    ("10", "--cv 10 needs at least 10 training images in some class, but the largest class has 3: use --cv 3"),
    ("0", "argument --cv: folds must be an integer >= 2 (got '0')"),
    ("1", "argument --cv: folds must be an integer >= 2 (got '1')"),
    ("-1", "argument --cv: folds must be an integer >= 2 (got '-1')"),
])
def test_classify_bad_cv_is_a_usage_error_quoting_the_value(tmp_path, cv, message):
    data = _class_folders(tmp_path / "data", ["ants", "bees"], 3)
    store = tmp_path / "s.sqlite"
    out = run_cli("run", str(data), "--cv", cv, "--store", str(store), *CLASSIFY_TINY, module="classify.cli")
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert not store.exists()  # refused before any extraction


def test_classify_one_class_dataset_is_a_usage_error(tmp_path):
    data = _class_folders(tmp_path / "data", ["ants"], 3)
    store = tmp_path / "s.sqlite"
    out = run_cli("run", str(data), "--store", str(store), *CLASSIFY_TINY, module="classify.cli")
    assert out.returncode == 2, out.stderr
    assert "'ants'" in out.stderr and "at least 2" in out.stderr
    assert not store.exists()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> dict:
    """A model trained by `classify train` with the tiny extractor, its store and an image."""
    root = tmp_path_factory.mktemp("tiny-model")
    data = _class_folders(root / "data", ["ants", "bees"], 4)
    model, store = root / "model.npz", root / "s.sqlite"
    out = run_cli("train", str(data), "--out", str(model), "--store", str(store), *CLASSIFY_TINY,
                  module="classify.cli")
    assert out.returncode == 0, out.stderr
    return {"model": model, "store": store, "image": data / "test" / "bees" / "0.jpg"}


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory) -> dict:
    """An index built by `retrieval build` with the tiny extractor."""
    root = tmp_path_factory.mktemp("tiny-index")
    images = root / "images"
    images.mkdir()
    for i in range(4):
        make_scene(i).save(images / f"img{i}.jpg")
    env = {"RETRIEVAL_STORE": str(root / "features.sqlite")}
    out = run_cli("build", str(root / "idx"), str(images), *TINY_FLAGS, env=env)
    assert out.returncode == 0, out.stderr
    return {"index": root / "idx", "image": images / "img0.jpg", "env": env}


def test_model_with_nan_weights_refused_naming_the_file(tiny_model, tmp_path):
    bad = tmp_path / "nan-model.npz"
    with np.load(tiny_model["model"]) as npz:
        arrays = {name: npz[name] for name in npz.files}
    arrays["W"][0, 0] = np.nan
    with open(bad, "wb") as fh:
        np.savez(fh, **arrays)
    out = run_cli("predict", str(bad), str(tiny_model["image"]), "--store", str(tiny_model["store"]), "--json",
                  "--quiet", module="classify.cli")
    assert out.returncode == 1, out.stdout
    assert str(bad) in out.stderr and "NaN" in out.stderr
    assert out.stdout == ""


def _run_into_closed_pipe(module: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a CLI whose stdout is a pipe nobody reads any more (`... | head -0`)."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # closed before the command starts: every write to stdout fails
    try:
        return subprocess.run([sys.executable, "-m", module, *args], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, **(env or {})}, timeout=300)
    finally:
        os.close(write_end)


def test_retrieval_output_into_closed_pipe_exits_quietly(tiny_index):
    out = _run_into_closed_pipe("retrieval.cli", "info", str(tiny_index["index"]), env=tiny_index["env"])
    assert (out.returncode, out.stderr) == (EXIT_BROKEN_PIPE, "")


def test_classify_output_into_closed_pipe_exits_quietly(tiny_model):
    out = _run_into_closed_pipe("classify.cli", "predict", str(tiny_model["model"]), str(tiny_model["image"]),
                                "--store", str(tiny_model["store"]), "--quiet")
    assert (out.returncode, out.stderr) == (EXIT_BROKEN_PIPE, "")


def test_classify_predict_of_a_non_image_prints_nothing_on_stdout(tiny_model, tmp_path):
    """Issue 23 row 15: stdout holds the predictions (or the JSON) and nothing else."""
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    args = ["predict", str(tiny_model["model"]), str(text), "--store", str(tiny_model["store"]), "--quiet"]
    out = run_cli(*args, module="classify.cli")
    assert (out.returncode, out.stdout) == (3, "") and f"{text}" in out.stderr
    out = run_cli(*args, "--json", module="classify.cli")
    assert out.returncode == 3 and json.loads(out.stdout)["predictions"] == []


def test_bad_flag_shows_the_subcommands_usage(tiny_index, tiny_model):
    out = run_cli("query", str(tiny_index["index"]), str(tiny_index["image"]), "--bogus", env=tiny_index["env"])
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("usage: retrieval query ") and "unrecognized arguments: --bogus" in out.stderr
    out = run_cli("predict", str(tiny_model["model"]), str(tiny_model["image"]), "--bogus", module="classify.cli")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("usage: classify predict ") and "unrecognized arguments: --bogus" in out.stderr


@pytest.mark.parametrize("build_parser", [retrieval_cli.build_parser, classify_cli.build_parser])
def test_every_positional_is_explained_in_help(build_parser):
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, sub in commands.choices.items():
        for action in sub._actions:
            if not action.option_strings:
                assert action.help, f"{parser.prog} {name}: {action.metavar} has no help text"


# -- the index's own edges (rows 1-5, 7-9) --------------------------------------------------
def test_bad_factory_is_refused_before_anything_is_written(tmp_path, image_dir, store_env):
    idx = tmp_path / "f1"
    out = run_cli("build", str(idx), str(image_dir), *TINY_FLAGS, "--index-type", "Bogus,XX")
    assert out.returncode == 2 and "index-factory" in out.stderr and "IVF1024,PQ64x4fs" in out.stderr
    assert not idx.exists() and not store_env.exists()


def test_factory_too_big_for_the_collection_still_searches_exactly(tmp_path, image_dir, store_env):
    idx = tmp_path / "f2"
    out = run_cli("build", str(idx), str(image_dir), *TINY_FLAGS, "--index-type", "IVF4096,PQ8", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(run_cli("info", str(idx), "--json").stdout)
    assert info["structure"]["search"] == "exact" and "IVF4096,PQ8" in info["structure"]["reason"]
    res = run_cli("query", str(idx), str(image_dir / "img1.jpg"), "-k", "2", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["results"][0]["hits"][0]["path"].endswith("img1.jpg")
    assert run_cli("add", str(idx), str(image_dir)).returncode == 0


def test_whiten_on_is_stored_absolute(tmp_path, image_dir, store_env):
    other = tmp_path / "p40"
    other.mkdir()
    for i in range(3):
        make_scene(50 + i).save(other / f"o{i}.jpg")
    out = subprocess.run([sys.executable, "-m", "retrieval.cli", "build", "wo1", str(image_dir), *TINY_FLAGS,
                          "--whiten-on", "p40"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    meta = json.loads((tmp_path / "wo1" / "index.json").read_text())
    assert meta["whiten_on"] == [str(other)]
    fitted = _whitening_file(tmp_path / "wo1")
    before = np.load(fitted)
    before = {k: before[k] for k in before.files}
    # The whitening is fitted on the --whiten-on images again only when it must be:
    # deleting it makes the next add fit it, from wherever that add runs.
    fitted.unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "p40").mkdir()  # a same-named folder must not be used (it is empty: no readable images)
    make_scene(7).save(tmp_path / "new.jpg")
    out = subprocess.run([sys.executable, "-m", "retrieval.cli", "add", str(tmp_path / "wo1"), str(tmp_path / "new.jpg"),
                          "--json"], cwd=elsewhere, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["images"] == 7
    info = json.loads(run_cli("info", str(tmp_path / "wo1"), "--json").stdout)["whitening"]
    assert (info["source"], info["sample_images"]) == ("whiten_on", 3)
    after = np.load(_whitening_file(tmp_path / "wo1"))
    assert set(after.files) == set(before)
    for key in before:  # the same three images, the same fit (and the same rule, a string)
        if after[key].dtype.kind in "US":
            assert after[key] == before[key], key
        else:
            np.testing.assert_allclose(after[key], before[key], rtol=1e-5, atol=1e-6, err_msg=key)


def _whitening_file(index):
    state = json.loads((index / "state.json").read_text())
    return index / state["whitening"]["file"]


def test_one_image_index_works(tmp_path, image_dir, store_env):
    idx = tmp_path / "s1"
    out = run_cli("build", str(idx), str(image_dir / "img0.jpg"), *TINY_FLAGS)
    assert out.returncode == 0, out.stderr
    res = run_cli("query", str(idx), str(image_dir / "img0.jpg"), str(image_dir / "img1.jpg"), "--json")
    assert res.returncode == 0, res.stderr
    own, other = (r["hits"] for r in json.loads(res.stdout)["results"])
    # The one image, found by itself at about distance 0 and by another image further away.
    assert [h["path"] for h in own] == [h["path"] for h in other] == [str(image_dir / "img0.jpg")]
    assert own[0]["distance"] < SELF_DISTANCE < other[0]["distance"]
    assert own[0]["query_box"] == own[0]["db_box"]


def test_remove_names_what_is_not_in_the_index_and_expands_folders(tmp_path, image_dir, store_env):
    idx = tmp_path / "r"
    assert run_cli("build", str(idx), str(image_dir), *TINY_FLAGS).returncode == 0
    out = run_cli("remove", str(idx), str(tmp_path / "not-in-index.jpg"), "/etc/passwd", "--json")
    report = json.loads(out.stdout)
    assert out.returncode == 3 and report["removed"] == 0
    assert {s["path"] for s in report["skipped"]} == {str(tmp_path / "not-in-index.jpg"), "/etc/passwd"}
    assert "not in the index" in out.stderr
    listing = tmp_path / "list.txt"
    listing.write_text(str(image_dir / "img0.jpg") + "\n")
    out = run_cli("remove", str(idx), f"@{listing}", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["removed"] == 1
    (image_dir / "img1.jpg").unlink()  # a deleted file can still be removed with its folder
    out = run_cli("remove", str(idx), str(image_dir), "--json")
    assert out.returncode == 0 and (json.loads(out.stdout)["removed"], json.loads(out.stdout)["images"]) == (5, 0)


def test_missing_list_file_writes_nothing(tmp_path, store_env):
    idx = tmp_path / "l2"
    out = run_cli("build", str(idx), f"@{tmp_path / 'missing-list.txt'}", *TINY_FLAGS)
    assert out.returncode == 2 and "missing-list.txt" in out.stderr
    assert not idx.exists()


@pytest.mark.parametrize("content", ["{{garbage", '{"format": 1}', "[]"])
def test_damaged_index_json_is_a_usage_error_naming_it(tmp_path, image_dir, store_env, content):
    idx = tmp_path / "j"
    assert run_cli("build", str(idx), str(image_dir), *TINY_FLAGS).returncode == 0
    (idx / "index.json").write_text(content)
    out = run_cli("query", str(idx), str(image_dir / "img0.jpg"))
    assert out.returncode == 2 and "index.json" in out.stderr and "Traceback" not in out.stderr


def test_info_shows_only_the_extractor_fields_that_apply():
    from retrieval import ExtractorConfig

    onnx = ExtractorConfig(onnx="/models/m.onnx", onnx_output="627").summary()
    assert "backbone" not in onnx and "weights" not in onnx and onnx["onnx_output"] == "627"
    torch_cfg = ExtractorConfig(backbone="resnet18").summary()
    assert "onnx" not in torch_cfg and torch_cfg["backbone"] == "resnet18" and "roi_size" not in torch_cfg


def test_store_elsewhere_is_never_created_or_overwritten(tmp_path, image_dir, store_env):
    idx = tmp_path / "st"
    assert run_cli("build", str(idx), str(image_dir), *TINY_FLAGS).returncode == 0
    meta = json.loads((idx / "index.json").read_text())
    meta["store"] = str(tmp_path / "nowhere" / "s.sqlite")
    (idx / "index.json").write_text(json.dumps(meta))
    out = run_cli("add", str(idx), str(image_dir))
    assert out.returncode == 2 and "does not exist" in out.stderr
    assert not (tmp_path / "nowhere").exists()
    empty = tmp_path / "empty.sqlite"
    empty.write_bytes(b"")
    meta["store"] = str(empty)
    (idx / "index.json").write_text(json.dumps(meta))
    out = run_cli("add", str(idx), str(image_dir))
    assert out.returncode == 2 and "empty.sqlite" in out.stderr
    assert empty.read_bytes() == b""
