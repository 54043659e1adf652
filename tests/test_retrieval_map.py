"""benchmarks/retrieval_map.py end to end on a tiny generated UKBench (random-init network)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import ImageOps

from conftest import ROOT, TINY_FLAGS, make_scene

SCRIPT = ROOT / "benchmarks" / "retrieval_map.py"
GROUPS = 3


@pytest.fixture(scope="module")
def ukbench_root(tmp_path_factory) -> Path:
    """3 groups of 4: a scene, its mirror and two crops of it (official file names)."""
    root = tmp_path_factory.mktemp("ukbench")
    full = root / "full"
    full.mkdir()
    for g in range(GROUPS):
        scene = make_scene(100 + g, size=(200, 150))
        members = [
            scene,
            ImageOps.mirror(scene),
            scene.crop((10, 8, 190, 140)),
            scene.crop((0, 0, 180, 150)),
        ]
        for j, img in enumerate(members):
            img.resize((160, 120)).save(full / f"ukbench{4 * g + j:05d}.jpg", quality=90)
    return root


def _run(*args: str, tmp: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "RETRIEVAL_STORE": str(tmp / "env-store.sqlite")}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT,
    )


def _group(path: str) -> int:
    return int(Path(path).stem[len("ukbench"):]) // 4


def test_single_run_json_and_ns_by_hand(ukbench_root, tmp_path):
    out = tmp_path / "out.json"
    store = tmp_path / "store.sqlite"
    proc = _run("--dataset", "ukbench", "--root", str(ukbench_root), *TINY_FLAGS,
                "--store", str(store), "--timing-sample", "2", "--json-top", "4",
                "--json", str(out), tmp=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "N-S" in proc.stdout  # the printed table
    data = json.loads(out.read_text())
    for key in ("dataset", "metric", "value", "queries", "images", "config", "seconds"):
        assert key in data, key
    assert data["dataset"] == "ukbench" and data["metric"] == "ns"
    assert data["queries"] == data["images"] == 4 * GROUPS
    assert isinstance(data["config"], dict) and data["config"]["levels"] == [1, 2]
    assert data["seconds"] > 0
    assert 0.0 <= data["value"] <= 4.0
    # N-S by hand from the top-4 lists: how many of the query's group are in its top 4
    by_hand = [sum(_group(p) == _group(r["path"]) for p in r["top"]) for r in data["rankings"]]
    assert len(by_hand) == data["queries"]
    assert data["value"] == pytest.approx(sum(by_hand) / len(by_hand))
    # random ranking: 1 (itself, on average) + 3 * 3/11 ~ 1.8; self-match alone gives >= 1
    assert data["value"] > 2.0
    assert store.exists()  # --store honoured
    assert not (tmp_path / "env-store.sqlite").exists()
    t = data["timing"]
    assert t["db_extract_s_per_image"] > 0 and t["query_s_per_image"] > 0


def test_sweep_one_row_per_combination(ukbench_root, tmp_path):
    out = tmp_path / "sweep.json"
    flags = [f for f in TINY_FLAGS]
    proc = _run("--dataset", "ukbench", "--root", str(ukbench_root), *flags,
                "--timing-sample", "0", "--sweep", "--levels-grid", "1/1;1,2/1,2",
                "--aggregate-grid", "min,mean-min", "--pca-grid", "8,16",
                "--json", str(out), tmp=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    # global: 2 pca (aggregate is moot with one query window); spatial: 2 pca x 2 aggregates
    assert len(rows) == 2 + 4
    combos = {(tuple(r["config"]["levels"]), tuple(r["config"]["query_levels"]), r["config"]["aggregate"],
               r["config"]["pca_dim"]) for r in rows}
    assert len(combos) == 6
    for r in rows:
        # random ranking: ~1.8 (see test_single_run_json_and_ns_by_hand); every
        # configuration must do better on mirrors and crops of one scene
        assert r["metric"] == "ns" and r["value"] > 2.0, (r["config"], r["value"])
        assert r["command"].startswith("python benchmarks/retrieval_map.py --dataset ukbench")
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ukbench")]
    assert len(table) == 6
    # the store from $RETRIEVAL_STORE was used (no --store given)
    assert (tmp_path / "env-store.sqlite").exists()


def test_bad_flag_is_usage_error(ukbench_root, tmp_path):
    proc = _run("--dataset", "ukbench", "--root", str(ukbench_root), *TINY_FLAGS,
                "--sweep", "--aggregate-grid", "max", tmp=tmp_path)
    assert proc.returncode == 2
    assert "aggregate" in proc.stderr


def test_rerank_and_rotation_options_in_a_sweep(ukbench_root, tmp_path):
    out = tmp_path / "rerank.json"
    proc = _run("--dataset", "ukbench", "--root", str(ukbench_root), *TINY_FLAGS,
                "--timing-sample", "0", "--sweep", "--qe-grid", "0,2", "--dba-grid", "0,2",
                "--query-rotations-grid", "0;0,90", "--rotate-queries", "90",
                "--index-dir", str(tmp_path / "idx"), "--json", str(out), tmp=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    combos = {(r["config"]["qe"], r["config"]["dba"], tuple(r["config"]["query_rotations"])) for r in rows}
    assert combos == {(q, d, rot) for q in (0, 2) for d in (0, 2) for rot in ((0,), (0, 90))}
    assert all(r["config"]["rotate_queries"] == 90 for r in rows)
    # better than a random ranking (~1.8) in every combination, turned queries included
    assert all(r["value"] > 2.0 for r in rows), [(r["command"], r["value"]) for r in rows]
    full = next(r for r in rows if r["config"]["qe"] == 2 and r["config"]["dba"] == 2
                and r["config"]["query_rotations"] == [0, 90])
    # No --rerank flag: the default, which fixed counts make the plain ranking re-ranked by
    # them alone; without counts the index re-ranks (whitened, lists kept by the writer).
    assert "--qe 2 --dba 2 --query-rotations 0,90 --rotate-queries 90" in full["command"]
    assert full["config"]["rerank"] is False and full["config"]["rerank_by_default"] is True
    assert all(r["config"]["rerank"] is True for r in rows if not r["config"]["qe"] and not r["config"]["dba"])
    assert full["timing"]["dba_neighbours_seconds"] is None  # dba 2 reads the lists the writer kept (10 per image)
    # the turned copies are lossless PNGs beside the indexes, made once
    assert len(list((tmp_path / "idx" / "queries-rot90").glob("*.png"))) == 4 * GROUPS
    bad = _run("--dataset", "ukbench", "--root", str(ukbench_root), *TINY_FLAGS,
               "--sweep", "--qe-grid", "1,-1", tmp=tmp_path)
    assert bad.returncode == 2 and "--qe-grid" in bad.stderr
