"""Extractor configuration: what identifies a descriptor, and the shared CLI flags.

Two kinds of settings live here. `ExtractorConfig` holds everything that changes the
raw descriptor of a window (network, weights, layer, pooling, patch mode, input
preprocessing); its `key()` names the descriptors in the feature store, so two runs with
the same key share extractions. `SearchConfig` holds what is applied after the store
(levels, PCA dimension, aggregate) and the throughput knobs, none of which invalidate
stored descriptors.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

POOLS = ("avg", "max", "gem")
PATCH_MODES = ("crop", "roi", "pyramid")
# Arithmetic of a torch backbone's forward pass: bf16 autocast is 2.2x fp32 on a CPU with
# native bf16 (AVX512_BF16 / AMX), at cosine 0.99999 to fp32's descriptors
# (benchmarks/results/describe.md, "bf16").
PRECISIONS = ("fp32", "bf16")
# pyramid mode: the whole image is fed twice, resized (squashed, as crop squashes each
# window) to the network's input size and to a larger square; windows covering at least
# PYRAMID_WHOLE of the image side (level 1) are pooled from the first, all others from both
# and the two poolings averaged (PYRAMID_AVERAGES). The larger side is --roi-size when
# given, else PYRAMID_RATIO times the network's (448 px for a 224 network: the most
# accurate of 384, 448 and 560 on UKBench and Paris, benchmarks/results/describe.md).
PYRAMID_RATIO = 2.0
PYRAMID_WHOLE = 0.9
# How a pyramid window's two poolings are averaged: "cells", each map weighing by its
# number of cells (since 2026-12-05: SqueezeNet's UKBench loss against crop 0.029 -> 0.006,
# benchmarks/results/describe.md), or "mean", the plain mean that indexes built before
# keep, since their stored descriptors are that.
PYRAMID_AVERAGES = ("cells", "mean")
MAP_SIZE_MODES = ("roi", "pyramid")  # the modes that --roi-size applies to
AGGREGATES = ("min", "mean-min")
# mean-min: measured best on UKBench and Paris (benchmarks/results/accuracy.md); plain min lets
# one lucky window pair decide, which ranked below the global descriptor on UKBench.
DEFAULT_AGGREGATE = "mean-min"
DEVICES = ("auto", "cpu", "cuda")
LEVELS = (1, 2, 3, 4)
ROTATIONS = (0, 90, 180, 270)  # query rotations, degrees counter-clockwise (lossless turns)
# query_rotations="auto": pick the one turn from the level-1 window alone (docs/reranking.md)
AUTO_ROTATION = "auto"
# Up to this many images a query scores every image with the kernel (exact, and measured
# faster than FAISS candidates: benchmarks/results/scale.md); above, candidates.
EXACT_LIMIT = 2_000
# Most queries a SearchBatcher (and so `retrieval serve --max-batch`) answers in one search;
# here rather than in engine/batcher.py so that the CLI's --help needs no engine import.
MAX_BATCH = 32
# Re-ranking (`rerank`) expands the query with the hits within RERANK_MARGIN of the nearest
# and averages each image with its RERANK_DBA nearest kept neighbours: leave-one-set-out over
# UKBench, paris6k-mini and two generated sets of edited copies, among {0, 5} fixed counts
# crossed with margins 0.05-0.3, chose this in every fold, each left-out set at or above
# the best fixed setting (benchmarks/results/reranking.md, "On by default").
RERANK_MARGIN = 0.3
RERANK_DBA = 5
# Re-ranking is on by default (`SearchOptions.rerank` None) for a whitened collection
# of at most this many images whose neighbour lists are stored: the writer keeps the lists up to
# EXACT_LIMIT on its own, a query there costs milliseconds more (benchmarks/results/reranking.md,
# "On by default"), and every evaluation set is that size. Above, candidates make a
# re-ranked query several times slower (13.7 against 112 ms at 1,000,000 images), so it is
# asked for with `rerank=True` / --rerank.
RERANK_AUTO_LIMIT = EXACT_LIMIT
NEIGHBOURS_K = 10  # each image's nearest images kept by the writer, for re-ranking (`retrieval dba -k` changes it)
QE_ALPHA = 3.0  # the exponent of alpha-QE (Radenovic et al.): near hits weigh much more than far ones
# IVF lists per query window: NPROBE while NPROBE lists hold at most NPROBE_WINDOWS
# windows; above, enough lists for NPROBE_WINDOWS, at least NPROBE_MIN and one list in
# NPROBE_MIN_SHARE (more lists cut the space finer, so a query window's neighbours spread
# over more of them). With the automatic structure's 2 x sqrt(windows) lists that is 32
# lists (6 % of clothing-small's 512, whose recall@10 against exact scoring was 0.9950
# through the window index alone, against 0.9918 for 16 of the earlier 128 lists) up to
# about 150,000 images, then fewer, 16 at 1,000,000 images (lists of 3,700 windows;
# recall@10 0.987 as with 8 of the earlier 15,000-window lists): half the codes of the
# earlier structure at every size (benchmarks/results/concurrency.md, "More lists, found
# by a graph"). An index built with the earlier structure keeps its 8 probes at 1,000,000
# images (2,048 lists).
NPROBE = 32
NPROBE_MIN = 8
NPROBE_MIN_SHARE = 512
NPROBE_WINDOWS = 50_000
LAYOUT_K = 128  # candidates from the layout index (benchmarks/results/scale.md)
# Default per_patch is max(4k, PER_PATCH_MIN): 40 at k = 10, where 64 had the kernel score
# 1.5x the pool (2,017 against 1,310 images at 100,000 hard images, recall@10 1.0 both)
# for recall@10 0.995 against 0.987 on UKBench; 32 is the smallest depth keeping both
# >= 0.98 (benchmarks/results/concurrency.md, "Smaller pools").
PER_PATCH_MIN = 32
# Of the images the window index nominates, the kernel scores the max(SHORTLIST_PER_K * k,
# SHORTLIST_MIN) whose FAISS evidence is nearest (`engine/search.py`, `shortlist`); the
# layout index's images are scored whatever their evidence. Chosen where recall@10 held
# on UKBench and the hard sets (benchmarks/results/concurrency.md, "The shortlist").
SHORTLIST_PER_K = 20
SHORTLIST_MIN = 200


class ConfigError(ValueError):
    """A setting is malformed or inconsistent; the message says what is allowed."""


def _spec_number(key: str, text: str, kind: type, form: str) -> Any:
    """One number of an `--input-spec` value; a malformed one is a usage error naming the form."""
    try:
        value = kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ConfigError(f"--input-spec {key}: {text!r} is not {what}; expected {form}") from None
    # float() accepts "nan" and "inf", which would silently poison every descriptor.
    if not math.isfinite(value):
        raise ConfigError(f"--input-spec {key}: {text!r} is not finite; expected {form}")
    return value


@dataclass(frozen=True)
class InputSpec:
    """How an RGB image becomes the network's input tensor.

    `size` is (height, width); None means "whatever the model declares" (ONNX) or 224.
    Pixels are first scaled to [0, 1] (scale=1) or [0, 255] (scale=255), then
    `(x - mean) / std` per channel, in `order` channel order, cast to `dtype`.
    """

    size: tuple[int, int] | None = None
    order: str = "rgb"
    scale: float = 1.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    dtype: str = "float32"

    @classmethod
    def parse(cls, text: str | None) -> "InputSpec":
        """Parse `K=V,...` (keys size, order, scale, mean, std, dtype).

        `mean`/`std` take three values separated by `/` or `:` or given as
        `mean=104,117,123` (bare numbers after `mean=` are absorbed).
        """
        if not text:
            return cls()
        values: dict[str, Any] = {}
        key = None
        for token in text.split(","):
            token = token.strip()
            if not token:
                continue
            if "=" in token:
                key, val = token.split("=", 1)
                key = key.strip()
                values[key] = [val.strip()]
            elif key in ("mean", "std", "size"):
                values[key].append(token)
            else:
                raise ConfigError(f"--input-spec: cannot parse {token!r}; expected K=V pairs")
        spec: dict[str, Any] = {}
        for key, parts in values.items():
            parts = [p for part in parts for p in part.replace(":", "/").split("/") if p]
            if not parts:
                raise ConfigError(f"--input-spec {key}= needs a value")
            if key == "size":
                nums = [_spec_number(key, p, int, "size=N or size=H/W (integers >= 16)") for p in parts]
                if len(nums) == 1:
                    nums = nums * 2
                if len(nums) != 2 or min(nums) < 16:
                    raise ConfigError("--input-spec size=N or size=H/W with N >= 16")
                spec["size"] = (nums[0], nums[1])
            elif key == "order":
                if parts[0] not in ("rgb", "bgr"):
                    raise ConfigError("--input-spec order must be rgb or bgr")
                spec["order"] = parts[0]
            elif key == "scale":
                scale = _spec_number(key, parts[0], float, "scale=1 or scale=255")
                if scale not in (1.0, 255.0):
                    raise ConfigError("--input-spec scale must be 1 or 255")
                spec["scale"] = scale
            elif key in ("mean", "std"):
                nums3 = [_spec_number(key, p, float, f"{key}=V or {key}=R/G/B (finite numbers)") for p in parts]
                if len(nums3) == 1:
                    nums3 = nums3 * 3
                if len(nums3) != 3:
                    raise ConfigError(f"--input-spec {key} takes 1 or 3 values")
                if key == "std" and 0.0 in nums3:
                    raise ConfigError("--input-spec std values must be non-zero (they divide the pixels)")
                spec[key] = tuple(nums3)
            elif key == "dtype":
                if parts[0] not in ("float32", "float16"):
                    raise ConfigError("--input-spec dtype must be float32 or float16")
                spec["dtype"] = parts[0]
            else:
                raise ConfigError(
                    f"--input-spec: unknown key {key!r}; allowed: size, order, scale, mean, std, dtype"
                )
        return cls(**spec)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "InputSpec":
        data = dict(data)
        for key in ("size", "mean", "std"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)


@dataclass(frozen=True)
class ExtractorConfig:
    """Everything that determines the raw descriptor of one image window."""

    backbone: str = "resnet50"
    weights: str = "DEFAULT"
    onnx: str | None = None
    onnx_output: str | None = None
    input_spec: InputSpec = field(default_factory=InputSpec)
    layer: str | None = None
    pool: str = "avg"
    patch_mode: str = "crop"
    roi_size: int | None = None
    precision: str = "fp32"
    pyramid_average: str = "cells"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)} (got {self.precision!r})")
        if self.precision != "fp32" and self.onnx:
            raise ConfigError(
                f"--precision {self.precision} applies to torch backbones; an ONNX model runs at the "
                "precision it was exported in (`retrieval export-onnx --int8` makes a faster one)"
            )
        if self.roi_size is not None and self.roi_size < 32:
            raise ConfigError(f"--roi-size must be >= 32 pixels (got {self.roi_size})")
        if self.pool not in POOLS:
            raise ConfigError(f"--pool must be one of {', '.join(POOLS)} (got {self.pool!r})")
        if self.patch_mode not in PATCH_MODES:
            raise ConfigError(
                f"--patch-mode must be one of {', '.join(PATCH_MODES)} (got {self.patch_mode!r})"
            )
        if self.onnx_output and not self.onnx:
            raise ConfigError("--onnx-output needs --onnx FILE")
        if self.pyramid_average not in PYRAMID_AVERAGES:
            raise ConfigError(
                f"pyramid_average must be one of {', '.join(PYRAMID_AVERAGES)} (got {self.pyramid_average!r})"
            )

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["input_spec"] = self.input_spec.to_dict()
        return data

    def summary(self) -> dict[str, Any]:
        """The settings that apply to this extractor (for `retrieval info`): an ONNX model
        has no torchvision backbone, weights or layer, a torch one no ONNX fields."""
        data = self.to_dict()
        drop = ("backbone", "weights", "layer", "precision") if self.onnx else ("onnx", "onnx_output")
        if self.patch_mode not in MAP_SIZE_MODES:
            drop += ("roi_size",)
        if self.patch_mode != "pyramid":
            drop += ("pyramid_average",)
        return {k: v for k, v in data.items() if k not in drop}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ExtractorConfig":
        data = dict(data)
        data["input_spec"] = InputSpec.from_dict(data.get("input_spec") or {})
        # Saved before the cell weighting existed: its pyramid descriptors are the plain mean's.
        data.setdefault("pyramid_average", "mean")
        return cls(**data)

    def key(self) -> str:
        """Stable identity of the descriptors this configuration produces.

        Weight files (ONNX model, torch checkpoint) are identified by their content, so
        replacing a file under the same name does not reuse stale descriptors.
        """
        ident = self.to_dict()
        if self.roi_size is None or self.patch_mode not in MAP_SIZE_MODES:
            # Absent unless it matters, so keys made before the option existed stay valid.
            ident.pop("roi_size")
        if self.precision == "fp32":
            ident.pop("precision")  # likewise
        ident.pop("pyramid_average")  # in the pyramid term below, absent from other modes' keys
        if self.patch_mode == "pyramid":
            # The default larger size, the split and the averaging of the smaller windows
            # over both maps are part of what a pyramid descriptor is (descriptors pooled
            # from the larger map alone are keyed apart; the plain mean keeps its old key).
            average = "cell-weighted-maps" if self.pyramid_average == "cells" else "mean-of-maps"
            ident["pyramid"] = [round(PYRAMID_RATIO, 6), PYRAMID_WHOLE, average]
        if self.onnx:
            ident["onnx"] = file_digest(self.onnx)
            for k in ("backbone", "weights", "layer"):
                ident.pop(k)
        elif self.weights not in ("none", "DEFAULT") and Path(self.weights).is_file():
            ident["weights"] = file_digest(self.weights)
        blob = json.dumps(ident, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:24]


@dataclass(frozen=True)
class SearchConfig:
    """Settings applied after extraction: which windows, whitening, distance."""

    levels: tuple[int, ...] = LEVELS
    query_levels: tuple[int, ...] | None = None
    pca_dim: int = 256
    aggregate: str = DEFAULT_AGGREGATE

    def __post_init__(self) -> None:
        for name, levels in (("--levels", self.levels), ("--query-levels", self.query_levels)):
            if levels is None:
                continue
            if not levels or any(level not in LEVELS for level in levels):
                raise ConfigError(f"{name} takes levels from 1,2,3,4 (got {levels!r})")
        if self.aggregate not in AGGREGATES:
            raise ConfigError(
                f"--aggregate must be one of {', '.join(AGGREGATES)} (got {self.aggregate!r})"
            )
        if self.pca_dim < 0:
            raise ConfigError("--pca-dim must be >= 0 (0 turns whitening off)")

    @property
    def effective_query_levels(self) -> tuple[int, ...]:
        return self.query_levels or self.levels

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["levels"] = list(self.levels)
        data["query_levels"] = list(self.query_levels) if self.query_levels else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SearchConfig":
        data = dict(data)
        data["levels"] = tuple(data["levels"])
        if data.get("query_levels"):
            data["query_levels"] = tuple(data["query_levels"])
        return cls(**data)


@dataclass(frozen=True)
class RuntimeConfig:
    """Throughput knobs: they never change a descriptor."""

    device: str = "auto"
    batch_size: int = 32
    workers: int = 2
    ray: str | None = None  # extract on this Ray cluster: "local", "auto" or an address

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ConfigError(f"--device must be one of {', '.join(DEVICES)} (got {self.device!r})")
        if self.batch_size < 1 or self.workers < 0:
            raise ConfigError("--batch-size must be >= 1 and --workers >= 0")
        if self.ray is not None and self.ray not in ("local", "auto") and ":" not in self.ray:
            raise ConfigError(f"--ray takes local, auto or a cluster address HOST:PORT (got {self.ray!r})")


def reranks_by_default(images: int, whitened: bool) -> bool:
    """Whether a collection of `images` re-ranks by default where its neighbour lists are
    stored: at most RERANK_AUTO_LIMIT images, PCA-`whitened` (the margin is a distance
    between whitened descriptors). The one rule behind `SearchOptions.with_default_rerank`
    and `info`'s `reranking.by_default`; callers read the lists only where it holds."""
    return whitened and images <= RERANK_AUTO_LIMIT


class SearchOptionError(ConfigError):
    """A search option out of range: `field` names it (as a keyword of `SearchOptions`),
    `allowed` says what it may be, `value` is what was given. The command line and the
    server word the same verdict with their own name for the field."""

    def __init__(self, field: str, allowed: str, value: Any) -> None:
        self.field, self.allowed, self.value = field, allowed, value
        super().__init__(f"{field} must be {allowed} (got {value!r})")


def _whole(name: str, value: Any, minimum: int, *, optional: bool = False) -> int | None:
    """`value` as an int >= minimum (None passes when `optional`); SearchOptionError otherwise."""
    if value is None and optional:
        return None
    # bool is an int to Python, but `k=True` is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise SearchOptionError(name, f"a whole number >= {minimum}", value)
    return int(value)


@dataclass(frozen=True)
class SearchOptions:
    """How one search runs: every option of `Index.search`, checked once, here.

    `k` hits per query (None: every image). `query_levels` and `aggregate` override the
    index's (None: the index's own, see `for_index`). Up to `exact_limit` images every
    image is scored exactly; above, FAISS proposes candidates: the images owning the
    `per_patch` nearest windows of each query window (None: max(4k, 32)), searching
    `nprobe` IVF lists (None: 32, fewer once the lists are long, down to 16 at 1,000,000
    images: `VectorIndex.default_nprobe`), and the `layout_k` images nearest to the
    query's windows laid end to end (0 leaves the layout index out). Of the window
    index's images the kernel scores the `shortlist` (None: max(20k, 200); 0: all of
    them) whose windows FAISS found nearest, each query window counting its nearest
    window of the image (or, where FAISS found none, the farthest it returned); the
    layout index's are all scored. Re-ranking: `qe` best images' windows become
    queries too (alpha-QE weights, exponent `qe_alpha`), `dba` nearest neighbours of each
    image are averaged in (fixed counts); `rerank` fills in what has no count: the hits
    within `rerank_margin` of the nearest expand the query, and each image is averaged
    with its RERANK_DBA nearest stored neighbours (False with both 0: the plain ranking).
    `rerank` None, the default, decides per index (`with_default_rerank`): re-ranking on
    a PCA-whitened index of at most RERANK_AUTO_LIMIT images with stored neighbour lists
    where `qe` and `dba` are 0, plain otherwise. `query_rotations` (distinct, from 0, 90, 180, 270) describes
    the query at each rotation; None describes it as it is (and hits carry no rotation);
    "auto" describes only the query's level-1 window at each of the four turns, keeps the
    turn whose window is nearest to an indexed image, and describes and searches at that
    turn alone (as if it had been the one rotation asked).

    A value out of range is a SearchOptionError (a ConfigError) naming the field and
    what it may be. None for `layout_k` means the default, which the value then holds;
    None for `nprobe` stays None (the structure's own default).
    """

    k: int | None = 10
    query_levels: tuple[int, ...] | None = None
    aggregate: str | None = None
    exact_limit: int = EXACT_LIMIT
    nprobe: int | None = None
    per_patch: int | None = None
    layout_k: int = LAYOUT_K
    shortlist: int | None = None
    qe: int = 0
    qe_alpha: float = QE_ALPHA
    dba: int = 0
    rerank: bool | None = None
    rerank_margin: float = RERANK_MARGIN
    query_rotations: tuple[int, ...] | str | None = None

    def __post_init__(self) -> None:
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 - frozen
        put("k", _whole("k", self.k, 1, optional=True))
        put("exact_limit", _whole("exact_limit", self.exact_limit, 0))
        put("nprobe", _whole("nprobe", self.nprobe, 1, optional=True))
        put("per_patch", _whole("per_patch", self.per_patch, 1, optional=True))
        put("layout_k", _whole("layout_k", LAYOUT_K if self.layout_k is None else self.layout_k, 0))
        put("shortlist", _whole("shortlist", self.shortlist, 0, optional=True))
        put("qe", _whole("qe", self.qe, 0))
        put("dba", _whole("dba", self.dba, 0))
        alpha = self.qe_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not alpha >= 0:
            raise SearchOptionError("qe_alpha", "a number >= 0", alpha)
        put("qe_alpha", float(alpha))
        margin = self.rerank_margin
        if isinstance(margin, bool) or not isinstance(margin, numbers.Real) or not margin >= 0:
            raise SearchOptionError("rerank_margin", "a number >= 0", margin)
        put("rerank_margin", float(margin))
        if self.rerank is not None and not isinstance(self.rerank, bool):
            raise SearchOptionError("rerank", "true, false or None (by the index)", self.rerank)
        if self.aggregate is not None and self.aggregate not in AGGREGATES:
            raise SearchOptionError("aggregate", f"one of {', '.join(AGGREGATES)}", self.aggregate)
        if self.query_levels is not None:
            levels = self.query_levels
            try:
                ok = bool(levels) and all(not isinstance(v, bool) and v in LEVELS for v in levels)
            except TypeError:
                ok = False
            if not ok:
                raise SearchOptionError("query_levels", "a non-empty list of levels from 1,2,3,4", levels)
            # Sorted: the query's windows then lie in the order of the database image's.
            put("query_levels", tuple(sorted({int(v) for v in levels})))
        if self.query_rotations is not None and self.query_rotations != AUTO_ROTATION:
            try:
                put("query_rotations", check_rotations(self.query_rotations))
            except ConfigError:
                raise SearchOptionError(
                    "query_rotations", 'a non-empty list of distinct values from 0,90,180,270, or "auto"',
                    self.query_rotations
                ) from None

    @property
    def reranks(self) -> bool:
        """Whether distances are re-ranked (fixed `qe`/`dba`, or `rerank`; a
        `rerank` still None counts as off: `with_default_rerank` decides it first)."""
        return bool(self.qe or self.dba or self.rerank)

    def with_default_rerank(self, images: int, lists: bool, whitened: bool) -> "SearchOptions":
        """These options with `rerank` decided where it is None: re-ranking for a
        collection of at most RERANK_AUTO_LIMIT `images` whose neighbour `lists` are
        stored and whose descriptors are PCA-`whitened` (the margin is a distance between
        whitened descriptors: unwhitened ones lie so close that it would take in most of
        the collection), unless fixed `qe` / `dba` counts are asked; plain otherwise."""
        if self.rerank is not None:
            return self
        return self.replace(rerank=bool(lists and reranks_by_default(images, whitened) and not self.qe and not self.dba))

    @property
    def rotations(self) -> tuple[int, ...]:
        """The rotations every query is described at in full ((0,): as it is; with
        "auto" each query's own turn is chosen first, see engine/query.py)."""
        return (0,) if self.query_rotations in (None, AUTO_ROTATION) else self.query_rotations

    def for_index(self, config: "SearchConfig") -> "SearchOptions":
        """These options with the index's query levels and aggregate where they are None."""
        return dataclasses.replace(
            self, query_levels=self.query_levels or config.effective_query_levels,
            aggregate=self.aggregate or config.aggregate,
        )

    def replace(self, **changes: Any) -> "SearchOptions":
        """A copy with `changes` (checked like any other)."""
        return dataclasses.replace(self, **changes)


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """Content hash of a file (BLAKE2b, 128 bits): the identity of an image or weight file."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def levels_from_text(text: str) -> tuple[int, ...]:
    """`1,2,3` -> (1, 2, 3); ConfigError unless a non-empty comma list from 1..4."""
    try:
        levels = tuple(sorted({int(t) for t in text.split(",") if t.strip()}))
    except ValueError:
        levels = ()
    if not levels or any(level not in LEVELS for level in levels):
        raise ConfigError(f"levels are a comma list from 1,2,3,4 (got {text!r})")
    return levels


def check_rotations(rotations) -> tuple[int, ...]:
    """Query rotations in the given order (None: the query as it is); ConfigError unless a
    non-empty list of distinct values from 0, 90, 180, 270."""
    if rotations is None:
        return (0,)
    try:
        out = tuple(int(r) for r in rotations)
    except (TypeError, ValueError):
        out = ()
    if not out or any(r not in ROTATIONS for r in out) or len(set(out)) != len(out):
        raise ConfigError(f"query rotations are distinct values from 0,90,180,270 (got {rotations!r})")
    return out


def rotations_from_text(text: str) -> tuple[int, ...] | str:
    """`0,90` -> (0, 90), `auto` -> "auto"; ConfigError unless distinct values from
    0,90,180,270 or auto."""
    if text.strip().lower() == AUTO_ROTATION:
        return AUTO_ROTATION
    try:
        return check_rotations([t for t in text.split(",") if t.strip()])
    except ConfigError:
        raise ConfigError(f"rotations are distinct values from 0,90,180,270, or auto (got {text!r})") from None
