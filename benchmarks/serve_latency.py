"""Query latency and throughput through `retrieval serve`, in two modes.

Built index: the server against `retrieval query` as a fresh process, and its throughput
with 1, 4 and 8 concurrent clients.

    python benchmarks/serve_latency.py --images ../shared/data/ukbench/full \
        --index-images 200 --queries 50 --cli-queries 10 \
        --onnx ../shared/weights/mobilenetv2-12-int8.onnx --onnx-output 627 --levels 1,2

Builds a throw-away index (and feature store) over the first `--index-images` images in
a temporary folder, then queries it with images that are not in the index, each used
once, so every timed query extracts its own descriptors (no feature-store hit) unless the
row says "repeat".

Kept index: search under concurrency on an index built earlier (no build, no CLI), with
request batching on and off side by side.

    python benchmarks/serve_latency.py --index /tmp/scale/n100000/index --query-indexed 30 \
        --seconds 20 --concurrency 1,2,4,8 --max-batch 1,32

For each `--max-batch` value one `retrieval serve INDEX --max-batch M --quiet` process
serves the index as it is. The queries are uploads of the images in `--query-images DIR`
(a store hit, searched without the network, when their descriptors are in the index's
feature store; any other image is described and added to the store), or `--query-indexed
N` indexed images asked by id (`POST /api/query/{id}`, ids spread over the index): the
way to query `benchmarks/index_scale.py --keep`'s indexes, whose files are a few bytes
of text naming their stored descriptors, which the server refuses as uploads (not an
image). Once the server has read its window vectors ahead (`Index.warm`, in the
background, as `retrieval serve` does at start), it first answers every query alone, one
after the other (the answers to compare with, and the warm-up); then, for each client
count, closed-loop clients run for
`--seconds`: each sends its next query as soon as it has the previous answer, client c
starting at query c and the clients stepping through the queries together (c, c +
clients, ...). Each row: requests/s, p50 / p95 / p99 ms, errors, how many answers' hit
paths differ from that server's answer to the same query alone, and the CPU time per
request of the server process and of this script's client threads (on a small machine
the clients share its cores with the server).
`--max-batch 1` answers one query at a time, as the server did before request batching.

In both modes the server runs as a real process on 127.0.0.1 with an ephemeral port;
every client request is bounded by a timeout and the script stops the server itself.
Prints a table and the error count, and exits 1 if any request failed or any answer
differed.
"""
from __future__ import annotations

import argparse
import itertools
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
from pathlib import Path
from typing import Iterator, Sequence

ROOT = Path(__file__).resolve().parents[1]
for _i, _arg in enumerate(sys.argv):  # --code DIR: measure that checkout's retrieval (e.g. the code before a change)
    if _arg == "--code" and _i + 1 < len(sys.argv):
        ROOT = Path(sys.argv[_i + 1]).resolve()
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
CLI = [sys.executable, "-m", "retrieval.cli"]
TIMEOUT = 120  # seconds, for any one request or command
# A server opening a 1,000,000-image index loads its FAISS structures first (a minute or
# more on a busy machine).
START_TIMEOUT = 600
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
# Options of one mode only: None when not given (their defaults are below), so that giving
# one to the other mode is an error rather than silently ignored.
BUILT_DEFAULTS = {"index_images": 200, "queries": 50, "cli_queries": 10, "requests": 48, "concurrency": "1,4,8"}
KEPT_DEFAULTS = {"query_images": None, "query_indexed": None, "seconds": 20.0, "max_batch": "1,32", "concurrency": "1,2,4,8"}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary(seconds: list[float]) -> dict:
    ms = [s * 1000 for s in seconds]
    return {"n": len(ms), "p50_ms": round(percentile(ms, 50), 1), "p95_ms": round(percentile(ms, 95), 1),
            "p99_ms": round(percentile(ms, 99), 1), "mean_ms": round(statistics.fmean(ms), 1)}


def run(args: list[str]) -> subprocess.CompletedProcess:
    out = subprocess.run(args, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=30 * TIMEOUT)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({out.returncode}):\n{out.stderr}")
    return out


# A query: an image file to upload, or the manifest id of an indexed image.
Query = Path | int


def multipart(query: Query, k: int) -> tuple[bytes, str]:
    """The query form: `k`, and the image file when the query is an upload."""
    boundary = uuid.uuid4().hex
    body = f'--{boundary}\r\nContent-Disposition: form-data; name="k"\r\n\r\n{k}\r\n'.encode()
    if isinstance(query, Path):
        body += (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{query.name}"\r\n'
                 "Content-Type: image/jpeg\r\n\r\n").encode() + query.read_bytes() + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def post_query(url: str, query: Query, k: int) -> tuple[float, list[str] | str]:
    """One query, an upload (`POST /api/query`) or an indexed image (`POST /api/query/{id}`);
    returns (seconds, hit paths) or (seconds, error text)."""
    body, ctype = multipart(query, k)
    route, name = ("api/query", query.name) if isinstance(query, Path) else (f"api/query/{query}", f"id {query}")
    start = time.perf_counter()
    try:
        request = urllib.request.Request(url + route, data=body, headers={"Content-Type": ctype})
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            hits = [h["path"] for h in json.load(response)["results"][0]["hits"]]
        return time.perf_counter() - start, hits
    except urllib.error.HTTPError as err:  # the server's reason is in the body
        return time.perf_counter() - start, f"{name}: {err}: {err.read().decode(errors='replace')[:300]}"
    except (urllib.error.URLError, OSError, ValueError, KeyError) as err:
        return time.perf_counter() - start, f"{name}: {err}"


class Server:
    """`retrieval serve INDEX --port 0 FLAGS` on 127.0.0.1, stopped by `stop()` (SIGINT)."""

    def __init__(self, index: Path, flags: Sequence[str] = ()) -> None:
        start = time.perf_counter()
        self.proc = subprocess.Popen([*CLI, "serve", str(index), "--host", "127.0.0.1", "--port", "0", *flags],
                                     stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=ENV,
                                     cwd=ROOT)  # `-m` puts the working directory first on sys.path
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.proc.stderr], daemon=True).start()
        self.url = None
        seen: list[str] = []
        deadline = time.monotonic() + START_TIMEOUT
        while self.url is None and time.monotonic() < deadline and self.proc.poll() is None:
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                continue
            match = re.search(r"on (http://127\.0\.0\.1:\d+/)", seen[-1])
            self.url = match.group(1) if match else None
        if self.url is None:
            self.stop()
            while not lines.empty():
                seen.append(lines.get())
            raise SystemExit(f"retrieval serve {index} did not start within {START_TIMEOUT} s "
                             f"(exit {self.proc.returncode}):\n{''.join(seen)}")
        self.startup_s = time.perf_counter() - start

    def wait_read_ahead(self, timeout: float = START_TIMEOUT) -> float:
        """Wait until the server has stopped reading (its background read-ahead of the
        window vectors, `Index.warm`, which would otherwise share the cores with the first
        rows); returns the seconds waited. Reads /proc/PID/io: elsewhere, no wait."""
        start = time.monotonic()
        last = None
        while time.monotonic() - start < timeout:
            try:
                read = next(int(line.split()[1]) for line in Path(f"/proc/{self.proc.pid}/io").read_text().splitlines()
                            if line.startswith("rchar:"))
            except (OSError, StopIteration):
                break
            if read == last:
                break
            last = read
            time.sleep(1.0)
        return time.monotonic() - start

    def info(self) -> dict:
        """The index's `/api/info` (as `retrieval info --json`)."""
        with urllib.request.urlopen(self.url + "api/info", timeout=TIMEOUT) as response:
            return json.load(response)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class _Shared:
    """One iterator that several client threads take their next query from."""

    def __init__(self, queries: Sequence[Query]) -> None:
        self._it, self._lock = iter(queries), threading.Lock()

    def __iter__(self) -> "_Shared":
        return self

    def __next__(self) -> Query:
        with self._lock:
            return next(self._it)


Outcome = tuple[Query, float, "list[str] | str"]  # query, seconds, hit paths or error


def closed_loop(url: str, k: int, streams: Sequence[Iterator[Query]], seconds: float | None = None) -> dict:
    """One client thread per stream, each sending its stream's next query as soon as it
    has the previous answer, until the stream ends or `seconds` have passed (a request
    under way then is finished and counted). Returns the row of throughput, latency and
    errors, and under "outcomes" every (query, seconds, hits or error)."""
    outcomes: list[Outcome] = []
    start = time.perf_counter()
    stop = None if seconds is None else time.monotonic() + seconds

    def client(stream: Iterator[Query]) -> None:
        while stop is None or time.monotonic() < stop:
            query = next(stream, None)
            if query is None:
                return
            took, hits = post_query(url, query, k)
            outcomes.append((query, took, hits))

    threads = [threading.Thread(target=client, args=(stream,)) for stream in streams]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    errors = [hits for _, _, hits in outcomes if isinstance(hits, str)]
    return {"clients": len(streams), "requests": len(outcomes), "seconds": round(wall, 2),
            "req_per_s": round(len(outcomes) / wall, 2), **summary([s for _, s, _ in outcomes]),
            "errors": len(errors), "error_samples": errors[:3], "outcomes": outcomes}


def throughput(url: str, paths: list[Path], clients: int, k: int) -> dict:
    """`clients` threads share the request list, each sending one request at a time."""
    shared = _Shared(paths)
    row = closed_loop(url, k, [shared] * clients)
    del row["outcomes"]
    return row


def images_in(folder: str) -> list[Path]:
    return sorted(p for p in Path(folder).resolve().iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def cpu_seconds(pid: int | None = None) -> float | None:
    """CPU time (user + system, all threads) of process `pid` so far, None where /proc
    does not say; `None` pid: this process (the client threads)."""
    if pid is None:
        return time.process_time()
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def machine(load_before: float) -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "load_before": round(load_before, 1), "load_after": round(os.getloadavg()[0], 1)}


def built_index(args, build_flags: list[str]) -> None:
    """The first mode: build a throw-away index, then the CLI, the server, its throughput."""
    if not build_flags:
        raise SystemExit("give the extractor flags of the index, e.g. --onnx FILE --onnx-output 627 --levels 1,2")
    concurrency = [int(c) for c in args.concurrency.split(",")]

    images = images_in(args.images)
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
        "machine": machine(load_before),
    }
    print(f"code: {ROOT}")
    print(f"index: {len(db)} images ({' '.join(build_flags)}), built in {build_s:.1f} s "
          f"({len(db) / build_s:.2f} img/s with start-up); k={args.k}")
    print(f"server start-up (process start to ready): {server.startup_s:.1f} s")
    print(f"{'mode':44s} {'n':>4s} {'p50 ms':>8s} {'p95 ms':>8s} {'p99 ms':>8s}")
    for name, key in (("retrieval query, fresh process (extract+search)", "cli_fresh_process"),
                      ("server, new image (upload+extract+search)", "server_cold"),
                      ("server, repeated image (store hit)", "server_repeat")):
        row = result[key]
        print(f"{name:44s} {row['n']:4d} {row['p50_ms']:8.1f} {row['p95_ms']:8.1f} {row['p99_ms']:8.1f}")
    print(f"server hits equal `retrieval query` hits: {result['server_equals_cli']}")
    print(f"{'clients':>7s} {'requests':>8s} {'req/s':>7s} {'p50 ms':>8s} {'p95 ms':>8s} {'p99 ms':>8s} {'errors':>6s}")
    for r in runs:
        print(f"{r['clients']:7d} {r['requests']:8d} {r['req_per_s']:7.2f} {r['p50_ms']:8.1f} {r['p95_ms']:8.1f} "
              f"{r['p99_ms']:8.1f} {r['errors']:6d}")
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


def indexed_ids(images: int, n: int) -> list[int]:
    """`n` manifest ids spread over an index of `images` images added in one go (ids 1 to
    `images`; an id removed since answers 404, which the run reports as an error)."""
    return sorted({1 + j * images // n for j in range(n)})


def kept_index(args) -> None:
    """The second mode: serve a kept index once per --max-batch value, closed-loop clients."""
    index = Path(args.index).resolve()
    queries: list[Query] = []
    if args.query_images:
        queries = images_in(args.query_images)
        if not queries:
            raise SystemExit(f"{args.query_images} holds no .jpg/.jpeg/.png query images")
        source = f"{len(queries)} uploads of the images in {Path(args.query_images).resolve()}"
    elif args.query_indexed < 1:
        raise SystemExit("--query-indexed must be a whole number >= 1")
    concurrency = [int(c) for c in args.concurrency.split(",")]
    max_batches = [int(m) for m in args.max_batch.split(",")]
    if args.seconds <= 0 or min(concurrency) < 1 or min(max_batches) < 1:
        raise SystemExit("--seconds must be > 0, and --concurrency and --max-batch whole numbers >= 1")
    load_before = os.getloadavg()[0]
    rows, servers, info = [], [], None
    for max_batch in max_batches:
        server = Server(index, ["--max-batch", str(max_batch), "--quiet"])
        try:
            waited = server.wait_read_ahead()
            if info is None:
                info = server.info()
                if not queries:
                    queries = indexed_ids(info["images"], args.query_indexed)
                    source = (f"{len(queries)} indexed images by id ({queries[0]} to {queries[-1]}, "
                              "POST /api/query/{id})")
            alone = {p: post_query(server.url, p, args.k)[1] for p in queries}
            failed = [hits for hits in alone.values() if isinstance(hits, str)]
            if failed:
                hint = ("; files it cannot decode as images (benchmarks/index_scale.py's) can only be "
                        "asked as indexed images: --query-indexed N") if args.query_images else ""
                raise SystemExit(f"the server (--max-batch {max_batch}) failed a query asked alone: {failed[0]}{hint}")
            servers.append({"max_batch": max_batch, "startup_seconds": round(server.startup_s, 2),
                            "read_ahead_wait_seconds": round(waited, 1), "alone": alone})
            for clients in concurrency:
                load = os.getloadavg()[0]
                streams = [(queries[i % len(queries)] for i in itertools.count(c, clients)) for c in range(clients)]
                server_cpu, client_cpu = cpu_seconds(server.proc.pid), cpu_seconds()
                row = closed_loop(server.url, args.k, streams, args.seconds)
                outcomes = row.pop("outcomes")
                rows.append({"max_batch": max_batch, **row,
                             "server_cpu_ms_per_request": _per_request(server_cpu, cpu_seconds(server.proc.pid), row["requests"]),
                             "client_cpu_ms_per_request": _per_request(client_cpu, cpu_seconds(), row["requests"]),
                             "differ_from_alone": sum(hits != alone[p] for p, _, hits in outcomes
                                                      if not isinstance(hits, str)),
                             "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2)})
                print(f"max_batch {max_batch}: {rows[-1]}", file=sys.stderr)
        finally:
            server.stop()
    # Every server is asked each query alone: batching on or off, the same answers.
    alone_differ = sum(s["alone"][p] != servers[0]["alone"][p] for s in servers for p in queries)
    result = {
        "code": str(ROOT), "index": str(index), "images": info["images"], "store": info["store"],
        "structure": info.get("structure"), "queries": source,
        "k": args.k, "seconds": args.seconds, "servers": [{key: v for key, v in s.items() if key != "alone"} for s in servers],
        "alone_differ_between_servers": alone_differ, "rows": rows, "command": " ".join(sys.argv),
        "machine": machine(load_before),
    }
    structure = info.get("structure") or {}
    print(f"code: {ROOT}")
    search = " ".join(filter(None, (structure.get("search"), structure.get("factory"))))
    print(f"index: {index}, {info['images']} images ({search}), store {info['store']}; k={args.k}")
    print(f"queries: {source}; {args.seconds:g} s per row")
    print("server start-up (process start to ready; then its read-ahead, waited for): "
          + ", ".join(f"--max-batch {s['max_batch']} {s['startup_seconds']:.1f} s; {s['read_ahead_wait_seconds']:.1f} s"
                      for s in servers))
    print(f"{'max_batch':>9s} {'clients':>7s} {'requests':>8s} {'req/s':>7s} {'p50 ms':>8s} {'p95 ms':>8s} "
          f"{'p99 ms':>8s} {'errors':>6s} {'differ':>6s} {'CPU ms/req server':>17s} {'client':>6s} {'load':>11s}")
    for r in rows:
        cpu = " ".join("     -" if v is None else f"{v:6.1f}" for v in (r["server_cpu_ms_per_request"],
                                                                      r["client_cpu_ms_per_request"]))
        print(f"{r['max_batch']:9d} {r['clients']:7d} {r['requests']:8d} {r['req_per_s']:7.2f} {r['p50_ms']:8.1f} "
              f"{r['p95_ms']:8.1f} {r['p99_ms']:8.1f} {r['errors']:6d} {r['differ_from_alone']:6d} "
              f"{'':11s}{cpu} {r['load_before']:5.2f}-{r['load_after']:.2f}")
    n_errors = sum(r["errors"] for r in rows)
    n_differ = sum(r["differ_from_alone"] for r in rows)
    print(f"errors: {n_errors}; answers differing from the same server's answer alone: {n_differ}; "
          f"alone answers differing between servers: {alone_differ}  (load average "
          f"{result['machine']['load_before']} before, {result['machine']['load_after']} after, "
          f"{os.cpu_count()} cores)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    for e in [e for r in rows for e in r["error_samples"]][:5]:
        print(f"error: {e}", file=sys.stderr)
    if n_errors or n_differ or alone_differ:
        raise SystemExit(1)


def _per_request(before: float | None, after: float | None, requests: int) -> float | None:
    return None if before is None or after is None or not requests else round(1000 * (after - before) / requests, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--images", help="built index: folder of images (sorted; the first ones are indexed)")
    mode.add_argument("--index", help="kept index: serve this index directory as it is (no build)")
    built = parser.add_argument_group("built index only")
    built.add_argument("--index-images", type=int, help="images indexed (default 200)")
    built.add_argument("--queries", type=int, help="sequential server queries (default 50)")
    built.add_argument("--cli-queries", type=int,
                       help="fresh `retrieval query` processes (default 10; each pays the start-up)")
    built.add_argument("--requests", type=int, help="requests per throughput run (default 48)")
    kept = parser.add_argument_group("kept index only")
    kept.add_argument("--query-images", metavar="DIR",
                      help="upload each image in DIR (store hits, no network, when their descriptors are stored)")
    kept.add_argument("--query-indexed", type=int, metavar="N",
                      help="query N indexed images by id instead (ids spread over the index; for an index of "
                      "files a server cannot decode, e.g. benchmarks/index_scale.py's synthetic ones)")
    kept.add_argument("--seconds", type=float, help="closed-loop run per server and client count (default 20)")
    kept.add_argument("--max-batch", help="`retrieval serve --max-batch` values, one server each (default 1,32)")
    parser.add_argument("--concurrency", help="client counts for the throughput runs (default 1,4,8 built, 1,2,4,8 kept)")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    parser.add_argument("--code", default=str(ROOT), help="checkout whose retrieval is measured (default: this one)")
    args, build_flags = parser.parse_known_args()
    ours, other = (BUILT_DEFAULTS, KEPT_DEFAULTS) if args.images else (KEPT_DEFAULTS, BUILT_DEFAULTS)
    foreign = [name for name in set(other) - set(ours) if getattr(args, name) is not None]
    if foreign:
        parser.error(f"--{foreign[0].replace('_', '-')} is for "
                     f"{'--index (a kept index), not --images' if args.images else '--images (a built index), not --index'}")
    for name, default in ours.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.images:
        built_index(args, build_flags)
        return
    if build_flags:
        parser.error(f"unrecognized arguments: {' '.join(build_flags)} (a kept index has its own extractor)")
    if (args.query_images is None) == (args.query_indexed is None):
        parser.error("--index needs one of --query-images DIR (uploads) and --query-indexed N (indexed images)")
    kept_index(args)


if __name__ == "__main__":
    main()
