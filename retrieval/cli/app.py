"""The `retrieval` command line: build, add, query, info, remove, reindex, split, dba, duplicates, export-onnx, layers, serve.

Exit codes (docs/cli.md section 1): 0 all done; 2 usage error (unknown index, bad flag);
3 done, but some inputs were skipped (each named on stderr and in the JSON); 4 busy (another
process is writing the index; nothing was done); 1 other failure;
141, silently, when stdout is a closed pipe (see `cliutil.stdout_closed`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from ..config import EXACT_LIMIT, MAX_BATCH, ConfigError, RuntimeConfig
from ..fileio import storage_message
from .args import (
    add_extractor_args,
    add_rerank_args,
    add_ray_arg,
    add_runtime_args,
    extractor_config_from_args,
    parse_levels,
    runtime_config_from_args,
    search_config_from_args,
    search_options_from_args,
)
from .util import add_subcommands, stdout_closed

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_SKIPPED, EXIT_BUSY = 0, 1, 2, 3, 4


_INDEX_HELP = "folder of an index made by `retrieval build`"
_INPUT_HELP = "an image file, a folder (recursive) or @list.txt (one path per line)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retrieval",
        description="Instance image retrieval with multi-scale CNN sub-patch descriptors "
        "(L2 + PCA-whitening + L2, min-over-patch-pairs distance).",
        epilog="INPUT is an image file, a folder (recursive) or @list.txt (one path per line). "
        "Exit codes: 0 done, 1 failure, 2 usage error, 3 done but some inputs skipped, "
        "4 busy (another process is writing the index; retry).",
    )
    sub = add_subcommands(parser, dest="command", required=True)

    p = sub.add_parser("build", help="create an index from images (resumes an interrupted build)")
    p.add_argument("index", metavar="INDEX_DIR", help="folder of the index to create (or to finish)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=_INPUT_HELP)
    add_extractor_args(p)
    add_ray_arg(p)
    p.add_argument("--index-type", metavar="FACTORY",
                   help="FAISS index-factory string proposing candidates on large collections, e.g. "
                   "'IVF1024,PQ64x4fs', or 'Flat' for exact search at any size (default: chosen by "
                   "collection size: exact kernel scoring up to %d images, IVF fast-scan PQ above)" % EXACT_LIMIT)
    p.add_argument("--store", metavar="FILE", help="feature store (default $RETRIEVAL_STORE or ~/.cache/retrieval/features.sqlite)")
    p.add_argument("--whiten-on", metavar="DIR", nargs="+", help="learn the PCA-whitening on these images instead of the database")
    _common(p)

    p = sub.add_parser("add", help="add images to an index (already present ones are skipped)")
    p.add_argument("index", metavar="INDEX_DIR", help=_INDEX_HELP)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=_INPUT_HELP)
    add_runtime_args(p)
    add_ray_arg(p)
    _common(p)

    p = sub.add_parser("query", help="rank the index for query images")
    p.add_argument("index", metavar="INDEX_DIR", help=_INDEX_HELP)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="query image: a file, a folder (recursive) or @list.txt")
    p.add_argument("-k", type=int, default=10, help="hits per query (default 10)")
    p.add_argument("--query-levels", type=parse_levels, help="override the index's query levels")
    p.add_argument("--aggregate", choices=("min", "mean-min"), help="override the index's image distance")
    p.add_argument("--exact-limit", type=int, default=EXACT_LIMIT, metavar="N",
                   help="score every image exactly up to N images; above, FAISS proposes candidates "
                   f"(default {EXACT_LIMIT})")
    p.add_argument("--nprobe", type=int, metavar="N",
                   help="IVF lists searched per query window (default 32, fewer once the lists are long: 16 at "
                   "1,000,000 images)")
    p.add_argument("--per-patch", type=int, metavar="N",
                   help="nearest database windows per query window that nominate candidates (default max(4k, 32))")
    p.add_argument("--layout-k", type=int, metavar="N",
                   help="candidates from the layout index (whole images whose windows, laid end to end, are "
                   "nearest the query's; default 128, 0 = leave it out)")
    p.add_argument("--shortlist", type=int, metavar="N",
                   help="of the images the nearest windows nominate, score the N whose windows FAISS found nearest "
                   "(default max(20k, 200); 0 = score them all)")
    p.add_argument("--html", metavar="REPORT.html",
                   help="also write a self-contained page of every query's hits with the matched windows drawn")
    add_rerank_args(p)
    add_runtime_args(p)
    p.add_argument("--ray", nargs="?", const="local", metavar="local|auto|ADDRESS", dest="shard_ray",
                   help="a split index (`retrieval split`) only: serve each shard from a Ray actor on this "
                   "cluster ('local' when no value; every node must read the shard directories); "
                   "without it the shards are searched in threads")
    _common(p)

    p = sub.add_parser("dba", help="recompute every image's nearest neighbours from scratch (add/remove keep them current; "
                       "on a sharded directory, across all its shards)")
    p.add_argument("index", metavar="INDEX_DIR", help=_INDEX_HELP)
    p.add_argument("-k", type=int, default=10,
                   help="neighbours kept per image (default 10; `query --dba K` uses up to this many); "
                   "later adds and removes keep this many")
    _common(p)

    p = sub.add_parser("duplicates", help="groups of indexed images that show the same thing (copies, crops, views)")
    p.add_argument("index", metavar="INDEX_DIR", help=_INDEX_HELP)
    p.add_argument("--max-distance", type=float, metavar="D",
                   help="largest image distance between a group's first image and a member (default: set "
                   "per index from its own distances; the output says which value and rule)")
    p.add_argument("--min-size", type=int, default=2, metavar="N",
                   help="report only groups of at least N images (default 2)")
    p.add_argument("--html", metavar="OUT.html",
                   help="also write a self-contained page of the groups: thumbnails, each member's "
                   "matched windows drawn on it and on the group's first image")
    _common(p)

    p = sub.add_parser("info", help="counts and configuration of an index")
    p.add_argument("index", metavar="INDEX_DIR", help=_INDEX_HELP)
    _common(p)

    p = sub.add_parser("remove", help="remove images (by path) from an index")
    p.add_argument("index", metavar="INDEX_DIR", help=_INDEX_HELP)
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="an indexed image, a folder (every indexed image under it) or @list.txt; "
                   "the files need not exist any more")
    _common(p)

    p = sub.add_parser("split", help="split an index by image into shards that share its whitening")
    p.add_argument("index", metavar="INDEX_DIR", help=_INDEX_HELP)
    p.add_argument("out", metavar="SHARDED_DIR", help="new folder for the shards (query and info take it as INDEX_DIR)")
    p.add_argument("--shards", type=int, required=True, metavar="N",
                   help="number of shards, each a contiguous range of the index's images (nothing is extracted)")
    _common(p)

    p = sub.add_parser("reindex", help="change the search structure of an index (no extraction)")
    p.add_argument("index", metavar="INDEX_DIR", help=_INDEX_HELP)
    p.add_argument("--index-type", metavar="FACTORY", required=True,
                   help="a FAISS index-factory string, 'exact' or 'Flat' (exact search at any size), or "
                   "'auto' (chosen by collection size): any `index_type` that `info` reports")
    _common(p)

    from ..extraction.onnx_export import CALIBRATE_IMAGES, DEFAULT_INT8_FORMAT, HELDOUT_IMAGES, INT8_FORMATS

    p = sub.add_parser(
        "export-onnx", help="write a torch backbone and layer as an ONNX model (float, or int8 with --int8)",
        description="Export the torch backbone (--backbone, --weights) cut at --layer to ONNX; the file "
        "is checked against torch with onnxruntime and can then be used with --onnx OUT.onnx "
        "(with the input_spec that --json prints as --input-spec, also stored in the model's "
        "metadata). With --int8 --calibrate DIR the model is quantized to int8 "
        "(onnxruntime static quantization: uint8 activations, int8 per-channel weights), its "
        "activation ranges calibrated on windows of your images, and the cosine between its "
        "descriptors and the float model's on other images of DIR is printed (and in --json).",
    )
    p.add_argument("out", metavar="OUT.onnx", help="ONNX file to write")
    add_extractor_args(p, search=False)
    q = p.add_argument_group("int8")
    q.add_argument("--int8", action="store_true",
                   help="quantize the export to int8 (onnxruntime static quantization: uint8 "
                   "activations, int8 per-channel weights at 7 bits, which avoids overflow on CPUs without "
                   "VNNI): about 4x smaller, 1.3-2x faster on CPU (benchmarks/results/describe.md); "
                   "needs --calibrate")
    q.add_argument("--calibrate", metavar="DIR",
                   help="with --int8: a folder (recursive) of images like the ones you will index; "
                   "windows of --calibrate-images of them (each image whole, and one window of each of "
                   "levels 2-4, cut and resized as the extractor does) set the activation ranges, and "
                   f"up to {HELDOUT_IMAGES} other images are held out to measure the agreement (mean and "
                   "min cosine of the --pool descriptors of their windows) with the float model. Unreadable "
                   "images are skipped, named on stderr (exit 3); none readable: exit 2")
    q.add_argument("--calibrate-images", type=int, default=CALIBRATE_IMAGES, metavar="N",
                   help=f"with --int8: images of DIR used for calibration (default {CALIBRATE_IMAGES}, "
                   "drawn at random, seeded; 4 windows each). More images: longer export, ranges "
                   "closer to your collection's")
    q.add_argument("--int8-format", choices=INT8_FORMATS, default=DEFAULT_INT8_FORMAT,
                   help="with --int8: qdq (QuantizeLinear/DequantizeLinear around float ops, fused by "
                   "onnxruntime; the default) or qoperator (QLinearConv ... ops)")
    _common(p)

    p = sub.add_parser(
        "layers", help="list the tensors / nodes a network can be cut at, with their shapes",
        description="List every tensor (ONNX) or node (torch) of a network with its output shape "
        "for one image at the input size (224 x 224 unless the model or --input-spec says "
        "otherwise). kind 'map' = a conv map [C, h, w], usable with --pool and --patch-mode roi; "
        "'vector' = [C], --patch-mode crop only; 'other' cannot be a descriptor. Quantized "
        "(uint8/int8) tensors are dequantized when cut at. depth = position in execution order (0..1).",
    )
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--onnx", metavar="FILE", help="an ONNX model: list its tensors (names for --onnx-output)")
    g.add_argument("--backbone", metavar="NAME", help="a torchvision architecture: list its nodes (names for --layer)")
    p.add_argument("--weights", default="none",
                   help="torchvision weights (names and shapes do not depend on them; default none: "
                   "random init, nothing downloaded)")
    p.add_argument("--input-spec", metavar="K=V,...", help="input preprocessing, e.g. size=320 (see build --help)")
    p.add_argument("--maps-only", action="store_true", help="list only conv maps (kind 'map')")
    _common(p)

    p = sub.add_parser("serve", help="search page and JSON API over an index (HTTP, loopback by default)")
    p.add_argument("index", metavar="INDEX_DIR", help=_INDEX_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8765, help="TCP port (default 8765; 0 = any free port)")
    p.add_argument("--max-upload-mb", type=float, default=20, metavar="MB",
                   help="largest accepted query upload (default 20)")
    p.add_argument("--max-upload-mpx", type=float, default=50, metavar="MPX",
                   help="most megapixels in a query upload, read from its header before decoding "
                   "(default 50; 413 above)")
    p.add_argument("--token", metavar="TOKEN",
                   help="every route but the page then needs 'Authorization: Bearer TOKEN' (the page asks "
                   "for it once); default: the environment variable RETRIEVAL_TOKEN, else none")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer requests whose Host header is NAME (repeatable); others than the "
                   "address served, localhost and loopback addresses get 400 (DNS rebinding defence)")
    p.add_argument("--max-batch", type=int, default=MAX_BATCH, metavar="N",
                   help="most concurrent queries answered together in one search (default "
                   f"{MAX_BATCH}; 1 answers them one at a time, the server before request batching)")
    p.add_argument("--quiet", action="store_true", help="no access log (one line per request on stderr)")
    add_runtime_args(p)
    return parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..engine.index import IndexBusy, IndexUsageError

    try:
        code = _COMMANDS[args.command](args)
        sys.stdout.flush()  # buffered output meets a closed pipe here, where it is handled
        return code
    except BrokenPipeError:
        return stdout_closed()
    except (ConfigError, IndexUsageError) as err:
        print(f"retrieval {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except IndexBusy as err:
        print(f"retrieval {args.command}: busy: {err}", file=sys.stderr)
        return EXIT_BUSY
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to finish", file=sys.stderr)
        return EXIT_FAIL
    except Exception as err:  # noqa: BLE001 - the CLI reports, never dumps a trace by default
        # A full or read-only disk is named as such, with the file, rather than as an OSError.
        print(f"retrieval {args.command}: failed: {storage_message(err) or f'{type(err).__name__}: {err}'}",
              file=sys.stderr)
        return EXIT_FAIL


def _inputs(args) -> list[str]:
    from ..extraction.images import expand_inputs

    try:
        paths = expand_inputs(args.inputs)
    except FileNotFoundError as err:
        raise ConfigError(str(err))
    if not paths:
        print(f"retrieval {args.command}: warning: no images found in {' '.join(args.inputs)}", file=sys.stderr)
    return paths


def _report(args, report) -> int:
    data = report.to_dict()
    for item in data["skipped"]:
        print(f"skipped {item['path']}: {item['reason']}", file=sys.stderr)
    if args.json:
        print(json.dumps(data))
    else:
        print(
            f"{data['index']}: added {data['added']}, already present {data['already_present']}, "
            f"removed {data['removed']}, skipped {len(data['skipped'])}; {data['images']} images "
            f"({data['seconds']:.1f} s)"
        )
    return EXIT_SKIPPED if data["skipped"] else EXIT_OK


def _build(args) -> int:
    from ..engine.index import Index

    inputs = _inputs(args)  # a missing @list is a usage error before anything is written
    idx = Index.create(
        args.index,
        extractor_config_from_args(args),
        search_config_from_args(args),
        index_type=args.index_type,
        store=args.store,
        whiten_on=args.whiten_on,
        runtime=runtime_config_from_args(args),
    )
    with idx:
        return _report(args, idx.add(inputs, progress=not args.quiet))


def _add(args) -> int:
    from ..engine.index import Index

    with Index.open(args.index, runtime=runtime_config_from_args(args)) as idx:
        return _report(args, idx.add(_inputs(args), progress=not args.quiet))


def _remove(args) -> int:
    from ..engine.index import Index

    with Index.open(args.index) as idx:
        return _report(args, idx.remove(args.paths))


def _reindex(args) -> int:
    from ..engine.index import Index

    with Index.open(args.index) as idx:
        idx.set_index_type(args.index_type)
        info = idx.info()
    print(json.dumps(info["structure"]) if args.json else
          f"{args.index}: {info['structure']['search']} search ({info['structure']['reason']})")
    return EXIT_OK


def _query(args) -> int:
    from ..extraction.images import expand_inputs
    from ..engine.sharded import open_index

    options = search_options_from_args(args)
    if args.html and not os.path.isdir(os.path.dirname(os.path.abspath(args.html))):
        raise ConfigError(f"--html {args.html}: its folder does not exist; create it first")
    skipped: list[dict] = []
    if args.shard_ray:
        from ..cluster import require_ray

        RuntimeConfig(ray=args.shard_ray)  # the same check of the address as for build
        require_ray()
    with open_index(args.index, runtime=runtime_config_from_args(args), ray=args.shard_ray) as idx:
        results = idx.search(expand_inputs(args.images), options=options, progress=not args.quiet, skipped=skipped)
        info = idx.info() if args.html else None
    # An unreadable query is reported in `skipped` (and on stderr), not among the results.
    results = [r for r in results if r.error is None]
    for item in skipped:
        print(f"skipped {item['path']}: {item['reason']}", file=sys.stderr)
    for note in dict.fromkeys(r.note for r in results if r.note is not None):
        print(f"note: {note}", file=sys.stderr)
    if args.html:
        from ..serving.report import write_report

        write_report(args.html, results, skipped=skipped, info=info, title=f"retrieval query {args.index}")
    if args.json:
        print(json.dumps({"results": [r.to_dict() for r in results], "skipped": skipped}))
    else:
        for r in results:
            print(r.query)
            for h in r.hits:
                # Re-ranked hits are ordered by their re-ranked distance: it comes first.
                ranked = "" if h.rerank_distance is None else f"{h.rerank_distance:.4f} re-ranked, "
                print(f"  {h.rank:3d}  {ranked}{h.distance:.4f}  {h.path}")
    return EXIT_SKIPPED if skipped else EXIT_OK


def _dba(args) -> int:
    from ..engine.sharded import open_index

    if args.k < 1:
        raise ConfigError("-k must be >= 1")
    start = time.perf_counter()
    with open_index(args.index) as idx:
        meta = idx.build_neighbours(args.k, progress=not args.quiet)
    meta["seconds"] = round(time.perf_counter() - start, 3)
    print(json.dumps(meta) if args.json else
          f"{args.index}: {meta['k']} nearest neighbours of {meta['images']} images ({meta['seconds']:.1f} s)")
    return EXIT_OK


def _duplicates(args) -> int:
    from ..engine.index import Index

    if args.html and not os.path.isdir(os.path.dirname(os.path.abspath(args.html))):
        raise ConfigError(f"--html {args.html}: its folder does not exist; create it first")
    with Index.open(args.index) as idx:
        found = idx.duplicates(args.max_distance, args.min_size, progress=not args.quiet)
        if args.html:
            from ..serving.duplicates_page import write_duplicates_page

            write_duplicates_page(args.html, found, idx)
    if args.json:
        print(json.dumps(found.to_dict()))
        return EXIT_OK
    print(f"{found.index}: {len(found.groups)} groups in {found.images} images "
          f"(max distance {found.max_distance:.4f}, {found.rule}; {found.seconds:.1f} s)")
    for n, group in enumerate(found.groups, 1):
        print(f"group {n} ({len(group)} images)")
        for m in group:
            print(f"  {m.distance:.4f}  {m.path}")
    return EXIT_OK


def _info(args) -> int:
    from ..engine.sharded import open_index

    with open_index(args.index) as idx:
        info = idx.info()
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            print(f"{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    return EXIT_OK


def _split(args) -> int:
    from ..engine.sharded import split_index

    with split_index(args.index, args.out, args.shards, progress=not args.quiet) as sharded:
        info = sharded.info()
    if args.json:
        print(json.dumps({"path": info["path"], "images": info["images"], "shards": info["shards"]}))
    else:
        print(f"{info['path']}: {info['images']} images in {len(info['shards'])} shards "
              f"({', '.join(str(s['images']) for s in info['shards'])})")
    return EXIT_OK


def _export_onnx(args) -> int:
    from ..extraction.onnx_export import AGREEMENT_NOTE_BELOW, check_int8_args, export_onnx

    check_int8_args(args.int8, args.calibrate, args.calibrate_images, args.int8_format)  # before any loading
    start = time.perf_counter()
    log = None if args.quiet or args.json else (lambda text: print(text, file=sys.stderr, flush=True))
    result = export_onnx(
        extractor_config_from_args(args), args.out, int8=args.int8, calibrate=args.calibrate,
        calibrate_images=args.calibrate_images, int8_format=args.int8_format, log=log,
    )
    result["seconds"] = round(time.perf_counter() - start, 3)
    q = result.get("int8")
    for item in (q["calibration"]["skipped"] if q else []):
        print(f"skipped {item['path']}: {item['reason']}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    elif q:
        cal, agr = q["calibration"], q["agreement"]
        print(
            f"wrote {result['path']}: int8 ({q['format']}, {q['bytes'] / 2**20:.1f} MB, float "
            f"{q['float_bytes'] / 2**20:.1f} MB), calibrated on {cal['windows']} windows of {cal['images']} "
            f"images; float export max relative error vs torch {result['max_rel_error']:.2e}\n"
            f"agreement with the float model on {agr['windows']} windows of {agr['images']} "
            f"{'held-out ' if agr['heldout'] else 'calibration (no image left to hold out) '}images "
            f"({agr['pool']}-pooled descriptors): mean cosine {agr['mean_cosine']:.4f}, "
            f"min {agr['min_cosine']:.4f}; int8 network {agr['speedup']:.2f}x the float model's speed here"
        )
        if agr["mean_cosine"] < AGREEMENT_NOTE_BELOW:
            # Window cosines of 0.97 can still rank as the float model does (pretrained
            # MobileNetV2: UKBench 3.963 against 3.965), but only a ranking test tells.
            print(
                "the int8 descriptors differ from the float ones more than usual (mean cosine under "
                f"{AGREEMENT_NOTE_BELOW}); "
                "they may still rank alike: index some of your images with each model (this one: "
                f"--onnx {result['path']} --onnx-output {result['output']} --input-spec {result['input_spec']}) "
                "and compare their hits before switching"
            )
    else:
        print(f"wrote {result['path']} (max relative error vs torch {result['max_rel_error']:.2e})")
    return EXIT_SKIPPED if q and q["calibration"]["skipped"] else EXIT_OK


def _layers(args) -> int:
    from ..config import ExtractorConfig, InputSpec
    from ..extraction.layers import list_layers

    config = ExtractorConfig(
        backbone=args.backbone or "resnet50", weights=args.weights,
        onnx=os.path.abspath(args.onnx) if args.onnx else None, input_spec=InputSpec.parse(args.input_spec),
    )
    layers = [lay for lay in list_layers(config) if lay.kind == "map" or not args.maps_only]
    model = config.onnx or config.backbone
    if args.json:
        print(json.dumps({"model": model, "layers": [lay.to_dict() for lay in layers]}))
        return EXIT_OK
    rows = [("depth", "name", "op", "shape", "dtype", "kind")] + [
        (f"{lay.depth:.2f}", lay.name, lay.op, "x".join(map(str, lay.shape)),
         lay.dtype + (" (dequantized at the cut)" if lay.quantized else ""), lay.kind)
        for lay in layers
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"{model}: {len(layers)} tensors")
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return EXIT_OK


def _serve(args) -> int:
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be from 0 to 65535 (got {args.port})")
    if args.max_upload_mb <= 0:
        raise ConfigError("--max-upload-mb must be > 0")
    if args.max_upload_mpx <= 0:
        raise ConfigError("--max-upload-mpx must be > 0")
    if args.max_batch < 1:
        raise ConfigError(f"--max-batch must be a whole number >= 1 (got {args.max_batch}); "
                          "1 answers queries one at a time")
    try:
        from ..serving.server import serve
    except ImportError as err:
        raise ConfigError(f"retrieval serve needs the web extras ({err.name} is missing); "
                          "install them with: pip install 'retrieval[serve]'")
    token = args.token if args.token is not None else os.environ.get("RETRIEVAL_TOKEN") or None
    if token is not None and not token.strip():
        raise ConfigError("--token must not be empty")
    serve(args.index, args.host, args.port, runtime=runtime_config_from_args(args),
          max_upload_bytes=int(args.max_upload_mb * 2**20), max_upload_pixels=int(args.max_upload_mpx * 1e6),
          allow_hosts=tuple(args.allow_host), max_batch=args.max_batch,
          token=token, quiet=args.quiet)
    return EXIT_OK


_COMMANDS = {
    "build": _build,
    "add": _add,
    "query": _query,
    "dba": _dba,
    "duplicates": _duplicates,
    "info": _info,
    "remove": _remove,
    "reindex": _reindex,
    "split": _split,
    "export-onnx": _export_onnx,
    "layers": _layers,
    "serve": _serve,
}

