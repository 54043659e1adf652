#!/usr/bin/env python
"""Retrieval benchmark: mAP (Holidays, Oxford5k, Paris6k, revisited) or N-S (UKBench).

One run (docs/cli.md section 18):

    python benchmarks/retrieval_map.py --dataset ukbench --root ../shared/data/ukbench \\
        --onnx ../shared/weights/mobilenetv2-12-int8.onnx --onnx-output 627 \\
        --levels 1,2,3,4 --query-levels 1,2,3 --aggregate min --pca-dim 256 \\
        --whiten-on ../shared/data/paris6k-mini/paris --json out.json

builds an index over the dataset's database images (Index.create + add), queries every
dataset query (cropped to its bounding box for Oxford/Paris), ranks the whole database
(k=None; for UKBench every image is still scored exactly, but only the top 4 that N-S
reads are returned, or the top `--json-top`), maps the hits back to dataset indices and scores them with the official metric
(`retrieval.evaluation.evaluate`). It prints a table and, with `--json OUT.json`, writes

    {"dataset", "metric": "mAP"|"ns", "value", "queries", "images", "config", "seconds",
     + "easy", "medium", "hard", "mp@k" for roxford5k/rparis6k (value = Medium mAP),
     + "timing": {...}, "skipped": [...], "per_query": [...]}

`--sweep` runs a grid (database/query levels x aggregate x PCA dimension x patch mode x
layer x pooling) and prints one table, a row per combination; `--json` then writes a
list of such objects, and `--plot OUT.png` draws the score against layer depth (one line
per pooling) and against the PCA dimension (one line per layer).
Raw descriptors go through the persistent feature store (`--store`), so re-runs and the
rows of a sweep extract each (image, extractor configuration, level) once; the
whitening and the FAISS index are recomputed for each combination.

Timing: "db s/img" and "q s/img" are seconds per image for describing a database image
(its database levels) and for answering one query (describing it at the query levels +
ranking the whole database). Because the store caches descriptors, the extraction part is
measured on a sample of `--timing-sample` images with a throw-away store (a fresh
extraction, never a cache hit); the ranking part is the measured search time of all the
queries divided by their number.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from retrieval.cli.args import (  # noqa: E402
    add_rerank_args,
    add_extractor_args,
    extractor_config_from_args,
    parse_levels,
    parse_rotations,
    runtime_config_from_args,
    search_config_from_args,
)
from retrieval.config import (  # noqa: E402
    AGGREGATES,
    AUTO_ROTATION,
    PATCH_MODES,
    POOLS,
    QE_ALPHA,
    RERANK_MARGIN,
    ConfigError,
    ExtractorConfig,
    RuntimeConfig,
    SearchConfig,
)
from retrieval.evaluation.datasets import DATASETS, Dataset, load_dataset  # noqa: E402
from retrieval.evaluation.evaluate import evaluate  # noqa: E402
from retrieval.evaluation.plots import check_plotting, plot_factors  # noqa: E402
from retrieval.extraction.layers import layer_depths  # noqa: E402

DEFAULT_STORE = ROOT / "benchmarks" / ".cache" / "features.sqlite"
DATABASE = "database"  # --whiten-on database: learn the whitening on the database itself


# ---------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="retrieval_map.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 1)[1] + _SWEEP_HELP,
    )
    p.add_argument("--dataset", required=True, choices=sorted(DATASETS), help="benchmark name (docs/cli.md section 18)")
    p.add_argument("--root", required=True, metavar="DIR", help="dataset root in its official layout")
    add_extractor_args(p)
    p.add_argument(
        "--whiten-on", metavar="DIR", nargs="+",
        help="learn the PCA-whitening on these images (folders/files/@list), not on the database: "
        "the fair protocol. 'database' (or omitting the flag) learns it on the database itself",
    )
    p.add_argument("--index-type", metavar="FACTORY", help="FAISS index-factory string (default exact)")
    p.add_argument("--exact-limit", type=int, metavar="N",
                   help="Index.search's exact_limit: below it every image is scored exactly (default the "
                   "library's); 0 with --index-type measures the candidate stage (for UKBench, whose k is 4)")
    p.add_argument("--layout-k", type=int, metavar="N", help="Index.search's layout_k (default the library's; 0 = off)")
    p.add_argument(
        "--store", metavar="FILE", default=None,
        help=f"persistent feature store shared by runs and sweep rows (default $RETRIEVAL_STORE, "
        f"else {DEFAULT_STORE.relative_to(ROOT)})",
    )
    p.add_argument(
        "--index-dir", metavar="DIR",
        help="where the indexes are built, one sub-folder per combination (default: a temporary "
        "folder removed at the end); an existing index with the same configuration is reused",
    )
    p.add_argument("--json", metavar="OUT.json", help="write the result (a list with --sweep) as JSON")
    p.add_argument(
        "--json-top", type=int, default=0, metavar="K",
        help="also put the top-K database paths of every query in the JSON ('rankings')",
    )
    p.add_argument(
        "--timing-sample", type=int, default=16, metavar="N",
        help="images extracted afresh (throw-away store) to time database and query extraction "
        "(default 16; 0 = do not time extraction)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_rerank_args(p)
    p.add_argument(
        "--rotate-queries", type=int, choices=(90, 180, 270), metavar="DEG",
        help="turn every query image by DEG degrees counter-clockwise before searching (lossless "
        "PNG copies, crop boxes turned with them; the database stays upright): a test of "
        "--query-rotations",
    )
    g = p.add_argument_group("sweep (a grid; one table row per combination)")
    g.add_argument("--sweep", action="store_true", help="run the grid given by the *-grid flags")
    g.add_argument(
        "--levels-grid", metavar="DB[/Q];...",
        help="';'-separated database level sets, each optionally '/QUERY-LEVELS', e.g. "
        "'1/1;1,2,3,4/1,2,3' (default: --levels[/--query-levels])",
    )
    g.add_argument(
        "--query-levels-grid", metavar="Q;...",
        help="';'-separated query level sets crossed with the --levels-grid entries that name "
        "no '/Q' of their own; '=' means 'same as the database levels', e.g. '1;1,2,3;='",
    )
    g.add_argument("--aggregate-grid", metavar="A,...", help="comma list of min,mean-min (default --aggregate)")
    g.add_argument("--pca-grid", metavar="N,...", help="comma list of PCA dimensions (default --pca-dim)")
    g.add_argument("--patch-mode-grid", metavar="M,...", help="comma list of crop,roi (default --patch-mode)")
    g.add_argument("--layer-grid", metavar="L,...",
                   help="comma list of torch layers (see `retrieval layers --backbone NAME`; default --layer)")
    g.add_argument("--onnx-output-grid", metavar="T,...",
                   help="comma list of ONNX tensors (see `retrieval layers --onnx FILE`; default --onnx-output)")
    g.add_argument("--pool-grid", metavar="P,...", help="comma list of avg,max,gem (default --pool)")
    g.add_argument("--plot", metavar="OUT.png",
                   help="with --sweep: plot the score against layer depth (per pooling) and PCA dimension (matplotlib)")
    g.add_argument("--qe-grid", metavar="K,...", help="comma list of --qe values (default --qe)")
    g.add_argument("--dba-grid", metavar="K,...", help="comma list of --dba values (default --dba)")
    g.add_argument("--rerank-grid", metavar="M,...",
                   help="comma list of adaptive re-ranking margins, 'off' for none (default --rerank/--rerank-margin)")
    g.add_argument(
        "--query-rotations-grid", metavar="R,...;...",
        help="';'-separated rotation lists, e.g. '0;0,90,180,270' (default --query-rotations)",
    )
    g.add_argument(
        "--whiten-on-grid", metavar="SRC;...",
        help="';'-separated whitening sources: a folder (or several, ','-separated) or 'database' "
        "(default --whiten-on)",
    )
    return p


_SWEEP_HELP = """
Sweep example (global vs spatial, crop vs roi, three PCA dimensions; 2*2*3*2 = 24 rows,
global rows have one query window so their aggregate column shows '-', leaving 18):

    python benchmarks/retrieval_map.py --dataset ukbench --root ../shared/data/ukbench \\
        --onnx ../shared/weights/mobilenetv2-12-int8.onnx --onnx-output 627 \\
        --whiten-on ../shared/data/paris6k-mini/paris --sweep \\
        --levels-grid "1/1;1,2,3,4/1,2,3" --aggregate-grid min,mean-min \\
        --pca-grid 128,256,512 --patch-mode-grid crop,roi --json sweep.json
"""


def _levels(text: str) -> tuple[int, ...]:
    try:
        return parse_levels(text)
    except argparse.ArgumentTypeError as err:
        raise ConfigError(str(err))


def _split(text: str | None, sep: str) -> list[str]:
    return [t.strip() for t in (text or "").split(sep) if t.strip()]


def _rerank_value(text: str) -> tuple[bool, float]:
    """A --rerank-grid entry: 'off' (no adaptive re-ranking) or a margin."""
    if text == "off":
        return False, RERANK_MARGIN
    try:
        return True, float(text)
    except ValueError:
        raise ConfigError(f"--rerank-grid takes 'off' or margins (got {text!r})") from None


def combinations(args: argparse.Namespace) -> list[dict]:
    """The rows to run: dicts with levels, query_levels, aggregate, pca_dim, patch_mode,
    whiten_on, qe, dba, query_rotations, layer (a --layer or --onnx-output name) and pool."""
    rotations = args.query_rotations if args.query_rotations in (None, AUTO_ROTATION) else tuple(args.query_rotations)
    layer = args.onnx_output if args.onnx else args.layer
    if not args.sweep:
        return [{
            "levels": tuple(args.levels),
            "query_levels": tuple(args.query_levels or args.levels),
            "aggregate": args.aggregate,
            "pca_dim": args.pca_dim,
            "patch_mode": args.patch_mode,
            "whiten_on": _whiten_sources(args.whiten_on),
            "qe": args.qe,
            "dba": args.dba,
            "rerank": args.rerank,
            "rerank_margin": args.rerank_margin,
            "query_rotations": rotations,
            "layer": layer,
            "pool": args.pool,
        }]
    if args.onnx_output_grid and not args.onnx:
        raise ConfigError("--onnx-output-grid needs --onnx FILE (use --layer-grid for a torch backbone)")
    if args.layer_grid and args.onnx:
        raise ConfigError("--layer-grid names torch layers; with --onnx use --onnx-output-grid")
    layers = _split(args.onnx_output_grid if args.onnx else args.layer_grid, ",") or [layer]
    pools = _split(args.pool_grid, ",") or [args.pool]
    for pool in pools:
        if pool not in POOLS:
            raise ConfigError(f"--pool-grid takes {', '.join(POOLS)} (got {pool!r})")
    pairs: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    qgrid = _split(args.query_levels_grid, ";")
    entries = _split(args.levels_grid, ";") or [
        ",".join(map(str, args.levels)) + ("/" + ",".join(map(str, args.query_levels)) if args.query_levels else "")
    ]
    for entry in entries:
        db_text, _, q_text = entry.partition("/")
        db = _levels(db_text)
        if q_text:
            pairs.append((db, _levels(q_text)))
        elif qgrid:
            pairs.extend((db, db if q == "=" else _levels(q)) for q in qgrid)
        else:
            pairs.append((db, db))
    aggregates = _split(args.aggregate_grid, ",") or [args.aggregate]
    for a in aggregates:
        if a not in AGGREGATES:
            raise ConfigError(f"--aggregate-grid takes {', '.join(AGGREGATES)} (got {a!r})")
    try:
        pcas = [int(v) for v in _split(args.pca_grid, ",")] or [args.pca_dim]
    except ValueError:
        raise ConfigError(f"--pca-grid is a comma list of integers (got {args.pca_grid!r})")
    modes = _split(args.patch_mode_grid, ",") or [args.patch_mode]
    for m in modes:
        if m not in PATCH_MODES:
            raise ConfigError(f"--patch-mode-grid takes {', '.join(PATCH_MODES)} (got {m!r})")
    whitens = (
        [_whiten_sources(_split(w, ",")) for w in _split(args.whiten_on_grid, ";")]
        if args.whiten_on_grid else [_whiten_sources(args.whiten_on)]
    )
    qes, dbas = _counts(args.qe_grid, "--qe-grid", args.qe), _counts(args.dba_grid, "--dba-grid", args.dba)
    try:
        rotation_sets = [parse_rotations(r) for r in _split(args.query_rotations_grid, ";")] or [rotations]
    except argparse.ArgumentTypeError as err:
        raise ConfigError(f"--query-rotations-grid: {err}")
    reranks = [_rerank_value(v) for v in _split(args.rerank_grid, ",")] or [
        (args.rerank, args.rerank_margin)]
    rows, seen = [], set()
    for layer, pool, mode, whiten, (db, q), pca, agg, dba, qe, rot, (rr, margin) in itertools.product(
            layers, pools, modes, whitens, pairs, pcas, aggregates, dbas, qes, rotation_sets, reranks):
        if q == (1,):
            agg = "min"  # one query window: min and mean-min are the same distance
        key = (layer, pool, mode, tuple(whiten or ()), db, q, pca, agg, dba, qe, rot, rr, margin)
        if key in seen:
            continue
        seen.add(key)
        rows.append({"levels": db, "query_levels": q, "aggregate": agg, "pca_dim": pca,
                     "patch_mode": mode, "whiten_on": whiten, "qe": qe, "dba": dba, "rerank": rr,
                     "rerank_margin": margin, "query_rotations": rot, "layer": layer, "pool": pool})
    return rows


def _counts(text: str | None, flag: str, default: int) -> list[int]:
    try:
        values = [int(v) for v in _split(text, ",")] or [default]
    except ValueError:
        values = [-1]
    if min(values) < 0:
        raise ConfigError(f"{flag} is a comma list of integers >= 0 (got {text!r})")
    return values


def _whiten_sources(values) -> list[str] | None:
    """None = the database itself; else absolute paths (so the index config is stable)."""
    if not values or list(values) == [DATABASE]:
        return None
    out = []
    for v in values:
        if v == DATABASE:
            raise ConfigError("--whiten-on database cannot be mixed with folders")
        if v.startswith("@"):
            out.append("@" + os.path.abspath(v[1:]))
        else:
            if not os.path.exists(v):
                raise ConfigError(f"--whiten-on {v}: no such file or folder")
            out.append(os.path.abspath(v))
    return out


# ----------------------------------------------------------------------------- running
def _queries(dataset: Dataset) -> list:
    """Index.search inputs: a path, or (path, bbox) for Oxford/Paris (cropped queries)."""
    return [q.path if q.bbox is None else (q.path, tuple(float(v) for v in q.bbox)) for q in dataset.queries]


def _lookup(pos_of: dict, path: str) -> int | None:
    i = pos_of.get(path)
    return i if i is not None else pos_of.get(os.path.realpath(path))


def rotated_queries(dataset: Dataset, degrees: int, folder: Path) -> list:
    """`_queries` with every query image turned by `degrees` counter-clockwise: lossless PNG
    copies in `folder` (kept, so re-runs find the same content in the feature store), and
    crop boxes turned with their image."""
    from retrieval.extraction.inputs import TRANSPOSE
    from retrieval.extraction.images import load_rgb
    from retrieval.extraction.patches import unrotate_boxes

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for q in dataset.queries:
        target = folder / (hashlib.sha256(os.path.realpath(q.path).encode()).hexdigest()[:16] + ".png")
        img = load_rgb(q.path)
        if not target.exists():
            tmp = target.with_suffix(".tmp.png")
            img.transpose(TRANSPOSE[degrees]).save(tmp)
            os.replace(tmp, target)
        if q.bbox is None:
            out.append(str(target))
        else:
            # The upright image is the turned one turned back by 360 - degrees.
            box = unrotate_boxes(np.array([q.bbox], np.float64), 360 - degrees, img.width, img.height)[0]
            out.append((str(target), tuple(float(v) for v in box)))
    return out


def run_search(index, dataset: Dataset, query_levels, aggregate, progress: bool, top_k: int = 0,
               items: list | None = None, **rerank):
    """Rank the whole database for every query; returns (rankings, skipped, seconds, hits).

    `items` replaces the dataset's queries (same order), e.g. `rotated_queries`; `rerank`
    goes to Index.search (qe, qe_alpha, dba, query_rotations)."""
    items = items or _queries(dataset)
    pos_of = {os.path.realpath(p): i for i, p in enumerate(dataset.images)}
    pos_of.update({os.path.abspath(p): i for i, p in enumerate(dataset.images)})
    # Every database image is scored exactly (the index has fewer images than the ANN
    # threshold); k only limits how many hits are returned. N-S looks at the top 4 only,
    # so UKBench asks for 4 (building a million Hit objects per sweep row costs minutes).
    k = max(4, top_k) if dataset.metric == "ns" else None
    skipped: list[dict] = []
    start = time.perf_counter()
    # One result per item, in order (a repeated item is described and ranked once).
    results = index.search(items, k=k, query_levels=query_levels, aggregate=aggregate,
                           progress=progress, skipped=skipped, **rerank)
    seconds = time.perf_counter() - start
    rankings, tops = [], []
    for res in results:
        if res.error is not None:  # unreadable query: nothing retrieved (AP 0 / N-S 0)
            rankings.append(np.empty(0, np.int64))
            tops.append([])
            continue
        ranking = [_lookup(pos_of, h.path) for h in res.hits]
        ranking = [i for i in ranking if i is not None]
        rankings.append(np.asarray(ranking, dtype=np.int64))
        tops.append(res.hits)
    return rankings, skipped, seconds, tops


def time_extraction(config: ExtractorConfig, runtime: RuntimeConfig, items: list, levels, sample: int) -> float | None:
    """Seconds per image to describe `sample` of `items` at `levels`, with a throw-away store."""
    from retrieval.extraction.extractor import Extractor
    from retrieval.extraction.features import describe
    from retrieval.extraction.patches import level_names
    from retrieval.extraction.store import FeatureStore

    if sample <= 0 or not items:
        return None
    step = max(1, len(items) // sample)
    chosen = items[::step][:sample]
    extractor = Extractor(config, runtime)
    _ = extractor.backbone  # load the network outside the timed part
    with tempfile.TemporaryDirectory(prefix="retrieval-timing-") as tmp:
        store = FeatureStore.open(Path(tmp) / "t.sqlite")
        try:
            # warm-up image (first-batch allocations, thread pools)
            list(describe(chosen[:1], extractor, store, level_names(levels), progress=False))
            store.close()
            store = FeatureStore.open(Path(tmp) / "t2.sqlite")
            start = time.perf_counter()
            n = sum(1 for f in describe(chosen, extractor, store, level_names(levels), progress=False)
                    if not hasattr(f, "reason"))
            seconds = time.perf_counter() - start
        finally:
            store.close()
    return seconds / max(n, 1)


def _index_dir(base: Path, dataset: Dataset, ext: ExtractorConfig, search: SearchConfig,
               whiten_on, index_type, store: str) -> Path:
    ident = json.dumps([dataset.name, dataset.root, ext.key(), list(search.levels), search.pca_dim,
                        whiten_on, index_type, store], sort_keys=True)
    tag = hashlib.sha256(ident.encode()).hexdigest()[:12]
    levels = "".join(map(str, search.levels))
    return base / f"{dataset.name}-{ext.patch_mode}-L{levels}-pca{search.pca_dim}-{tag}"


def run_rows(args, dataset: Dataset, rows: list[dict], store: str, index_base: Path) -> list[dict]:
    from retrieval.engine.index import Index

    base_ext = extractor_config_from_args(args)
    runtime = runtime_config_from_args(args)
    progress = not args.quiet
    timing_cache: dict = {}
    results = []
    # one index per (patch mode, whitening source, db levels, pca): aggregate and query
    # levels are search-time settings, so rows that share an index are run on it together
    groups: dict = {}
    for row in rows:
        key = (row["layer"], row["pool"], row["patch_mode"], tuple(row["whiten_on"] or ()), row["levels"], row["pca_dim"])
        groups.setdefault(key, []).append(row)
    layer_field = "onnx_output" if base_ext.onnx else "layer"
    for (layer, pool, mode, _, levels, pca), group in groups.items():
        ext = dataclasses.replace(base_ext, patch_mode=mode, pool=pool, **{layer_field: layer})
        whiten_on = group[0]["whiten_on"]
        search = SearchConfig(levels=levels, query_levels=group[0]["query_levels"], pca_dim=pca,
                              aggregate=group[0]["aggregate"])
        idx_dir = _index_dir(index_base, dataset, ext, search, whiten_on, args.index_type, store)
        t0 = time.perf_counter()
        index = Index.create(idx_dir, ext, search, index_type=args.index_type, store=store,
                             whiten_on=whiten_on, runtime=runtime)
        with index:
            report = index.add(dataset.images, progress=progress)
            build_seconds = time.perf_counter() - t0
            whitening = index.whitening
            pca_used = whitening.output_dim if whitening is not None else None
            dba_k = max(row["dba"] for row in group)
            dba_seconds = None
            # The writer keeps the lists (10 per image); a larger --dba needs them recomputed.
            if dba_k > (index.info()["neighbours"] or {}).get("k", 0):
                t2 = time.perf_counter()
                index.build_neighbours(dba_k, progress=progress)
                dba_seconds = time.perf_counter() - t2
            items = (rotated_queries(dataset, args.rotate_queries, index_base / f"queries-rot{args.rotate_queries}")
                     if args.rotate_queries else None)
            for row in group:
                t1 = time.perf_counter()
                rankings, skipped, search_seconds, tops = run_search(
                    index, dataset, row["query_levels"], row["aggregate"], progress, args.json_top, items,
                    qe=row["qe"], qe_alpha=args.qe_alpha, dba=row["dba"], query_rotations=row["query_rotations"],
                    rerank=row["rerank"], rerank_margin=row["rerank_margin"],
                    **({"exact_limit": args.exact_limit} if args.exact_limit is not None else {}),
                    layout_k=args.layout_k)
                scores = evaluate(dataset, rankings)
                eval_seconds = time.perf_counter() - t1
                tkey_db = (ext.key(), levels)
                if tkey_db not in timing_cache:
                    timing_cache[tkey_db] = time_extraction(ext, runtime, list(dataset.images), levels, args.timing_sample)
                tkey_q = (ext.key(), row["query_levels"], "q")
                if tkey_q not in timing_cache:
                    timing_cache[tkey_q] = time_extraction(ext, runtime, _queries(dataset), row["query_levels"], args.timing_sample)
                db_ext, q_ext = timing_cache[tkey_db], timing_cache[tkey_q]
                nq = max(len(dataset.queries), 1)
                rank_per_q = search_seconds / nq
                config = {
                    "extractor": ext.to_dict(),
                    "levels": list(levels),
                    "query_levels": list(row["query_levels"]),
                    "aggregate": row["aggregate"],
                    "pca_dim": pca,
                    "pca_dim_used": pca_used,
                    "whiten_on": whiten_on or DATABASE,
                    "index_type": args.index_type,
                    "exact_limit": args.exact_limit,
                    "layout_k": args.layout_k,
                    "store": store,
                    "qe": row["qe"],
                    "qe_alpha": args.qe_alpha,
                    "dba": row["dba"],
                    # As searched: the index decides where the command line leaves it (None).
                    "rerank": row["rerank"] if row["rerank"] is not None else bool(
                        not row["qe"] and not row["dba"] and index.info()["reranking"]["by_default"]),
                    "rerank_by_default": row["rerank"] is None,
                    "rerank_margin": row["rerank_margin"],
                    "query_rotations": (row["query_rotations"] if row["query_rotations"] == AUTO_ROTATION
                                        else list(row["query_rotations"] or [0])),
                    "rotate_queries": args.rotate_queries or 0,
                }
                result = {
                    "dataset": dataset.name,
                    "metric": scores["metric"],
                    "value": float(scores["value"]),
                    "queries": scores["queries"],
                    "images": scores["images"],
                    "config": config,
                    "seconds": round(build_seconds / len(group) + eval_seconds, 3),
                }
                for key in ("easy", "medium", "hard", "mp@k", "kappas", "skipped"):
                    if key in scores:
                        result[key if key != "skipped" else "skipped_protocol"] = scores[key]
                result["timing"] = {
                    "db_extract_s_per_image": _r(db_ext),
                    "query_extract_s_per_image": _r(q_ext),
                    "query_rank_s_per_query": _r(rank_per_q),
                    "query_s_per_image": _r((q_ext or 0.0) + rank_per_q),
                    "timing_sample": args.timing_sample,
                    "build_seconds": round(build_seconds, 3),
                    "build_extracted_images": report.added,
                    "search_seconds": round(search_seconds, 3),
                    "dba_neighbours_seconds": _r(dba_seconds),
                }
                result["skipped"] = report.skipped + skipped
                result["missing_queries"] = dataset.missing_queries
                result["dropped_positives"] = dataset.dropped_positives
                result["per_query"] = scores["per_query"]
                result["command"] = command_line(args, row)
                if args.json_top > 0:
                    result["rankings"] = [
                        {"query": q.name, "path": q.path, "top": [h.path for h in hits[: args.json_top]]}
                        for q, hits in zip(dataset.queries, tops)
                    ]
                results.append(result)
                if progress:
                    print(format_row(result), file=sys.stderr, flush=True)
    return results


def _r(v: float | None) -> float | None:
    return None if v is None else round(float(v), 4)


# ----------------------------------------------------------------------------- output
def command_line(args, row: dict) -> str:
    """The single-run command that reproduces one row."""
    parts = ["python", "benchmarks/retrieval_map.py", "--dataset", args.dataset, "--root", args.root]
    if args.onnx:
        parts += ["--onnx", args.onnx]
        if row["layer"]:
            parts += ["--onnx-output", row["layer"]]
        if args.input_spec:
            parts += ["--input-spec", args.input_spec]
    else:
        parts += ["--backbone", args.backbone, "--weights", args.weights]
        if row["layer"]:
            parts += ["--layer", row["layer"]]
        if args.input_spec:
            parts += ["--input-spec", args.input_spec]
        if args.precision != "fp32":
            parts += ["--precision", args.precision]
    if row["pool"] != "avg":
        parts += ["--pool", row["pool"]]
    parts += ["--patch-mode", row["patch_mode"], "--levels", ",".join(map(str, row["levels"])),
              "--query-levels", ",".join(map(str, row["query_levels"])),
              "--aggregate", row["aggregate"], "--pca-dim", str(row["pca_dim"])]
    if args.roi_size and row["patch_mode"] in ("roi", "pyramid"):
        parts += ["--roi-size", str(args.roi_size)]
    if row["whiten_on"]:
        parts += ["--whiten-on", *[os.path.relpath(w) if not w.startswith("@") else w for w in row["whiten_on"]]]
    if args.index_type:
        parts += ["--index-type", args.index_type]
    for flag, value in (("--exact-limit", args.exact_limit), ("--layout-k", args.layout_k)):
        if value is not None:
            parts += [flag, str(value)]
    if row["qe"]:
        parts += ["--qe", str(row["qe"])]
    if (row["qe"] or row["dba"]) and args.qe_alpha != QE_ALPHA:
        parts += ["--qe-alpha", f"{args.qe_alpha:g}"]
    if row["dba"]:
        parts += ["--dba", str(row["dba"])]
    if row["query_rotations"]:
        rot = row["query_rotations"]
        parts += ["--query-rotations", rot if rot == AUTO_ROTATION else ",".join(map(str, rot))]
    if row["rerank"] is not None:  # None: the default, which the index decides
        parts += ["--rerank", "--rerank-margin", f"{row['rerank_margin']:g}"] if row["rerank"] else ["--no-rerank"]
    if args.rotate_queries:
        parts += ["--rotate-queries", str(args.rotate_queries)]
    return " ".join(_quote(p) for p in parts)


def _quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


HEADER = ("dataset", "layer", "pool", "mode", "db lv", "q lv", "agg", "pca", "whiten", "re-rank", "score", "E/M/H mAP",
          "db s/img", "q s/img", "rank s/q", "s")


def format_row(r: dict) -> str:
    c = r["config"]
    score = f"N-S {r['value']:.3f}" if r["metric"] == "ns" else f"mAP {100 * r['value']:.2f}"
    emh = (f"{100 * r['easy']:.1f}/{100 * r['medium']:.1f}/{100 * r['hard']:.1f}" if "easy" in r else "")
    pca = str(c["pca_dim"]) + (f"({c['pca_dim_used']})" if c["pca_dim_used"] not in (None, c["pca_dim"]) and c["pca_dim"] else "")
    whiten = c["whiten_on"] if c["whiten_on"] == DATABASE else ",".join(_short(w) for w in c["whiten_on"])
    agg = "-" if tuple(c["query_levels"]) == (1,) else c["aggregate"]
    t = r["timing"]
    mode = c["extractor"]["patch_mode"]
    if mode in ("roi", "pyramid") and c["extractor"].get("roi_size"):
        mode = f"{mode}@{c['extractor']['roi_size']}"
    cells = (r["dataset"], _layer_of(c["extractor"]) or "default", c["extractor"]["pool"], mode,
             ",".join(map(str, c["levels"])), ",".join(map(str, c["query_levels"])), agg, pca, whiten,
             _rerank_cell(c), score, emh,
             _fmt(t["db_extract_s_per_image"]), _fmt(t["query_s_per_image"]),
             _fmt(t["query_rank_s_per_query"]), f"{r['seconds']:.1f}")
    return " | ".join(cells)


def _rerank_cell(c: dict) -> str:
    """e.g. 'qe2 dba5 rot0/90 (q@90)': the query-time options of a row, '-' for none;
    '(default)' where the index chose whether to re-rank."""
    parts = [f"{name}{c[name]}" for name in ("qe", "dba") if c.get(name)]
    if c.get("rerank"):
        parts.append(f"adaptive{c['rerank_margin']:g}")
    if c.get("rerank_by_default"):
        parts.append("(default)")
    if c.get("query_rotations", [0]) == AUTO_ROTATION:
        parts.append("rot-auto")
    elif c.get("query_rotations", [0]) != [0]:
        parts.append("rot" + "/".join(map(str, c["query_rotations"])))
    if c.get("rotate_queries"):
        parts.append(f"(q@{c['rotate_queries']})")
    return " ".join(parts) or "-"


def _layer_of(extractor: dict) -> str | None:
    """The --onnx-output or --layer of a row's extractor configuration (None: the default)."""
    return extractor["onnx_output" if extractor["onnx"] else "layer"]


def _short(path: str) -> str:
    p = Path(path)
    return "/".join(p.parts[-2:]) if len(p.parts) >= 2 else str(p)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def print_table(results: list[dict]) -> None:
    rows = [HEADER] + [tuple(format_row(r).split(" | ")) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print("\n".join(lines))
    if results:
        r = results[0]
        print(f"{r['queries']} queries, {r['images']} database images"
              + (f"; {r['missing_queries']} ground-truth queries absent from disk" if r.get("missing_queries") else "")
              + (f"; {len(r['skipped'])} inputs skipped" if r["skipped"] else ""))


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        cpu = next((l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name")), cpu)
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        search_config_from_args(args)  # validates --levels/--pca-dim/--aggregate
        extractor_config_from_args(args)
        rows = combinations(args)
        if args.plot:
            if not args.sweep:
                raise ConfigError("--plot draws a sweep: add --sweep")
            check_plotting(args.plot)
            depths = layer_depths(extractor_config_from_args(args), list(dict.fromkeys(
                r["layer"] for r in rows if r["layer"])))
        dataset = load_dataset(args.dataset, args.root)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"retrieval_map.py: error: {err}", file=sys.stderr)
        return 2
    if not dataset.queries:
        print(f"retrieval_map.py: error: no query of {args.dataset} is present under {args.root}", file=sys.stderr)
        return 2
    store = str(Path(args.store or os.environ.get("RETRIEVAL_STORE") or DEFAULT_STORE).resolve())
    Path(store).parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    if args.index_dir:
        index_base = Path(args.index_dir)
        index_base.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="retrieval-map-")
        index_base = Path(tmp.name)
    try:
        results = run_rows(args, dataset, rows, store, index_base)
    except ConfigError as err:
        print(f"retrieval_map.py: error: {err}", file=sys.stderr)
        return 2
    finally:
        if tmp is not None:
            tmp.cleanup()
    info = machine()
    for r in results:
        r["machine"] = info
    print_table(results)
    print(f"total {time.perf_counter() - start:.1f} s on {info['cpu']} ({info['cores']} cores)")
    if args.plot:
        plot_factors(
            [{"layer": _layer_of(r["config"]["extractor"]), "depth": depths.get(_layer_of(r["config"]["extractor"])),
              "pool": r["config"]["extractor"]["pool"], "pca_dim": r["config"]["pca_dim"], "value": r["value"]}
             for r in results],
            args.plot, score="value", score_label="N-S" if results[0]["metric"] == "ns" else "mAP",
            title=f"{args.dataset}: {Path(args.onnx).name if args.onnx else args.backbone}",
        )
    if args.json:
        payload = results if args.sweep else results[0]
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
