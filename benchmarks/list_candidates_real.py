#!/usr/bin/env python
"""The neighbour lists from FAISS candidates against exact ones, on real photos above the exact limit.

    python benchmarks/make_copies_set.py ../shared/data/hymenoptera/val /tmp/real/copies --groups 100
    python benchmarks/list_candidates_real.py ../shared/data/ukbench/full /tmp/real/copies/jpg --work /tmp/real \\
        --store /tmp/real/store.sqlite --onnx ../shared/weights/mobilenetv2-12-int8.onnx --onnx-output 627 \\
        --exact-limit 200 --index-type auto --index-type IVF1024,PQ64x4fs --json real.json

Below the 2,000-image exact limit the lists that `retrieval duplicates` groups from are
exact (the kernel scores every pair); above it each image's list comes from FAISS
candidates (`retrieval/engine/neighbour_lists.py`). The synthetic scale sets cannot say
whether the candidates keep a crop or another view of a real photo, so this builds, from
the same feature store, one index with exact lists (the default policy) and one per
`--index-type` whose writer builds FAISS above `--exact-limit` images, and compares them
through `Index.duplicates()`:

- lists: of the true group mates in an image's exact list (at any distance), the share
  its candidate list holds (`mates_kept`), and the share of lists identical;
- groups at each index's default max distance: pairwise precision / recall / F1 and the
  share of true groups recovered whole, and whether the groups equal the exact index's
  (at its own default, which follows its lists' 10th distances, and at the exact one's);
- the pairs within the exact index's default max distance that the lists keep.

Ground truth by file name: UKBench `ukbenchNNNNN.jpg` is group NNNNN // 4 (four views of
one object), the copies set's `GGGGMM.jpg` group GGGG (a photo and its edited copies).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.append(str(p))  # last: a PYTHONPATH checkout wins

import numpy as np  # noqa: E402

from duplicates_bench import group_pairs, scores  # noqa: E402
from retrieval.cli.args import add_extractor_args, extractor_config_from_args, search_config_from_args  # noqa: E402
from retrieval.engine import duplicates as grouping  # noqa: E402
from retrieval.engine.index import Index  # noqa: E402
from retrieval.engine.policy import WritePolicy  # noqa: E402
from retrieval.extraction.images import expand_inputs  # noqa: E402


def name_group(path: str) -> str:
    """The true group of a photo of the two sets, from its file name."""
    stem = Path(path).stem
    if stem.startswith("ukbench"):
        return f"ukbench-{int(stem[len('ukbench'):]) // 4}"
    if len(stem) == 6 and stem.isdigit():
        return f"copies-{stem[:4]}"
    raise SystemExit(f"{path}: neither ukbenchNNNNN.jpg nor the copies set's GGGGMM.jpg; no ground truth")


def build(index_dir: Path, paths: list[str], args, index_type: str | None, policy: WritePolicy) -> Index:
    idx = Index.create(index_dir, extractor_config_from_args(args), search_config_from_args(args), store=args.store,
                       index_type=index_type, policy=policy)
    idx.add(paths, progress=not args.quiet)
    return idx


def lists_by_path(idx: Index) -> tuple[dict[str, dict[str, float]], float]:
    """Each image's list ({path: distance}) as `duplicates` reads it, and its seconds from
    no stored lists."""
    (idx.path / "neighbours.npz").unlink(missing_ok=True)
    start = time.perf_counter()
    found = idx.current_neighbours(grouping.K)
    seconds = time.perf_counter() - start
    entries = idx.manifest.get_many([int(i) for i in found.ids] + [int(i) for i in found.neighbours.ravel() if i >= 0])
    return ({entries[int(i)].path: {entries[int(j)].path: float(d) for j, d in zip(row, dist) if j >= 0}
             for i, row, dist in zip(found.ids, found.neighbours, found.distances)}, seconds)


def groups_by_path(idx: Index, max_distance: float | None = None) -> tuple[list[list[str]], float]:
    found = idx.duplicates(max_distance)
    return [[m.path for m in g] for g in found.groups], found.max_distance


def compare(exact: dict[str, dict[str, float]], found: dict[str, dict[str, float]], max_distance: float) -> dict:
    """How much of the exact lists the candidate lists hold: true group mates (at any
    distance) per list, and the pairs within `max_distance` (what groups are made of)
    per list and in either list of the pair (`duplicates.pair_distances` reads both)."""
    mates = kept = near = near_kept = near_either = 0
    missed = []
    for path, row in exact.items():
        want = [p for p in row if name_group(p) == name_group(path)]
        mates += len(want)
        kept += sum(p in found[path] for p in want)
        missed += [(path, p, round(row[p], 4)) for p in want if p not in found[path]]
        close = [p for p, d in row.items() if d <= max_distance]
        near += len(close)
        near_kept += sum(p in found[path] for p in close)
        near_either += sum(p in found[path] or path in found[p] for p in close)
    return {"mates_in_exact_lists": mates, "mates_kept": round(kept / max(mates, 1), 4),
            "near_pairs": near, "near_kept": round(near_kept / max(near, 1), 4),
            "near_kept_either_list": round(near_either / max(near, 1), 4),
            "identical_lists": round(float(np.mean([list(exact[p]) == list(found[p]) for p in exact])), 4),
            "missed_mates": missed[:20]}


def group_scores(paths: list[str], groups: list[list[str]]) -> dict:
    at = {p: i for i, p in enumerate(paths)}
    labels = [name_group(p) for p in paths]
    numbered = [[at[p] for p in g] for g in groups]
    return scores(labels, group_pairs(numbered), numbered)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", help="folders or files of the two sets")
    p.add_argument("--work", type=Path, required=True, help="folder for the indexes")
    p.add_argument("--store", required=True, help="feature store (the photos are described once, into it)")
    p.add_argument("--exact-limit", type=int, default=200, help="images above which the candidate index uses FAISS")
    p.add_argument("--index-type", action="append", default=None,
                   help="FAISS structure of a candidate index ('auto': chosen by size); repeatable")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--quiet", action="store_true")
    add_extractor_args(p)
    args = p.parse_args()
    paths = [str(Path(q).resolve()) for q in expand_inputs(args.inputs)]
    for q in paths:
        name_group(q)
    out = {"images": len(paths), "exact_limit": args.exact_limit, "load_before": round(os.getloadavg()[0], 1), "runs": []}
    with build(args.work / "exact", paths, args, None, WritePolicy()) as idx:
        exact_lists, exact_s = lists_by_path(idx)
        exact_groups, exact_max = groups_by_path(idx)
    out["exact"] = {"lists_s": round(exact_s, 2), "max_distance": round(exact_max, 4), "groups": len(exact_groups),
                    **group_scores(paths, exact_groups)}
    print(json.dumps({"exact": out["exact"]}), flush=True)
    for index_type in args.index_type or ["auto"]:
        name = "auto" if index_type == "auto" else index_type.replace(",", "_")
        policy = WritePolicy(ann_min_images=args.exact_limit)
        with build(args.work / f"candidates-{name}", paths, args, None if index_type == "auto" else index_type,
                   policy) as idx:
            factory = idx.view().state.ann["factory"]
            found_lists, found_s = lists_by_path(idx)
            found_groups, found_max = groups_by_path(idx)
            at_exact_max, _ = groups_by_path(idx, exact_max)
        run = {"index_type": factory, "lists_s": round(found_s, 2), "max_distance": round(found_max, 4),
               "groups": len(found_groups), "same_groups_as_exact": found_groups == exact_groups,
               "same_groups_at_the_exact_max_distance": at_exact_max == exact_groups,
               **group_scores(paths, found_groups), **compare(exact_lists, found_lists, exact_max)}
        out["runs"].append(run)
        print(json.dumps(run), flush=True)
    out["load_after"] = round(os.getloadavg()[0], 1)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
