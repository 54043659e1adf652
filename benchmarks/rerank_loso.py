"""Leave-one-set-out choice of the re-ranking setting, from `retrieval_map.py --json` sweeps.

Each SET=FILE.json holds one set's rows (the same re-ranking settings on every set, run
by `retrieval_map.py --sweep --json`). For each set left out, the setting with the best
mean score on the other sets is chosen, and its score on the left-out set is reported
beside that set's plain and best-fixed rows: the left-out number is what a default
chosen without looking at that set gives on it.

A set's score is N-S / 4 (UKBench) or mAP; revisited sets count the mean of Medium and
Hard. Several files of one set (e.g. paris6k and rparis6k on paris6k-mini) are averaged.

    python benchmarks/rerank_loso.py ukbench=uk.json paris6k-mini=p.json,rp.json copies=cp.json
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict


def setting(config: dict) -> str:
    """A row's re-ranking setting as its flags. Adaptive re-ranking with one of `qe` and
    `dba` fixed adapts the other, so it is a setting of its own; with both fixed it
    changes nothing."""
    fixed = [f"--{k} {config[k]}" for k in ("qe", "dba") if config.get(k)]
    if config.get("rerank") and len(fixed) < 2:
        return " ".join(fixed + [f"--rerank --rerank-margin {config['rerank_margin']:g}"])
    return " ".join(fixed) or "--no-rerank"


def score(row: dict) -> float:
    if row["metric"] == "ns":
        return row["value"] / 4
    if "medium" in row:
        return (row["medium"] + row["hard"]) / 2
    return row["value"]


def load(spec: str) -> tuple[str, dict[str, float], dict[str, dict]]:
    """SET=FILE[,FILE]: the set's name, its score per setting, and its rows per setting."""
    name, _, files = spec.partition("=")
    parts: dict[str, list[float]] = defaultdict(list)
    rows: dict[str, dict] = defaultdict(dict)
    for path in files.split(","):
        with open(path) as fh:
            found = json.load(fh)
        for row in found if isinstance(found, list) else [found]:
            key = setting(row["config"])
            parts[key].append(score(row))
            rows[key][row["dataset"]] = row
    return name, {k: sum(v) / len(v) for k, v in parts.items()}, rows


def describe(rows: dict) -> str:
    cells = []
    for dataset, row in sorted(rows.items()):
        if row["metric"] == "ns":
            cells.append(f"{dataset} N-S {row['value']:.3f}")
        elif "medium" in row:
            cells.append(f"{dataset} M/H {100 * row['medium']:.1f}/{100 * row['hard']:.1f}")
        else:
            cells.append(f"{dataset} mAP {100 * row['value']:.1f}")
    return ", ".join(cells)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sets", nargs="+", metavar="SET=FILE[,FILE]")
    args = p.parse_args()
    sets = [load(s) for s in args.sets]
    common = set.intersection(*(set(scores) for _, scores, _ in sets))
    print("| left out | chosen on the others | its score there | left-out set: chosen | plain | best fixed k (looked at) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for i, (name, scores, rows) in enumerate(sets):
        others = [s for j, s in enumerate(sets) if j != i]
        mean = {k: sum(o[1][k] for o in others) / len(others) for k in common}
        chosen = max(sorted(common), key=lambda k: mean[k])
        fixed = [k for k in common if "--rerank" not in k and k != "--no-rerank"]  # fixed counts only
        best_fixed = max(sorted(fixed), key=lambda k: scores[k]) if fixed else None
        print(f"| {name} | `{chosen}` | {mean[chosen]:.4f} | {describe(rows[chosen])} | "
              f"{describe(rows['--no-rerank']) if '--no-rerank' in rows else '-'} | "
              + (f"`{best_fixed}`: {describe(rows[best_fixed])}" if best_fixed else "-") + " |")
    print()
    print("| setting | " + " | ".join(name for name, _, _ in sets) + " |")
    print("| --- |" + " --- |" * len(sets))
    for k in sorted(common):
        print(f"| `{k}` | " + " | ".join(describe(rows[k]) for _, _, rows in sets) + " |")


if __name__ == "__main__":
    main()
