"""Issue 23, rows 1-4: an index or store on a read-only mount, or on a full disk.

The disks are real: each case runs its commands in a private user and mount namespace
(`unshare -rm`, allowed to non-root users on most Linux machines) holding a read-only bind
mount or a small tmpfs, so nothing on the machine is remounted. `RLIMIT_FSIZE` was the
other way to fill a disk, but it makes writes fail with EFBIG rather than ENOSPC, and
SQLite's WAL index (`-shm`, written through mmap) does not meet it the way it meets a
full file system. Where namespaces are not allowed the tests skip, saying so.
"""
from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TINY_FLAGS, make_scene, run_cli


def _namespaces_allowed() -> str | None:
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return f"user and mount namespaces are not allowed here ({probe.stderr.strip()})"
    return None


_NO_NAMESPACES = _namespaces_allowed()
needs_namespaces = pytest.mark.skipif(_NO_NAMESPACES is not None, reason=str(_NO_NAMESPACES))


def _cli(*args: str) -> str:
    """The shell words running `retrieval ARGS`, output to files named by the step."""
    return " ".join(shlex.quote(a) for a in [sys.executable, "-m", "retrieval.cli", *args])


def _in_namespace(setup: list[str], steps: dict[str, str], out: Path, env: dict) -> dict[str, dict]:
    """Run the `setup` shell lines (mounts) and then each step's command in one private
    namespace; per step its exit code, stdout and stderr."""
    lines = ["set -u", *setup]
    for name, command in steps.items():
        lines.append(f"( {command} ) >{out / name}.out 2>{out / name}.err; echo $? >{out / name}.rc")
    exports = " ".join(f"{k}={shlex.quote(str(v))}" for k, v in {**env, "PYTHONPATH": ROOT}.items())
    done = subprocess.run(["unshare", "-rm", "sh", "-c", f"export {exports}; " + "\n".join(lines)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return {name: {"rc": int((out / f"{name}.rc").read_text()), "stdout": (out / f"{name}.out").read_text(),
                   "stderr": (out / f"{name}.err").read_text()} for name in steps}


def _images(folder: Path, seeds: range) -> Path:
    folder.mkdir(parents=True)
    for i in seeds:
        make_scene(i).save(folder / f"img{i}.jpg")
    return folder


# -- rows 1: a read-only index and store -------------------------------------------------------
@needs_namespaces
def test_read_only_index_and_store_answer_and_never_say_damaged(tmp_path):
    disk = tmp_path / "disk"
    images = _images(disk / "images", range(4))
    env = {"RETRIEVAL_STORE": disk / "features.sqlite"}
    idx = disk / "idx"
    assert run_cli("build", str(idx), str(images), *TINY_FLAGS, env=env).returncode == 0
    stale = disk / "stale"  # a second index whose state.json is gone: nothing published
    assert run_cli("build", str(stale), str(images / "img0.jpg"), *TINY_FLAGS, env=env).returncode == 0
    (stale / "state.json").unlink()
    (idx / "neighbours.npz").unlink()  # and no neighbour lists: adaptive re-ranking does without
    out = tmp_path / "out"
    out.mkdir()
    got = _in_namespace(
        [f"mount --bind {disk} {disk}", f"mount -o remount,ro,bind {disk}"],
        {"info": _cli("info", str(idx), "--json"),
         "query": _cli("query", str(idx), str(images / "img1.jpg"), "-k", "2", "--json", "--quiet"),
         "rerank": _cli("query", str(idx), str(images / "img1.jpg"), "-k", "2", "--json", "--quiet", "--rerank"),
         "add": _cli("add", str(idx), str(images), "--quiet"),
         "stale": _cli("query", str(stale), str(images / "img1.jpg"), "--quiet")},
        out, env)
    assert got["info"]["rc"] == 0, got["info"]["stderr"]
    assert json.loads(got["info"]["stdout"])["images"] == 4
    assert got["query"]["rc"] == 0, got["query"]["stderr"]
    hits = json.loads(got["query"]["stdout"])["results"][0]["hits"]
    assert hits[0]["path"] == str(images / "img1.jpg")
    assert got["rerank"]["rc"] == 0, got["rerank"]["stderr"]
    reranked = json.loads(got["rerank"]["stdout"])["results"][0]
    assert "query expansion only" in reranked["note"] and reranked["hits"][0]["path"] == hits[0]["path"]
    assert got["add"]["rc"] == 1 and f"read-only file system: {idx / '.lock'}" in got["add"]["stderr"]
    # Nothing published and nothing can be written: says read-only and what to do.
    assert got["stale"]["rc"] == 2 and "read-only file system" in got["stale"]["stderr"]
    assert f"retrieval add {stale}" in got["stale"]["stderr"]
    assert not any("damaged" in step["stderr"] for step in got.values())


# -- rows 2-4: a full disk -------------------------------------------------------------------
def _fill(mount: Path, leave_kb: int) -> str:
    """Shell line leaving `leave_kb` KiB free on the tmpfs at `mount`."""
    return (f"head -c $(( ($(df -k {mount} | tail -1 | awk '{{print $4}}') - {leave_kb}) * 1024 )) "
            f"/dev/zero > {mount}/filler")


@needs_namespaces
def test_build_on_a_full_disk_names_the_file_and_keeps_what_it_committed(tmp_path):
    images = _images(tmp_path / "images", range(6))
    mount, out = tmp_path / "disk", tmp_path / "out"
    mount.mkdir()
    out.mkdir()
    idx = mount / "idx"
    build = _cli("build", str(idx), str(images), *TINY_FLAGS, "--json")
    got = _in_namespace(
        [f"mount -t tmpfs -o size=1m tmpfs {mount}", _fill(mount, 124)],
        {"build": build, "again": build, "free": f"rm {mount}/filler", "finish": build},
        out, {"RETRIEVAL_STORE": mount / "features.sqlite"})
    for step in ("build", "again"):
        assert got[step]["rc"] == 1, got[step]["stderr"]
        assert f"no space left on device: {mount}/" in got[step]["stderr"]
        assert "rollback" not in got[step]["stderr"] and "OperationalError" not in got[step]["stderr"]
    assert got["finish"]["rc"] == 0, got["finish"]["stderr"]
    report = json.loads(got["finish"]["stdout"])
    assert (report["images"], report["added"] + report["already_present"]) == (6, 6)


@needs_namespaces
def test_query_after_an_add_failed_on_a_full_disk_answers_from_the_published_state(tmp_path):
    first = _images(tmp_path / "first", range(3))
    more = _images(tmp_path / "more", range(3, 6))
    mount, out = tmp_path / "disk", tmp_path / "out"
    mount.mkdir()
    out.mkdir()
    idx = mount / "idx"
    got = _in_namespace(
        [f"mount -t tmpfs -o size=2m tmpfs {mount}"],
        {"build": _cli("build", str(idx), str(first), *TINY_FLAGS),
         "fill": _fill(mount, 200),
         "add": _cli("add", str(idx), str(more), "--quiet"),
         "query": _cli("query", str(idx), str(first / "img0.jpg"), "-k", "6", "--json", "--quiet"),
         "free": f"rm {mount}/filler",
         "finish": _cli("add", str(idx), str(more), "--json", "--quiet")},
        out, {"RETRIEVAL_STORE": mount / "features.sqlite"})
    assert got["build"]["rc"] == 0, got["build"]["stderr"]
    assert got["add"]["rc"] == 1 and f"no space left on device: {mount}/" in got["add"]["stderr"]
    assert got["query"]["rc"] == 0, got["query"]["stderr"]
    # What is published: the first three, and any of the others the add committed and
    # the query itself could publish in what room was left.
    hits = json.loads(got["query"]["stdout"])["results"][0]["hits"]
    assert hits[0]["path"] == str(first / "img0.jpg") and {Path(h["path"]).parent for h in hits} <= {first, more}
    assert got["finish"]["rc"] == 0, got["finish"]["stderr"]
    assert json.loads(got["finish"]["stdout"])["images"] == 6


def test_a_failed_write_names_the_file_being_written(tmp_path):
    """Row 3: a write that fails part-way (here past the process's file size limit, which
    fails like a full disk without needing one) names the file, not just the errno."""
    target = tmp_path / "seg-1.npy"
    script = (
        "import resource, signal, numpy as np\n"
        "from pathlib import Path\n"
        "from retrieval.engine.segments import save_npy\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write (EFBIG) instead of killing us\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))\n"
        f"save_npy(Path({str(target)!r}), np.zeros(100_000, np.float32))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert done.returncode == 1
    assert done.stderr.rstrip().splitlines()[-1].endswith(f": {target}"), done.stderr
    assert not target.exists() and list(tmp_path.iterdir()) == []  # no temporary file left either
