"""The `retrieval` CLI contract (docs/cli.md sections 1-10): JSON fields, exit codes, bad inputs, kill -9."""
import json
import os
import struct
import sys
import zlib

import pytest

from conftest import kill_at_pause, manifest_count, SELF_DISTANCE, TINY_FLAGS, make_scene, run_cli

REPORT_FIELDS = {"index", "added", "already_present", "removed", "skipped", "images", "seconds"}


def _bad_inputs(folder):
    (folder / "empty.jpg").write_bytes(b"")
    good = (folder / "img0.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (folder / "notes.jpg").write_text("this is a text file, not a JPEG\n")


def _png_bomb(path, side=20000):
    """A valid PNG header claiming side x side pixels, with almost no data behind it."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_build_query_info_remove_json_contract(tmp_path, image_dir, store_env):
    idx = str(tmp_path / "idx")
    out = run_cli("build", idx, str(image_dir), *TINY_FLAGS, "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert set(report) == REPORT_FIELDS
    assert (report["added"], report["images"], report["skipped"]) == (6, 6, [])

    out = run_cli("query", idx, str(image_dir / "img2.jpg"), "-k", "3", "--json")
    assert out.returncode == 0, out.stderr
    (result,) = json.loads(out.stdout)["results"]
    assert result["query"] == str(image_dir / "img2.jpg")
    assert [h["rank"] for h in result["hits"]] == [1, 2, 3]
    top = result["hits"][0]
    spec_keys = {"rank", "path", "distance", "query_box", "db_box"}
    # Six whitened images with the lists the writer keeps: re-ranked by default, which
    # adds the distance that orders the hits beside the SPEC's `distance`.
    assert set(top) == spec_keys | {"rerank_distance"}
    assert top["path"] == str(image_dir / "img2.jpg") and top["distance"] < SELF_DISTANCE
    assert len(top["query_box"]) == 4 and all(0 <= v <= 160 for v in top["db_box"])
    out = run_cli("query", idx, str(image_dir / "img2.jpg"), "-k", "3", "--json", "--no-rerank")
    plain = json.loads(out.stdout)["results"][0]["hits"]
    assert out.returncode == 0 and all(set(h) == spec_keys for h in plain)  # the SPEC's, and no more unasked
    assert plain[0]["path"] == top["path"] and plain[0]["distance"] == top["distance"]

    out = run_cli("info", idx, "--json")
    info = json.loads(out.stdout)
    assert out.returncode == 0
    assert {"images", "patches", "dim", "extractor", "index_type", "faiss_device", "native_kernel", "store"} <= set(info)
    assert (info["images"], info["patches"], info["dim"]) == (6, 30, 16)
    assert info["faiss_device"] == "cpu" and info["store"] == str(store_env)

    out = run_cli("add", idx, str(image_dir), "--json")
    assert json.loads(out.stdout)["already_present"] == 6 and out.returncode == 0

    out = run_cli("remove", idx, str(image_dir / "img1.jpg"), "--json")
    report = json.loads(out.stdout)
    assert out.returncode == 0 and (report["removed"], report["images"]) == (1, 5)


def test_usage_errors_exit_2(tmp_path, image_dir, store_env):
    out = run_cli("info", str(tmp_path / "no-such-index"))
    assert out.returncode == 2 and "not an index" in out.stderr
    out = run_cli("build", str(tmp_path / "i"), str(image_dir), "--pool", "median")
    assert out.returncode == 2 and "avg" in out.stderr  # says what is allowed
    out = run_cli("build", str(tmp_path / "i"), str(image_dir), "--levels", "1,7")
    assert out.returncode == 2 and "1,2,3,4" in out.stderr
    out = run_cli("query", str(tmp_path / "no-such-index"), str(image_dir / "img0.jpg"))
    assert out.returncode == 2


def test_bad_inputs_are_skipped_with_reasons_exit_3(tmp_path, image_dir, store_env):
    _bad_inputs(image_dir)
    _png_bomb(image_dir / "bomb.png")
    idx = str(tmp_path / "idx")
    out = run_cli("build", idx, str(image_dir), *TINY_FLAGS, "--json")
    assert out.returncode == 3, out.stderr
    report = json.loads(out.stdout)
    assert report["added"] == 6 and report["images"] == 6
    reasons = {os.path.basename(s["path"]): s["reason"] for s in report["skipped"]}
    assert set(reasons) == {"empty.jpg", "truncated.jpg", "notes.jpg", "bomb.png"}
    assert reasons["empty.jpg"] == "empty file"
    assert reasons["truncated.jpg"].startswith("truncated")
    assert reasons["notes.jpg"].startswith("not an image")
    assert reasons["bomb.png"].startswith("decompression bomb")
    for name in reasons:
        assert name in out.stderr  # each named on stderr too
    assert json.loads(run_cli("info", idx, "--json").stdout)["images"] == 6
    # The skipped files stay skipped, and never half-added, on a re-run.
    again = run_cli("add", idx, str(image_dir), "--json")
    assert again.returncode == 3 and json.loads(again.stdout)["images"] == 6


@pytest.mark.parametrize("kill_after", [8, 40])
def test_kill_9_during_build_then_info_then_add_completes(tmp_path, store_env, kill_after):
    folder = tmp_path / "many"
    folder.mkdir()
    n = 50
    for i in range(n):
        make_scene(100 + i, size=(96, 72)).save(folder / f"s{i:03d}.jpg")
    idx = tmp_path / "idx"
    # Killed right after the kill_after-th image is committed to the manifest.
    kill_at_pause([sys.executable, "-m", "retrieval.cli", "build", str(idx), str(folder), *TINY_FLAGS],
                  "committed", kill_after, tmp_path)
    assert manifest_count(idx) == kill_after

    info = run_cli("info", str(idx), "--json")
    assert info.returncode == 0, info.stderr
    partial = json.loads(info.stdout)
    assert (partial["images"], partial["patches"], partial["up_to_date"]) == (kill_after, 5 * kill_after, False)

    out = run_cli("add", str(idx), str(folder), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert (report["images"], report["added"], report["already_present"]) == (n, n - kill_after, kill_after)
    # No duplicates: every image is its own first hit, and appears once.
    res = run_cli("query", str(idx), str(folder / "s000.jpg"), "-k", str(n), "--json")
    hits = json.loads(res.stdout)["results"][0]["hits"]
    assert len(hits) == n and len({h["path"] for h in hits}) == n


def test_bad_extractor_flag_leaves_no_index_behind(tmp_path, image_dir, store_env):
    idx = tmp_path / "idx"
    flags = [f for f in TINY_FLAGS if f != "--quiet"]
    out = run_cli("build", str(idx), str(image_dir), *flags, "--layer", "layer9", "--quiet")
    assert out.returncode == 2 and "layer9" in out.stderr
    assert not idx.exists()
    out = run_cli("build", str(idx), str(image_dir), *flags, "--quiet", "--json")
    assert out.returncode == 0, out.stderr
