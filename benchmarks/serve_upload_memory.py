"""Server memory under huge concurrent uploads (issue 23 row 7): a real `retrieval serve`
process, N concurrent uploads of W x W JPEGs, its peak and final resident memory.

    python benchmarks/serve_upload_memory.py --images ../shared/data/ukbench/full \
        --onnx ../shared/weights/mobilenetv2-12-int8.onnx --onnx-output 627 \
        --work /tmp/upload-mem [--serve-arg=--max-upload-mpx=89]

Builds a throw-away index of --index-images images (levels 1) with `retrieval build`, makes
--uploads distinct W x W JPEGs (UKBench images enlarged; cached in --work), starts
`retrieval serve --port 0`, posts them all at once, and reads the server's VmHWM (peak) and
VmRSS (after the uploads, then after 5 s idle) from /proc. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image


def _kib(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def _post(url: str, path: Path) -> tuple[int, float, str]:
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{path.name}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n").encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url + "api/query", data=body,
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return response.status, time.perf_counter() - start, ""
    except urllib.error.HTTPError as err:
        return err.code, time.perf_counter() - start, json.loads(err.read())["detail"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", required=True, help="folder of UKBench images")
    ap.add_argument("--onnx", required=True)
    ap.add_argument("--onnx-output", default="627")
    ap.add_argument("--work", required=True, help="folder for the index and the big JPEGs (kept)")
    ap.add_argument("--index-images", type=int, default=20)
    ap.add_argument("--uploads", type=int, default=6)
    ap.add_argument("--side", type=int, default=9400)
    ap.add_argument("--serve-arg", action="append", default=[], help="extra `retrieval serve` argument")
    args = ap.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sources = sorted(Path(args.images).glob("*.jpg"))
    index = work / "idx"
    if not index.exists():
        listing = work / "index.txt"
        listing.write_text("".join(f"{p.resolve()}\n" for p in sources[:args.index_images]))
        subprocess.run([sys.executable, "-m", "retrieval.cli", "build", str(index), f"@{listing}",
                        "--onnx", args.onnx, "--onnx-output", args.onnx_output, "--levels", "1",
                        "--store", str(work / "store.sqlite"), "--quiet"], check=True)
    big = []
    for src in sources[args.index_images:args.index_images + args.uploads]:
        out = work / f"big{args.side}_{src.stem}.jpg"
        if not out.exists():
            Image.open(src).convert("RGB").resize((args.side, args.side), Image.BILINEAR).save(out, quality=85)
        big.append(out)

    proc = subprocess.Popen([sys.executable, "-m", "retrieval.cli", "serve", str(index), "--port", "0",
                             *args.serve_arg], stderr=subprocess.PIPE, text=True)
    url = None
    for line in proc.stderr:
        match = re.search(r"on (http://127\.0\.0\.1:\d+/)", line)
        if match:
            url = match.group(1)
            break
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    try:
        idle = _kib(proc.pid, "VmRSS")
        start = time.perf_counter()
        with ThreadPoolExecutor(len(big)) as pool:
            answers = list(pool.map(lambda p: _post(url, p), big))
        wall = time.perf_counter() - start
        after = _kib(proc.pid, "VmRSS")
        time.sleep(5)
        row = {
            "uploads": len(big), "side": args.side, "mb_each": round(sum(p.stat().st_size for p in big) / len(big) / 2**20, 1),
            "serve_args": args.serve_arg, "statuses": [a[0] for a in answers],
            "details": sorted({a[2] for a in answers if a[2]}), "wall_s": round(wall, 1),
            "max_request_s": round(max(a[1] for a in answers), 1),
            "rss_idle_mb": idle // 1024, "peak_rss_mb": _kib(proc.pid, "VmHWM") // 1024,
            "rss_after_mb": after // 1024, "rss_after_5s_mb": _kib(proc.pid, "VmRSS") // 1024,
        }
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    print(json.dumps(row))
    return 0 if all(a[0] in (200, 413) for a in answers) else 1


if __name__ == "__main__":
    sys.exit(main())
