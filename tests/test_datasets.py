"""Loader tests on tiny generated datasets in each official layout, plus the
real partial copies under ../shared when present.

The loaders only list files, so the fixtures are empty files with the right
names (which also checks that no image is ever decoded).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from retrieval.evaluation.datasets import load_dataset, safe_load_pickle

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data"


def _touch(root: Path, *rels: str) -> None:
    for rel in rels:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")


def _write(root: Path, rel: str, text: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def _names(ds, idx) -> list[str]:
    return sorted(Path(ds.images[i]).stem for i in idx)


# --------------------------------------------------------------------------


def test_unknown_dataset_lists_allowed(tmp_path):
    with pytest.raises(ValueError) as e:
        load_dataset("oxford105k", tmp_path)
    for n in ("holidays", "ukbench", "oxford5k", "paris6k", "roxford5k", "rparis6k"):
        assert n in str(e.value)


def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_dataset("holidays", tmp_path / "nope")


# --------------------------------------------------------------------------
# Holidays


def test_holidays_layout_and_partial_copy(tmp_path):
    _touch(tmp_path,
           "jpg/100000.jpg", "jpg/100001.jpg", "jpg/100002.jpg",   # group 1000
           "jpg/100100.jpg", "jpg/100101.jpg",                     # group 1001
           "jpg/100200.jpg",                                       # query alone
           "jpg/100301.jpg",                                       # query 100300 missing
           "jpg/100400.jpg", "jpg/100402.jpg",                     # 100401 missing
           "jpg/readme.txt", "jpg/12345.jpg")                      # ignored
    ds = load_dataset("holidays", tmp_path)
    assert ds.name == "holidays" and ds.metric == "mAP"
    assert len(ds.images) == 9 and ds.images == sorted(ds.images)
    assert all(os.path.isabs(p) for p in ds.images)
    assert [q.name for q in ds.queries] == ["100000", "100100", "100200", "100400"]
    q0, q1, q2, q4 = ds.queries
    # database includes the query; positives = rest of the group, query excluded
    assert Path(ds.images[q0.index]).stem == "100000" and q0.path == ds.images[q0.index]
    assert _names(ds, q0.positives) == ["100001", "100002"]
    assert _names(ds, q1.positives) == ["100101"]
    assert len(q2.positives) == 0
    assert _names(ds, q4.positives) == ["100402"]
    assert q0.bbox is None and len(q0.junk) == 0 and q0.positives.dtype == np.int64
    assert ds.missing_queries == 1          # 100300
    assert ds.dropped_positives == 1        # 100401 (gap in the group numbering)


def test_holidays_official_list_gives_exact_counts(tmp_path):
    _touch(tmp_path, "jpg/100000.jpg", "jpg/100001.jpg")
    _write(tmp_path, "holidays_images.dat",
           "100000.jpg\n100001.jpg\n100002.jpg\n100003.jpg\n100100.jpg\n100101.jpg\n")
    ds = load_dataset("holidays", tmp_path)
    assert len(ds.queries) == 1
    assert ds.missing_queries == 1          # 100100 (whole group absent)
    assert ds.dropped_positives == 2        # 100002, 100003


# --------------------------------------------------------------------------
# UKBench


def test_ukbench_layout_and_partial_copy(tmp_path):
    _touch(tmp_path, *[f"full/ukbench{i:05d}.jpg" for i in range(8) if i != 5])
    ds = load_dataset("ukbench", tmp_path)
    assert ds.metric == "ns"
    assert len(ds.images) == 7 and len(ds.queries) == 7    # every image is a query
    q0 = ds.queries[0]
    assert q0.name == "ukbench00000"
    assert _names(ds, q0.positives) == [f"ukbench{i:05d}" for i in range(4)]  # incl. itself
    q4 = next(q for q in ds.queries if q.name == "ukbench00004")
    assert _names(ds, q4.positives) == ["ukbench00004", "ukbench00006", "ukbench00007"]
    assert ds.images[q4.index] == q4.path
    assert ds.missing_queries == 1 and ds.dropped_positives == 3


# --------------------------------------------------------------------------
# Oxford5k / Paris6k original


def _oxford_fixture(root: Path) -> None:
    _touch(root, *[f"jpg/all_souls_{i:06d}.jpg" for i in (1, 2, 3, 4)],
           *[f"jpg/radcliffe_camera_{i:06d}.jpg" for i in (1, 2)])
    # query 1: present; good has a missing image (all_souls_000009)
    _write(root, "gt/all_souls_1_query.txt", "oxc1_all_souls_000001 136.5 34.1 648.5 955.7\n")
    _write(root, "gt/all_souls_1_good.txt", "all_souls_000001\nall_souls_000002\nall_souls_000009\n")
    _write(root, "gt/all_souls_1_ok.txt", "all_souls_000003\n")
    _write(root, "gt/all_souls_1_junk.txt", "all_souls_000004\nall_souls_000077\n")
    # query 2: image absent from disk
    _write(root, "gt/radcliffe_camera_1_query.txt", "oxc1_radcliffe_camera_000042 1 2 3 4\n")
    _write(root, "gt/radcliffe_camera_1_good.txt", "radcliffe_camera_000001\n")
    _write(root, "gt/radcliffe_camera_1_ok.txt", "")
    _write(root, "gt/radcliffe_camera_1_junk.txt", "")


def test_oxford_layout_prefix_and_partial(tmp_path):
    _oxford_fixture(tmp_path)
    ds = load_dataset("oxford5k", tmp_path)
    assert len(ds.images) == 6
    assert ds.missing_queries == 1
    assert len(ds.queries) == 1
    q = ds.queries[0]
    assert q.name == "all_souls_1"
    assert q.path == str(tmp_path / "jpg" / "all_souls_000001.jpg")   # oxc1_ stripped
    assert q.bbox == (136.5, 34.1, 648.5, 955.7)
    assert _names(ds, q.positives) == ["all_souls_000001", "all_souls_000002", "all_souls_000003"]
    assert _names(ds, q.junk) == ["all_souls_000004"]
    assert ds.dropped_positives == 1 and ds.dropped_junk == 1
    assert ds.images[q.index] == q.path


def test_paris_layout_landmark_folders(tmp_path):
    _touch(tmp_path, "paris/defense/paris_defense_000000.jpg",
           "paris/defense/paris_defense_000605.jpg",
           "paris/eiffel/paris_eiffel_000001.jpg")
    _write(tmp_path, "paris_120310/defense_1_query.txt",
           "paris_defense_000605 130.000000 17.000000 843.000000 732.000000\n")
    _write(tmp_path, "paris_120310/defense_1_good.txt", "paris_defense_000000.jpg\n")  # with .jpg
    _write(tmp_path, "paris_120310/defense_1_ok.txt", "paris_defense_000605\n")
    _write(tmp_path, "paris_120310/defense_1_junk.txt", "paris_eiffel_000001\n")
    ds = load_dataset("paris6k", tmp_path)
    assert len(ds.images) == 3 and ds.images == sorted(ds.images)
    (q,) = ds.queries
    assert q.name == "defense_1" and q.bbox == (130.0, 17.0, 843.0, 732.0)
    assert q.path.endswith("paris/defense/paris_defense_000605.jpg")
    assert _names(ds, q.positives) == ["paris_defense_000000", "paris_defense_000605"]
    assert _names(ds, q.junk) == ["paris_eiffel_000001"]
    assert ds.missing_queries == 0 and ds.dropped_positives == 0


def test_original_without_ground_truth_is_clear_error(tmp_path):
    _touch(tmp_path, "jpg/a.jpg")
    with pytest.raises(ValueError, match="_query.txt"):
        load_dataset("oxford5k", tmp_path)


# --------------------------------------------------------------------------
# Revisited


def _revisited_fixture(root: Path) -> dict:
    imlist = ["all_souls_000010", "all_souls_000011", "all_souls_000012",
              "all_souls_000013", "all_souls_000014", "ashmolean_000001"]
    qimlist = ["all_souls_000001", "ashmolean_000099"]
    gnd = [
        {"bbx": [10.5, 20, 300, 400.25], "easy": [0, 3], "hard": [1, 4], "junk": [2, 5]},
        {"bbx": [1, 2, 3, 4], "easy": [5], "hard": [], "junk": []},
    ]
    cfg = {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}
    with open(root / "gnd_roxford5k.pkl", "wb") as fh:
        pickle.dump(cfg, fh, protocol=2)
    # on disk: all but all_souls_000013 (easy) and ashmolean_000001 (junk);
    # query all_souls_000001 present, ashmolean_000099 absent; extra file not in imlist
    _touch(root, *[f"jpg/{n}.jpg" for n in imlist if n not in ("all_souls_000013", "ashmolean_000001")],
           "jpg/all_souls_000001.jpg", "jpg/unlisted_000001.jpg")
    return cfg


def test_revisited_layout_and_partial(tmp_path):
    _revisited_fixture(tmp_path)
    ds = load_dataset("roxford5k", tmp_path)
    # database = imlist entries on disk (query image and unlisted file excluded)
    assert [Path(p).stem for p in ds.images] == [
        "all_souls_000010", "all_souls_000011", "all_souls_000012", "all_souls_000014"]
    assert ds.missing_queries == 1
    (q,) = ds.queries
    assert q.name == "all_souls_000001" and q.path.endswith("jpg/all_souls_000001.jpg")
    assert q.bbox == (10.5, 20.0, 300.0, 400.25)
    assert q.index is None
    # indices remapped from imlist to ds.images
    assert _names(ds, q.easy) == ["all_souls_000010"]
    assert _names(ds, q.hard) == ["all_souls_000011", "all_souls_000014"]
    assert _names(ds, q.revisited_junk) == ["all_souls_000012"]
    assert _names(ds, q.positives) == ["all_souls_000010", "all_souls_000011", "all_souls_000014"]
    assert _names(ds, q.junk) == ["all_souls_000012"]
    assert ds.dropped_positives == 1 and ds.dropped_junk == 1
    for a in (q.easy, q.hard, q.revisited_junk, q.positives, q.junk):
        assert a.dtype == np.int64


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickle_with_global_is_refused(tmp_path):
    cfg = _revisited_fixture(tmp_path)
    marker = tmp_path / "pwned"
    cfg["gnd"][0]["bbx"] = _Evil(marker)
    with open(tmp_path / "gnd_roxford5k.pkl", "wb") as fh:
        pickle.dump(cfg, fh)
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system|nt.system"):
        load_dataset("roxford5k", tmp_path)
    assert not marker.exists()
    # numpy arrays (also globals) are refused too
    with open(tmp_path / "np.pkl", "wb") as fh:
        pickle.dump({"a": np.arange(3)}, fh)
    with pytest.raises(pickle.UnpicklingError):
        safe_load_pickle(tmp_path / "np.pkl")
    # plain containers load
    with open(tmp_path / "ok.pkl", "wb") as fh:
        pickle.dump({"a": [1, 2.5, "x", (3,)], "b": None}, fh)
    assert safe_load_pickle(tmp_path / "ok.pkl") == {"a": [1, 2.5, "x", (3,)], "b": None}


# --------------------------------------------------------------------------
# Real partial copies under ../shared


needs_shared = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} not present (shared data)")


@pytest.mark.shared
@needs_shared
def test_real_ukbench():
    ds = load_dataset("ukbench", DATA / "ukbench")
    assert len(ds.images) == 1000 and len(ds.queries) == 1000
    assert ds.missing_queries == 0 and ds.dropped_positives == 0
    assert all(len(q.positives) == 4 for q in ds.queries)


@pytest.mark.shared
@needs_shared
def test_real_paris6k_original():
    ds = load_dataset("paris6k", DATA / "paris6k-mini")
    assert len(ds.images) == 250
    assert len(ds.queries) + ds.missing_queries == 55
    assert len(ds.queries) == 12          # queries of the 5 landmarks present on disk
    for q in ds.queries:
        assert q.bbox is not None and os.path.isfile(q.path) and len(q.positives) > 0


@pytest.mark.shared
@needs_shared
def test_real_rparis6k():
    ds = load_dataset("rparis6k", DATA / "paris6k-mini")
    assert len(ds.queries) + ds.missing_queries == 70
    assert len(ds.queries) == 12
    # the 12 present query images are not in the revisited imlist
    assert len(ds.images) == 238
    for q in ds.queries:
        assert q.easy is not None and q.hard is not None and q.bbox is not None
        assert set(q.positives.tolist()) == set(q.easy.tolist()) | set(q.hard.tolist())
