"""Issue 23, rows 9-11 and 16: the index-type vocabulary, under-trained FAISS structures,
progress on stderr when it is not a terminal, and a quiet `--ray local`."""
from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import TINY_FLAGS, make_scene, run_cli
from retrieval import ExtractorConfig, Index, RuntimeConfig, SearchConfig
from retrieval.config import InputSpec
from retrieval.extraction.progress import Progress

CONFIG = ExtractorConfig(backbone="resnet18", weights="none", input_spec=InputSpec(size=(64, 64)))
SEARCH = SearchConfig(levels=(1, 2), pca_dim=16)


@pytest.fixture
def six(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(6):
        make_scene(i).save(folder / f"img{i}.jpg")
    return folder


def test_what_info_reports_as_index_type_is_accepted_back(tmp_path, six, capfd):
    with Index.create(tmp_path / "idx", CONFIG, SEARCH, store=tmp_path / "s.sqlite",
                      runtime=RuntimeConfig(batch_size=16)) as idx:
        idx.add(sorted(map(str, six.iterdir())), progress=False)
        assert idx.info()["index_type"] == "exact"
        for value in ("exact", "auto", "Flat"):
            idx.set_index_type(value)
            assert idx.info()["index_type"] == "exact" and idx.info()["structure"]["search"] == "exact"
        # Row 10: 30 windows for 16 lists of 16 PQ codes each: trained, with our warning
        # naming what fits, and not FAISS's own line.
        capfd.readouterr()
        idx.set_index_type("IVF16,PQ4x4fs")
        err = capfd.readouterr().err
        assert "WARNING clustering" not in err
        assert "trained on 30 windows, fewer than the 624" in err, (err, idx.info()["structure"])
        assert "at most 0 IVF lists" not in err
        info = idx.info()
        assert info["structure"]["search"] == "candidates" and "trained on 30 windows" in info["structure"]["reason"]
        idx.set_index_type(info["index_type"])  # what info reports, again
        assert idx.search([str(six / "img2.jpg")], k=1)[0].hits[0].path == str(six / "img2.jpg")


def test_progress_off_a_terminal_is_one_line_per_stage_in_images_per_second(capsys):
    with Progress(3, "extract") as bar:
        for _ in range(3):
            bar.update()
    err = capsys.readouterr().err
    assert "\r" not in err and err.count("\n") == 1
    assert err.startswith("extract: 3 img in ") and "img/s" in err and "s/img" not in err
    with Progress(3, "extract", enabled=False) as bar:
        bar.update(3)
    assert capsys.readouterr().err == ""


def test_cli_progress_into_a_log_file_has_no_carriage_returns(tmp_path, six, store_env):
    flags = [f for f in TINY_FLAGS if f != "--quiet"]
    out = run_cli("build", str(tmp_path / "idx"), str(six), *flags)
    assert out.returncode == 0, out.stderr
    assert "\r" not in out.stderr
    assert [line for line in out.stderr.splitlines() if line.startswith("index: ")] == \
        [line for line in out.stderr.splitlines() if line.startswith("index: 6 img in ")]


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed (pip install 'retrieval[ray]')")
def test_ray_local_build_is_quiet(tmp_path, six, store_env):
    out = run_cli("build", str(tmp_path / "idx"), str(six), *TINY_FLAGS, "--ray", "local", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["added"] == 6
    assert "Token authentication" not in out.stderr and "core_worker" not in out.stderr, out.stderr
    assert "Deprecat" not in out.stderr, out.stderr
