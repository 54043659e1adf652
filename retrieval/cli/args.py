"""The argparse side of the configuration: the flags `retrieval`, `classify` and the
benchmarks share, their argument types, and the configuration values built from them."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..config import (
    AGGREGATES, DEVICES, LEVELS, PATCH_MODES, POOLS, PRECISIONS, QE_ALPHA, RERANK_AUTO_LIMIT, RERANK_DBA,
    RERANK_MARGIN, ConfigError, ExtractorConfig, InputSpec, RuntimeConfig, SearchConfig, SearchOptionError,
    SearchOptions, levels_from_text, rotations_from_text,
)


def parse_levels(text: str) -> tuple[int, ...]:
    """argparse type: `1,2,3` -> (1, 2, 3)."""
    try:
        return levels_from_text(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_rotations(text: str) -> tuple[int, ...]:
    """argparse type: `0,90` -> (0, 90), `auto` -> "auto"."""
    try:
        return rotations_from_text(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_runtime_args(parser) -> None:
    """The throughput flags (`--device`, `--batch-size`, `--workers`) on a parser or group."""
    parser.add_argument("--device", default="auto", choices=DEVICES, help="auto = cuda when available")
    parser.add_argument("--batch-size", type=int, default=32, help="windows per network batch (default 32)")
    parser.add_argument("--workers", type=int, default=2, help="image decoding threads (default 2; 0 decodes in the network's thread, between batches)")


def add_ray_arg(parser) -> None:
    """`--ray [local|auto|ADDRESS]`: extract on a Ray cluster (build, add, classify)."""
    parser.add_argument(
        "--ray", nargs="?", const="local", metavar="local|auto|ADDRESS",
        help="describe the images on a Ray cluster (needs `pip install 'retrieval[ray]'`): 'local' "
        "(the default when the flag has no value) starts one on this machine, 'auto' joins the one "
        "`ray start` made here, HOST:PORT joins that head node; the inputs must be readable on every node",
    )


def add_extractor_args(parser: argparse.ArgumentParser, *, search: bool = True) -> None:
    """Add the extractor flags of docs/cli.md section 2 to a parser (retrieval, classify, benchmarks)."""
    g = parser.add_argument_group("extractor")
    g.add_argument("--backbone", default="resnet50", help="torchvision architecture (default resnet50)")
    g.add_argument(
        "--weights",
        default="DEFAULT",
        help="torchvision weights name (DEFAULT, IMAGENET1K_V2, ...), a checkpoint file, or 'none' for random init",
    )
    g.add_argument("--onnx", metavar="FILE", help="use this ONNX model instead of a torch backbone")
    g.add_argument("--onnx-output", metavar="NAME", help="ONNX tensor to read (the graph is cut there)")
    g.add_argument(
        "--input-spec",
        metavar="K=V,...",
        help="input preprocessing of an ONNX model, a torch checkpoint or random init (a torchvision weights name "
        "brings its own; only size applies): size, order=rgb|bgr, scale=1|255, mean, std, dtype=float32|float16",
    )
    g.add_argument("--layer", help="torch layer: a torchvision feature_extraction node name, or 'penultimate'")
    g.add_argument("--pool", default="avg", choices=POOLS, help="pooling of conv maps (default avg)")
    g.add_argument(
        "--patch-mode",
        default="crop",
        choices=PATCH_MODES,
        help="crop: run every window through the network (the papers); roi: one pass, windows "
        "pooled from the map; pyramid: two passes, the whole image squashed to the network's "
        "size (level 1) and to a larger square (--roi-size; default 448 px for a 224 network); "
        "levels 2-4 are pooled from both maps and averaged, weighted by the maps' cells "
        "(needs a model that takes any input size)",
    )
    g.add_argument(
        "--roi-size",
        type=int,
        metavar="N",
        help="roi mode: feed the whole image with its long side at N pixels, aspect kept "
        "(default: the network's input size); pyramid mode: the side of the larger square "
        "input (default twice the network's size); needs a model that takes any input size",
    )
    g.add_argument(
        "--precision",
        default="fp32",
        choices=PRECISIONS,
        help="arithmetic of a torch backbone's network: fp32 (default) or bf16 (autocast; about 2x "
        "faster on a CPU with native bf16, AVX512_BF16 or AMX, and on recent GPUs; descriptors within "
        "cosine 0.9999 of fp32's and stored apart from them; much slower on other CPUs)",
    )
    if search:
        g.add_argument("--levels", type=parse_levels, default=LEVELS, help="sub-patch levels of database images (default 1,2,3,4)")
        g.add_argument("--query-levels", type=parse_levels, default=None, help="sub-patch levels of queries (default: --levels)")
        g.add_argument("--pca-dim", type=int, default=256, help="PCA-whitening dimension (default 256; 0 = off)")
        g.add_argument(
            "--aggregate",
            default="mean-min",
            choices=AGGREGATES,
            help="image distance: mean over query windows of the min over database windows "
            "(mean-min, default), or the min over all window pairs (min)",
        )
    add_runtime_args(g)


def extractor_config_from_args(args: argparse.Namespace) -> ExtractorConfig:
    return ExtractorConfig(
        backbone=args.backbone,
        weights=args.weights,
        onnx=str(Path(args.onnx).resolve()) if args.onnx else None,
        onnx_output=args.onnx_output,
        input_spec=InputSpec.parse(args.input_spec),
        layer=args.layer,
        pool=args.pool,
        patch_mode=args.patch_mode,
        roi_size=args.roi_size,
        precision=args.precision,
    )


def search_config_from_args(args: argparse.Namespace) -> SearchConfig:
    return SearchConfig(
        levels=args.levels,
        query_levels=args.query_levels,
        pca_dim=args.pca_dim,
        aggregate=args.aggregate,
    )


def runtime_config_from_args(args: argparse.Namespace) -> RuntimeConfig:
    runtime = RuntimeConfig(device=args.device, batch_size=args.batch_size, workers=args.workers,
                            ray=getattr(args, "ray", None))
    if runtime.ray:
        from ..cluster import require_ray

        require_ray()  # before anything is written: a missing extra is a usage error
    return runtime


# The query flag of each SearchOptions field (the rest are --field-name).
_OPTION_FLAGS = {"k": "-k"}


def search_options_from_args(args: argparse.Namespace) -> SearchOptions:
    """The SearchOptions of `retrieval query` (ConfigError naming the flag of a bad value:
    the verdict of SearchOptions, worded with the flag)."""
    try:
        return SearchOptions(
            k=args.k, query_levels=args.query_levels, aggregate=args.aggregate, exact_limit=args.exact_limit,
            nprobe=args.nprobe, per_patch=args.per_patch, layout_k=args.layout_k,
            shortlist=args.shortlist,
            qe=args.qe, qe_alpha=args.qe_alpha, dba=args.dba, query_rotations=args.query_rotations,
            rerank=args.rerank, rerank_margin=args.rerank_margin,
        )
    except SearchOptionError as err:
        flag = _OPTION_FLAGS.get(err.field, "--" + err.field.replace("_", "-"))
        raise ConfigError(f"{flag} must be {err.allowed} (got {err.value!r})") from None


def add_rerank_args(p: argparse.ArgumentParser) -> None:
    """The re-ranking and rotation flags of `retrieval query` and benchmarks/retrieval_map.py."""
    g = p.add_argument_group("re-ranking (docs/reranking.md)")
    # None leaves it to the index (SearchOptions.with_default_rerank).
    g.add_argument("--rerank", action=argparse.BooleanOptionalAction, default=None,
                   help="re-ranking with the neighbours, for what --qe/--dba give no count: query expansion by "
                   f"the hits within --rerank-margin of the nearest, and augmentation by each image's {RERANK_DBA} "
                   "nearest kept neighbours; --no-rerank gives the plain ranking (default: on for a PCA-whitened "
                   f"index of at most {RERANK_AUTO_LIMIT} images with neighbour lists, which the writer keeps at "
                   "that size, unless --qe/--dba give a count; off above, where it costs several times a plain "
                   "query; `retrieval info` says which)")
    g.add_argument("--rerank-margin", type=float, default=RERANK_MARGIN, metavar="M",
                   help="re-ranking: the hits within this distance of the nearest expand the query "
                   f"(default {RERANK_MARGIN:g})")
    g.add_argument("--qe", type=_non_negative, default=0, metavar="K",
                   help="query expansion: also score the windows of the K best images as queries and "
                   "average the distances with alpha-QE weights (default 0 = off)")
    g.add_argument("--qe-alpha", type=float, default=QE_ALPHA, metavar="A",
                   help=f"alpha-QE exponent: a hit at distance d weighs (1 - d^2/2)^A (default {QE_ALPHA:g})")
    g.add_argument("--dba", type=_non_negative, default=0, metavar="K",
                   help="database-side augmentation: average each image's distance with its K nearest "
                   "neighbours' (kept current by add/remove; default 0 = off)")
    g.add_argument("--query-rotations", type=parse_rotations, default=None, metavar="R,...|auto",
                   help="describe the query turned by each of these angles (degrees counter-clockwise, "
                   "from 0,90,180,270) and keep each image's smallest distance; hits say which rotation "
                   "decided. 'auto': try the four turns on the query's level-1 window only, then "
                   "describe and search at the turn nearest to the index (default: the query as it is)")


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0 (got {text!r})")
    return value
