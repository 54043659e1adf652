"""Query latency through `retrieval serve` against `retrieval query` as a fresh process,
and the server's throughput with 1, 4 and 8 concurrent clients.

    python benchmarks/serve_latency.py --images ../shared/data/ukbench/full \
        --index-images 200 --queries 50 --cli-queries 10 \
        --onnx ../shared/weights/mobilenetv2-12-int8.onnx --onnx-output 627 --levels 1,2

Builds a throw-away index (and feature store) over the first `--index-images` images in
a temporary folder, then queries it with images that are not in the index, each used
once, so every timed query extracts its own descriptors (no feature-store hit) unless the
row says "repeat". The server runs as a real `retrieval serve` process on 127.0.0.1 with
an ephemeral port; every client request is bounded by a timeout and the script stops the
server itself. Prints a table and the error count, and exits 1 if any request failed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _i, _arg in enumerate(sys.argv):  # --code DIR: measure that checkout's retrieval (e.g. the code before a change)
    if _arg == "--code" and _i + 1 < len(sys.argv):
        ROOT = Path(sys.argv[_i + 1]).resolve()
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
CLI = [sys.executable, "-m", "retrieval.cli"]
TIMEOUT = 120  # seconds, for any one request or command


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary(seconds: list[float]) -> dict:
    ms = [s * 1000 for s in seconds]
    return {"n": len(ms), "p50_ms": round(percentile(ms, 50), 1), "p95_ms": round(percentile(ms, 95), 1),
            "mean_ms": round(statistics.fmean(ms), 1)}


def run(args: list[str]) -> subprocess.CompletedProcess:
    out = subprocess.run(args, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=30 * TIMEOUT)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({out.returncode}):\n{out.stderr}")
    return out


def multipart(path: Path, k: int) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="k"\r\n\r\n{k}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{path.name}"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def post_query(url: str, path: Path, k: int) -> tuple[float, list[str] | str]:
    """One upload; returns (seconds, hit paths) or (seconds, error text)."""
    body, ctype = multipart(path, k)
    start = time.perf_counter()
    try:
        request = urllib.request.Request(url + "api/query", data=body, headers={"Content-Type": ctype})
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            hits = [h["path"] for h in json.load(response)["results"][0]["hits"]]
        return time.perf_counter() - start, hits
    except (urllib.error.URLError, OSError, ValueError, KeyError) as err:
        return time.perf_counter() - start, f"{path.name}: {err}"


class Server:
    """`retrieval serve INDEX --port 0` on 127.0.0.1, stopped by `stop()` (SIGINT)."""

    def __init__(self, index: Path) -> None:
        start = time.perf_counter()
        self.proc = subprocess.Popen([*CLI, "serve", str(index), "--host", "127.0.0.1", "--port", "0"],
                                     stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=ENV,
                                     cwd=ROOT)  # `-m` puts the working directory first on sys.path
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.proc.stderr], daemon=True).start()
        self.url = None
        deadline = time.monotonic() + TIMEOUT
        while self.url is None and time.monotonic() < deadline and self.proc.poll() is None:
            try:
                match = re.search(r"on (http://127\.0\.0\.1:\d+/)", lines.get(timeout=1))
            except queue.Empty:
                continue
            self.url = match.group(1) if match else None
        if self.url is None:
            self.stop()
            raise SystemExit(f"retrieval serve did not start within {TIMEOUT} s")
        self.startup_s = time.perf_counter() - start

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def throughput(url: str, paths: list[Path], clients: int, k: int) -> dict:
    """`clients` threads share the request list, each sending one request at a time."""
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        outcomes = list(pool.map(lambda p: post_query(url, p, k), paths))
    wall = time.perf_counter() - start
    errors = [hits for _, hits in outcomes if isinstance(hits, str)]
    return {"clients": clients, "requests": len(paths), "seconds": round(wall, 2),
            "req_per_s": round(len(paths) / wall, 2), **summary([s for s, _ in outcomes]),
            "errors": len(errors), "error_samples": errors[:3]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", required=True, help="folder of images (sorted; the first ones are indexed)")
    parser.add_argument("--index-images", type=int, default=200)
    parser.add_argument("--queries", type=int, default=50, help="sequential server queries (default 50)")
    parser.add_argument("--cli-queries", type=int, default=10,
                        help="fresh `retrieval query` processes (default 10; each pays the start-up)")
    parser.add_argument("--concurrency", default="1,4,8", help="client counts for the throughput runs")
    parser.add_argument("--requests", type=int, default=48, help="requests per throughput run (default 48)")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    parser.add_argument("--code", default=str(ROOT), help="checkout whose retrieval is measured (default: this one)")
    args, build_flags = parser.parse_known_args()
    if not build_flags:
        raise SystemExit("give the extractor flags of the index, e.g. --onnx FILE --onnx-output 627 --levels 1,2")
    concurrency = [int(c) for c in args.concurrency.split(",")]

    images = sorted(p for p in Path(args.images).resolve().iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    need = args.index_images + args.cli_queries + args.queries + len(concurrency) * args.requests
    if len(images) < need:
        raise SystemExit(f"{args.images} has {len(images)} images; these settings use {need} distinct ones")
    db, rest = images[:args.index_images], images[args.index_images:]
    cli_q, rest = rest[:args.cli_queries], rest[args.cli_queries:]
    srv_q, rest = rest[:args.queries], rest[args.queries:]
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="serve-latency-") as work:
        work = Path(work)
        index = work / "idx"
        (work / "db.txt").write_text("\n".join(map(str, db)) + "\n")
        start = time.perf_counter()
        run([*CLI, "build", str(index), f"@{work / 'db.txt'}", "--store", str(work / "features.sqlite"),
             "--quiet", *build_flags])
        build_s = time.perf_counter() - start
        print(f"built {len(db)} images in {build_s:.1f} s", file=sys.stderr)

        cli_times, cli_hits = [], {}
        for path in cli_q:
            start = time.perf_counter()
            out = run([*CLI, "query", str(index), str(path), "-k", str(args.k), "--json", "--quiet"])
            cli_times.append(time.perf_counter() - start)
            cli_hits[path] = [h["path"] for h in json.loads(out.stdout)["results"][0]["hits"]]
        print(f"cli: {summary(cli_times)}", file=sys.stderr)

        server = Server(index)
        try:
            cold = [post_query(server.url, p, args.k) for p in srv_q]
            repeat = [post_query(server.url, p, args.k) for p in srv_q]  # now store hits: search only
            same = [post_query(server.url, p, args.k)[1] == cli_hits[p] for p in cli_q]
            runs = []
            for clients in concurrency:
                batch, rest = rest[:args.requests], rest[args.requests:]
                runs.append(throughput(server.url, batch, clients, args.k))
                print(f"throughput: {runs[-1]}", file=sys.stderr)
        finally:
            server.stop()
    errors = [h for _, h in cold + repeat if isinstance(h, str)] + [e for r in runs for e in r["error_samples"]]
    n_errors = sum(isinstance(h, str) for _, h in cold + repeat) + sum(r["errors"] for r in runs)

    result = {
        "code": str(ROOT), "index_images": len(db), "build_seconds": round(build_s, 1), "build_flags": build_flags, "k": args.k,
        "server_startup_seconds": round(server.startup_s, 2),
        "cli_fresh_process": summary(cli_times),
        "server_cold": summary([s for s, _ in cold]),
        "server_repeat": summary([s for s, _ in repeat]),
        "server_equals_cli": f"{sum(same)}/{len(same)}",
        "throughput": runs,
        "errors": n_errors,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_before": round(load_before, 1), "load_after": round(os.getloadavg()[0], 1)},
    }
    print(f"code: {ROOT}")
    print(f"index: {len(db)} images ({' '.join(build_flags)}), built in {build_s:.1f} s "
          f"({len(db) / build_s:.2f} img/s with start-up); k={args.k}")
    print(f"server start-up (process start to ready): {server.startup_s:.1f} s")
    print(f"{'mode':44s} {'n':>4s} {'p50 ms':>8s} {'p95 ms':>8s}")
    for name, key in (("retrieval query, fresh process (extract+search)", "cli_fresh_process"),
                      ("server, new image (upload+extract+search)", "server_cold"),
                      ("server, repeated image (store hit)", "server_repeat")):
        row = result[key]
        print(f"{name:44s} {row['n']:4d} {row['p50_ms']:8.1f} {row['p95_ms']:8.1f}")
    print(f"server hits equal `retrieval query` hits: {result['server_equals_cli']}")
    print(f"{'clients':>7s} {'requests':>8s} {'req/s':>7s} {'p50 ms':>8s} {'p95 ms':>8s} {'errors':>6s}")
    for r in runs:
        print(f"{r['clients']:7d} {r['requests']:8d} {r['req_per_s']:7.2f} {r['p50_ms']:8.1f} {r['p95_ms']:8.1f} {r['errors']:6d}")
    print(f"errors: {n_errors}  (load average {result['machine']['load_before']} before, "
          f"{result['machine']['load_after']} after, {os.cpu_count()} cores)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    for e in errors[:5]:
        print(f"error: {e}", file=sys.stderr)
    if sum(same) != len(same):
        print("error: the server and `retrieval query` ranked some query differently", file=sys.stderr)
    if n_errors or sum(same) != len(same):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
