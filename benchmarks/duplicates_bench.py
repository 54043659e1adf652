#!/usr/bin/env python
"""`retrieval duplicates` side by side with imagededup's hashes, on two sets with ground truth.

    python benchmarks/imagededup_peer.py --setup     # once
    python benchmarks/duplicates_bench.py --data ../shared/data --work /tmp/dupbench \\
        --onnx ../shared/weights/mobilenetv2-12-int8.onnx --onnx-output 627 --json OUT.json

Sets:
  copies  `--sources` real images (hymenoptera, drawn with a fixed seed) each with seven
          generated copies (half size, JPEG quality 30, centre crops of 80 % of the
          side and of 50 % of the area, 5 degree rotation, brightness x1.4, a text
          overlay, mirrored), plus `--distractors` other images of the same folders,
          alone; truth: a source and its copies.
  views   the first `--ukbench` UKBench images: groups of four views of one object.

Each set is indexed through `Index` (the feature store `--store` keeps the descriptors,
so a re-run extracts nothing), then `Index.duplicates()` at its default and over the
`--sweep` of max_distance (the neighbour lists are computed once and reused), and single
linkage over the same pairs (connected components: the chaining the leader rule avoids).
imagededup (benchmarks/imagededup_peer.py) hashes the same files, at its default
threshold and swept. Per run: pairwise precision, recall and F1 (the engine's pairs are
those inside a group; imagededup's the pairs it reports), the share of true groups
recovered whole (some group, or connected component of imagededup's pairs, holds
exactly the true group), seconds (the engine: grouping from the stored neighbour
lists, and `add`, which keeps the neighbour lists current; describing the images is
not counted when the store holds them),
and on copies the recall per variant: the share of sources found with that copy (the
engine: in one group; imagededup: the pair reported).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps  # noqa: E402

from retrieval.cli.args import add_extractor_args, extractor_config_from_args, search_config_from_args  # noqa: E402
from retrieval.engine import duplicates as grouping  # noqa: E402
from retrieval.engine.index import Index  # noqa: E402

MAX_SOURCES, MAX_DISTRACTORS = 40, 60
COPIES = ("half-size", "jpeg-q30", "crop-80", "crop-50", "rotate-5", "brighter", "text", "mirror")
# A centre crop keeping this share of the side: 0.5 ** 0.5 keeps half the area.
CROP_SIDE = {"crop-80": 0.8, "crop-50": 0.5 ** 0.5}


def make_copy(img: Image.Image, kind: str) -> Image.Image:
    w, h = img.size
    if kind == "half-size":
        return img.resize((max(w // 2, 1), max(h // 2, 1)), Image.Resampling.BILINEAR)
    if kind in CROP_SIDE:
        dx, dy = round(w * (1 - CROP_SIDE[kind]) / 2), round(h * (1 - CROP_SIDE[kind]) / 2)
        return img.crop((dx, dy, w - dx, h - dy))
    if kind == "rotate-5":
        return img.rotate(5, resample=Image.Resampling.BILINEAR)
    if kind == "brighter":
        return ImageEnhance.Brightness(img).enhance(1.4)
    if kind == "text":
        out = img.copy()
        font = ImageFont.load_default(size=max(h // 8, 10))
        ImageDraw.Draw(out).text((w // 10, h // 2), "SAMPLE 2026", fill=(255, 255, 0), font=font)
        return out
    if kind == "mirror":
        return ImageOps.mirror(img)
    return img  # jpeg-q30: the change is the encoding


def copies_set(data: Path, work: Path, sources: int, distractors: int, seed: int) -> tuple[list[str], list[int], list[str]]:
    """The images of the copies set, each one's true group and its kind ("source" or a
    COPIES entry; sources and their copies
    share their source's number; distractors have numbers of their own)."""
    pool = sorted(str(p) for p in (data / "hymenoptera").rglob("*.jpg"))
    if sources > MAX_SOURCES or distractors > MAX_DISTRACTORS or len(pool) < MAX_SOURCES + MAX_DISTRACTORS:
        raise SystemExit(f"--sources is at most {MAX_SOURCES}, --distractors at most {MAX_DISTRACTORS}, and "
                         f"{data / 'hymenoptera'} must hold their sum (it holds {len(pool)} images)")
    # One draw whatever the counts, so that a smaller run reuses a larger one's descriptors.
    drawn = random.Random(seed).sample(pool, MAX_SOURCES + MAX_DISTRACTORS)
    picked = drawn[:sources] + drawn[MAX_SOURCES:MAX_SOURCES + distractors]
    out = work / "copies"
    out.mkdir(parents=True, exist_ok=True)
    paths, labels, kinds = [], [], []
    for g, src in enumerate(picked):
        paths.append(src)
        labels.append(g)
        kinds.append("source")
        if g >= sources:
            continue
        img = Image.open(src).convert("RGB")
        for kind in COPIES:
            target = out / f"{g:03d}-{kind}.jpg"
            if not target.exists():
                make_copy(img, kind).save(target, quality=30 if kind == "jpeg-q30" else 90)
            paths.append(str(target))
            labels.append(g)
            kinds.append(kind)
    return paths, labels, kinds


def views_set(data: Path, n: int) -> tuple[list[str], list[int]]:
    files = sorted((data / "ukbench" / "full").glob("ukbench*.jpg"))[:n]
    return [str(f) for f in files], [int(f.stem[len("ukbench"):]) // 4 for f in files]


def scores(labels: list[int], pairs: set[tuple[int, int]], groups: list[list[int]]) -> dict:
    """Pairwise precision / recall / F1 of `pairs` (indices, a < b) and the share of true
    groups (2 or more images) that some predicted group holds exactly."""
    by_label: dict[int, list[int]] = {}
    for i, g in enumerate(labels):
        by_label.setdefault(g, []).append(i)
    truth_groups = [sorted(v) for v in by_label.values() if len(v) > 1]
    truth = {(a, b) for v in truth_groups for x, a in enumerate(v) for b in v[x + 1:]}
    tp = len(pairs & truth)
    p = tp / len(pairs) if pairs else 1.0
    r = tp / len(truth) if truth else 1.0
    predicted = {tuple(sorted(g)) for g in groups}
    whole = sum(tuple(v) in predicted for v in truth_groups) / max(len(truth_groups), 1)
    return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(2 * p * r / (p + r) if p + r else 0.0, 4),
            "whole": round(whole, 4), "pairs": len(pairs)}


def variant_recall(labels: list[int], kinds: list[str], pairs: set[tuple[int, int]]) -> dict[str, float]:
    """Per copy kind, the share of sources whose copy of that kind `pairs` joins to them."""
    source = {labels[i]: i for i, k in enumerate(kinds) if k == "source"}
    found: dict[str, list[bool]] = {}
    for i, kind in enumerate(kinds):
        if kind != "source":
            s = source[labels[i]]
            found.setdefault(kind, []).append((min(i, s), max(i, s)) in pairs)
    return {kind: round(sum(v) / len(v), 4) for kind, v in found.items()}


def group_pairs(groups: list[list[int]]) -> set[tuple[int, int]]:
    return {(min(a, b), max(a, b)) for g in groups for x, a in enumerate(g) for b in g[x + 1:]}


def components(n: int, pairs) -> list[list[int]]:
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        parent[find(a)] = find(b)
    out: dict[int, list[int]] = {}
    for i in range(n):
        out.setdefault(find(i), []).append(i)
    return [v for v in out.values() if len(v) > 1]


def run_engine(name: str, paths: list[str], labels: list[int], kinds: list[str] | None, args) -> dict:
    index_dir = Path(args.work) / f"index-{name}"
    idx = Index.create(index_dir, extractor_config_from_args(args), search_config_from_args(args), store=args.store)
    with idx:
        start = time.perf_counter()
        report = idx.add(paths, progress=not args.quiet)
        wanted = {str(Path(p).resolve()) for p in paths}
        left_over = [e.path for e in idx.manifest.entries() if e.path not in wanted]  # from a larger earlier run
        if left_over:
            report = idx.remove(left_over)
        add_s = time.perf_counter() - start
        at = {idx.manifest.by_path(str(Path(p).resolve())).id: i for i, p in enumerate(paths)}
        start = time.perf_counter()
        neighbours = idx.current_neighbours(grouping.K)
        neighbours_s = time.perf_counter() - start

        def measured(max_distance: float | None) -> dict:
            start = time.perf_counter()
            found = idx.duplicates(max_distance=max_distance)
            seconds = time.perf_counter() - start
            groups = [[at[m.id] for m in g] for g in found.groups]
            pairs = group_pairs(groups)
            return {"max_distance": round(found.max_distance, 4), "seconds": round(seconds, 3),
                    "groups": len(groups), **scores(labels, pairs, groups),
                    **({"by_variant": variant_recall(labels, kinds, pairs)} if kinds else {})}

        default = measured(None)
        sweep = [measured(d) for d in args.sweep]
        a, b, d = grouping.pair_distances(neighbours, neighbours.ids)
        single = []
        for dist in args.sweep:
            near = d <= dist
            pairs = [(at[x], at[y]) for x, y in zip(a[near].tolist(), b[near].tolist())]
            groups = components(len(paths), pairs)
            single.append({"max_distance": dist, **scores(labels, group_pairs(groups), groups)})
        # The distances of true and false pairs among the stored ones: what the default is fitted on.
        same = np.array([labels[at[x]] == labels[at[y]] for x, y in zip(a.tolist(), b.tolist())], bool)
        quantiles = lambda v: [round(float(q), 4) for q in np.quantile(v, [0.05, 0.25, 0.5, 0.75, 0.95])] if len(v) else []
    return {"images": report.images, "add_s": round(add_s, 1), "neighbours_s": round(neighbours_s, 2),
            "default": default, "sweep": sweep, "single_linkage": single,
            "distances": {"same_group_q05_25_50_75_95": quantiles(d[same]),
                          "different_group_q05_25_50_75_95": quantiles(d[~same])}}


def run_peer(name: str, paths: list[str], labels: list[int], kinds: list[str] | None, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        listing, out = Path(tmp) / "images.txt", Path(tmp) / "out.json"
        listing.write_text("\n".join(paths) + "\n")
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "imagededup_peer.py"),
                               "--images", str(listing), "--json", str(out)], capture_output=True, text=True)
        if proc.returncode == 3:
            return {"error": "not set up: " + proc.stderr.strip()}
        if proc.returncode != 0:
            raise SystemExit(f"imagededup_peer.py failed on {name}: {proc.stderr[-2000:]}")
        peer = json.loads(out.read_text())
    result = {}
    for method, data in peer["methods"].items():
        runs = []
        for run in data["runs"]:
            pairs = {tuple(p) for p in run["pairs"]}
            groups = components(len(paths), pairs)
            runs.append({"threshold": run["threshold"], "seconds": round(data["encode_s"] + run["seconds"], 2),
                         "default": run["threshold"] == peer["default_threshold"], **scores(labels, pairs, groups),
                         **({"by_variant": variant_recall(labels, kinds, pairs)} if kinds else {})})
        result[method] = runs
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--work", type=Path, required=True, help="folder for the generated copies and the indexes")
    parser.add_argument("--store", help="feature store (default: WORK/features.sqlite)")
    parser.add_argument("--sets", default="copies,views", help="comma-separated: copies, views")
    parser.add_argument("--sources", type=int, default=40, help="copies: images that get copies (default 40)")
    parser.add_argument("--distractors", type=int, default=60, help="copies: images without copies (default 60)")
    parser.add_argument("--ukbench", type=int, default=400, help="views: first N UKBench images (default 400)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sweep", default="0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0",
                        type=lambda s: [float(v) for v in s.split(",")], help="max_distance values swept")
    parser.add_argument("--no-peer", action="store_true", help="leave imagededup out")
    parser.add_argument("--json", type=Path, help="write every number here")
    parser.add_argument("--quiet", action="store_true")
    add_extractor_args(parser)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.store = args.store or str(args.work / "features.sqlite")
    results = {"machine": f"{platform.node()} {os.cpu_count()} CPUs", "load_before": os.getloadavg(), "sets": {}}
    for name in args.sets.split(","):
        if name == "copies":
            paths, labels, kinds = copies_set(args.data, args.work, args.sources, args.distractors, args.seed)
        elif name == "views":
            (paths, labels), kinds = views_set(args.data, args.ukbench), None
        else:
            parser.error(f"--sets: unknown set {name!r} (copies, views)")
        entry = {"images": len(paths), "engine": run_engine(name, paths, labels, kinds, args)}
        if not args.no_peer:
            entry["imagededup"] = run_peer(name, paths, labels, kinds, args)
        results["sets"][name] = entry
        print_set(name, entry)
    results["load_after"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def print_set(name: str, entry: dict) -> None:
    e = entry["engine"]
    print(f"\n## {name}: {entry['images']} images (add, neighbour lists included: {e['add_s']} s; lists read: {e['neighbours_s']} s)")
    print("| method | threshold | precision | recall | F1 | whole groups | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    row = "| {} | {} | {precision:.3f} | {recall:.3f} | {f1:.3f} | {whole:.3f} | {} |"
    print(row.format("**retrieval duplicates (default)**", e["default"]["max_distance"], e["default"]["seconds"], **e["default"]))
    for r in e["sweep"]:
        print(row.format("retrieval duplicates", r["max_distance"], r["seconds"], **r))
    for r in e["single_linkage"]:
        print(row.format("single linkage, same pairs", r["max_distance"], "", **r))
    for method, runs in entry.get("imagededup", {}).items():
        if method == "error":
            print(f"| imagededup | {runs} |")
            continue
        for r in runs:
            print(row.format(f"imagededup {method}" + (" (default)" if r["default"] else ""), r["threshold"], r["seconds"], **r))
    if "by_variant" in e["default"]:
        print_variants(entry)
    print("distances of stored pairs, same group (q05 q25 q50 q75 q95):", e["distances"]["same_group_q05_25_50_75_95"])
    print("distances of stored pairs, different groups:", e["distances"]["different_group_q05_25_50_75_95"])


def print_variants(entry: dict) -> None:
    """Recall per copy kind: the engine at its default, each hash at its default and at
    the threshold of its best F1."""
    e = entry["engine"]["default"]
    kinds = list(e["by_variant"])
    rows = [(f"retrieval duplicates ({e['max_distance']})", e["by_variant"])]
    for method, runs in entry.get("imagededup", {}).items():
        if method == "error":
            continue
        default = next(r for r in runs if r["default"])
        best = max(runs, key=lambda r: r["f1"])
        rows.append((f"imagededup {method} ({default['threshold']}, default)", default["by_variant"]))
        rows.append((f"imagededup {method} ({best['threshold']}, best F1)", best["by_variant"]))
    print("\n| method (threshold) | " + " | ".join(kinds) + " |")
    print("| --- |" + " --- |" * len(kinds))
    for label, recall in rows:
        print(f"| {label} | " + " | ".join(f"{recall[k]:.2f}" for k in kinds) + " |")


if __name__ == "__main__":
    sys.exit(main())
