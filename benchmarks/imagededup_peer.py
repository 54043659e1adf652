#!/usr/bin/env python
"""imagededup (`imagededup` on PyPI) as the peer of `retrieval duplicates`.

    python benchmarks/imagededup_peer.py --setup          # once: the venv + imagededup
    python benchmarks/imagededup_peer.py --images LIST.txt --json OUT.json [--thresholds 0,2,...]

imagededup lives in a virtual environment of its own, `benchmarks/.cache/imagededup-venv`
(git-ignored; `--venv DIR` or $IMAGEDEDUP_PEER_VENV override), the pattern of
benchmarks/fastplaid_peer.py. `--setup` creates it and installs imagededup without its
dependencies, then its light dependencies; imagededup imports torch at import time even
for the hashes, so the venv borrows the torch of the python that ran `--setup` (a .pth
line naming that python's site-packages, searched after the venv's own) instead of
downloading another 2 GB. Any other run re-executes itself with the venv's python, or
exits with status 3 and a message saying to run `--setup` when the venv is missing.

Measured per hash method (PHash, DHash, WHash, AHash): `encode_s`, the seconds to hash
every image of LIST (one path per line); for each Hamming threshold (its default, 10, and
the --thresholds sweep) `find_duplicates` on those hashes, its seconds and the pairs it
reports, as indices into LIST. Its CNN method is not run: it downloads MobileNetV3
weights from the internet on first use, which this machine cannot.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import site
import subprocess
import sys
import time
from pathlib import Path

VENV = Path(os.environ.get("IMAGEDEDUP_PEER_VENV", Path(__file__).resolve().parent / ".cache" / "imagededup-venv"))
METHODS = ("PHash", "DHash", "WHash", "AHash")
DEFAULT_THRESHOLD = 10  # imagededup's default max_distance_threshold for every hash
DEPENDENCIES = ["PyWavelets", "scipy", "numpy", "Pillow", "tqdm", "matplotlib", "scikit-learn"]


def setup(venv: Path) -> None:
    base = getattr(sys, "_base_executable", sys.executable)
    if not (venv / "bin" / "python").exists():
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["--no-deps", "imagededup"], check=True)
    subprocess.run(pip + DEPENDENCIES, check=True)
    purelib = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # The name sorts after the venv's own .pth files; the line appends, so the venv's
    # numpy and Pillow win over the borrowed environment's.
    Path(purelib, "zz_borrowed_torch.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    print(f"imagededup installed in {venv} (torch borrowed from {sys.executable})")


def run(images: list[str], thresholds: list[int]) -> dict:
    import imagededup.methods as methods

    out: dict = {"images": len(images), "default_threshold": DEFAULT_THRESHOLD, "methods": {}}
    index = {p: i for i, p in enumerate(images)}
    for name in METHODS:
        hasher = getattr(methods, name)(verbose=False)
        start = time.perf_counter()
        encodings = {p: hasher.encode_image(image_file=p) for p in images}
        encode_s = time.perf_counter() - start
        encodings = {p: h for p, h in encodings.items() if h is not None}
        runs = []
        for t in sorted(set(thresholds) | {DEFAULT_THRESHOLD}):
            start = time.perf_counter()
            found = hasher.find_duplicates(encoding_map=encodings, max_distance_threshold=t)
            seconds = time.perf_counter() - start
            pairs = sorted({tuple(sorted((index[a], index[b]))) for a, dups in found.items() for b in dups})
            runs.append({"threshold": t, "seconds": seconds, "pairs": pairs})
        out["methods"][name] = {"encode_s": encode_s, "unreadable": len(images) - len(encodings), "runs": runs}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup", action="store_true", help="create the venv and install imagededup")
    parser.add_argument("--venv", type=Path, default=VENV, help=f"the venv (default {VENV})")
    parser.add_argument("--images", type=Path, help="a file listing the images, one path per line")
    parser.add_argument("--json", type=Path, help="where to write the results")
    parser.add_argument("--thresholds", default="0,2,4,6,8,12,14,16,20",
                        help="Hamming thresholds swept besides the default 10 (comma-separated)")
    args = parser.parse_args()
    if args.setup:
        setup(args.venv)
        return 0
    if not args.images or not args.json:
        parser.error("--images and --json are needed (or --setup)")
    if importlib.util.find_spec("imagededup") is None:
        python = args.venv / "bin" / "python"
        if not python.exists():
            print(f"imagededup is not set up: run `python {sys.argv[0]} --setup` first ({args.venv} is missing)",
                  file=sys.stderr)
            return 3
        if Path(sys.executable) == python:
            print(f"{args.venv} has no working imagededup: run --setup again", file=sys.stderr)
            return 3
        return subprocess.run([str(python), *sys.argv]).returncode
    images = [line.strip() for line in args.images.read_text().splitlines() if line.strip()]
    result = run(images, [int(t) for t in args.thresholds.split(",") if t])
    args.json.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
