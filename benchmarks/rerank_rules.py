#!/usr/bin/env python
"""Searching re-ranking rule shapes fast: replay them on plain distances, choose leave-one-set-out.

Running a rule through the product (`retrieval_map.py`) costs a minute or more per set;
a rule shape (separate margins for expansion and augmentation, margins relative to the
index's distance scale, a cut at the largest gap...) needs dozens. So:

    # 1. once per set: every query's and every indexed image's plain distance to every
    #    image, through Index.search(k=None, rerank=False) (retrieval_map.py's flags)
    python benchmarks/rerank_rules.py dump uk.npz --dataset ukbench --root ROOT [retrieval_map.py flags]
    # 2. replay the rule grid on the matrices and choose leave-one-set-out
    python benchmarks/rerank_rules.py replay ukbench=uk.npz:ukbench:ROOT paris6k-mini=p.npz:paris6k:ROOT,rp.npz:rparis6k:ROOT ...

The replay uses the product's formulas (`retrieval/engine/search.py` `rank_reranked`,
`neighbours.Neighbours.augment`: alpha-QE weights, the kept 10 neighbours, ties by image
id) and reproduces its numbers exactly (benchmarks/results/reranking.md lists the rows
checked both ways). It is for exploring only: a chosen rule is then built into the
product and measured by `retrieval_map.py`.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import numpy as np  # noqa: E402

from retrieval.evaluation.datasets import load_dataset  # noqa: E402
from retrieval.evaluation.evaluate import evaluate  # noqa: E402

K = 10  # neighbours the writer keeps per image
ALPHA = 3.0


def dump(out: str, argv: list[str]) -> None:
    import retrieval_map as rm
    from retrieval.engine.index import Index

    args = rm.build_parser().parse_args(argv)
    ds = load_dataset(args.dataset, args.root)
    search = rm.search_config_from_args(args)
    store = str(Path(args.store).resolve())
    with Index.create(Path(args.index_dir) / f"{ds.name}-rules", rm.extractor_config_from_args(args), search,
                      store=store, whiten_on=rm._whiten_sources(args.whiten_on),
                      runtime=rm.runtime_config_from_args(args)) as index:
        index.add(ds.images, progress=False)
        pos = {os.path.realpath(p): i for i, p in enumerate(ds.images)}

        def matrix(items: list) -> np.ndarray:
            found = np.full((len(items), len(ds.images)), np.inf, np.float32)
            for row, result in enumerate(index.search(items, k=None, rerank=False)):
                for hit in result.hits:
                    found[row, pos[os.path.realpath(hit.path)]] = hit.distance
            return found

        np.savez(out, Q=matrix(rm._queries(ds)), D=matrix(list(ds.images)))


def weight(d: np.ndarray) -> np.ndarray:
    return np.clip(1 - np.asarray(d, np.float64) ** 2 / 2, 0, 1) ** ALPHA


class Replay:
    """One benchmark's plain distances (`Q` queries x images, `D` images x images) and its
    images' kept neighbours."""

    def __init__(self, npz: str, dataset: str, root: str):
        with np.load(npz) as m:
            self.Q, self.D = m["Q"].astype(np.float64), m["D"].astype(np.float64)
        self.dataset = load_dataset(dataset, root)
        n = len(self.D)
        d = self.D.copy()
        d[np.arange(n), np.arange(n)] = np.inf
        order = np.lexsort((np.broadcast_to(np.arange(n), d.shape), d), axis=-1)[:, :K]
        self.nb, self.nbd = order, np.take_along_axis(d, order, 1)
        self.scale = float(np.median(self.nbd[:, K - 1]))  # as `duplicates` sets its default

    def part(self, rule):
        """('r', f), a margin relative to the scale, as an absolute margin."""
        return ("m", rule[1] * self.scale) if rule is not None and rule[0] == "r" else rule

    def augment(self, dist: np.ndarray, rule) -> np.ndarray:
        """Rows of image distances, each averaged with its kept neighbours' (the rule says which)."""
        if rule is None:
            return dist
        near, w = self.nbd, weight(self.nbd)
        if rule[0] == "k":
            w = w * (np.arange(K) < rule[1])
        elif rule[0] == "m":
            w = w * (near <= near[:, :1] + rule[1])
        elif rule[0] == "g":  # up to the largest gap between consecutive neighbours
            w = w * (np.arange(K)[None, :] <= np.argmax(np.diff(near, axis=1), axis=1)[:, None])
        elif rule[0] == "km":
            w = w * (np.arange(K) < rule[1]) * (near <= near[:, :1] + rule[2])
        return (dist + (dist[:, self.nb] * w).sum(-1)) / (1 + w.sum(-1))

    def score(self, rule) -> dict:
        qe, dba = (self.part(p) for p in rule)
        first, hits_d = self.augment(self.Q, dba), self.augment(self.D, dba)
        n = first.shape[1]
        rankings = []
        for a in first:
            order = np.lexsort((np.arange(n), a))
            if qe is None:
                hits = order[:0]
            elif qe[0] == "k":
                hits = order[:qe[1]]
            else:
                hits = order[:K][a[order[:K]] <= a[order[0]] + qe[1]]
            w = weight(a[hits])
            final = (a + (w[:, None] * hits_d[hits]).sum(0)) / (1 + w.sum())
            rankings.append(np.lexsort((np.arange(n), final)))
        return evaluate(self.dataset, rankings)


def rules() -> list:
    out = [(q, d) for q in (None, ("k", 2), ("k", 3), ("k", 5)) for d in (None, ("k", 3), ("k", 5), ("k", 10))]
    out += [(("m", m), ("m", m)) for m in (0.02, 0.05, 0.1, 0.15, 0.2, 0.3)]
    for m in (0.02, 0.05, 0.1, 0.15, 0.2, 0.3):
        for d in (None, ("k", 3), ("k", 5), ("k", 10), ("m", 0.05), ("m", 0.1), ("m", 0.15), ("m", 0.2), ("m", 0.3),
                  ("g",), ("km", 5, 0.2), ("km", 5, 0.3)):
            if (("m", m), d) not in out:
                out.append((("m", m), d))
    out += [(("r", f), d) for f in (0.02, 0.05, 0.1, 0.15, 0.2, 0.3)
            for d in (("r", 0.1), ("r", 0.15), ("r", 0.2), ("r", 0.3), ("k", 5), ("g",))]
    out += [(q, d) for q in (None, ("k", 2), ("k", 3), ("k", 5)) for d in (("g",), ("km", 5, 0.2), ("km", 5, 0.3))]
    return out


def name(rule) -> str:
    return " ".join(f"{what}:{'-' if r is None else r[0] + ','.join(f'{v:g}' for v in r[1:])}"
                    for what, r in zip(("qe", "dba"), rule))


def set_score(results: list[dict]) -> float:
    """As rerank_loso.py: N-S / 4, mAP, or the mean of Medium and Hard; a set's files averaged."""
    def one(r):
        return r["value"] / 4 if r["metric"] == "ns" else (r["medium"] + r["hard"]) / 2 if "medium" in r else r["value"]
    return sum(one(r) for r in results) / len(results)


def replay(specs: list[str]) -> None:
    sets = {}
    for spec in specs:
        set_name, _, files = spec.partition("=")
        sets[set_name] = [Replay(*f.split(":")) for f in files.split(",")]
    grid = rules()
    scores = {(s, r): set_score([x.score(r) for x in parts]) for s, parts in sets.items() for r in grid}
    print("| left out | chosen on the others | its score there | left-out score |")
    print("| --- | --- | --- | --- |")
    for left in sets:
        others = [s for s in sets if s != left]
        chosen = max(grid, key=lambda r: sum(scores[(s, r)] for s in others))
        print(f"| {left} | {name(chosen)} | {sum(scores[(s, chosen)] for s in others) / len(others):.4f} | "
              f"{scores[(left, chosen)]:.4f} |")
    print("\n| rule | " + " | ".join(sets) + " | mean |\n| --- |" + " --- |" * (len(sets) + 1))
    for r in sorted(grid, key=lambda r: -sum(scores[(s, r)] for s in sets)):
        print(f"| {name(r)} | " + " | ".join(f"{scores[(s, r)]:.4f}" for s in sets)
              + f" | {sum(scores[(s, r)] for s in sets) / len(sets):.4f} |")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=("dump", "replay"))
    p.add_argument("rest", nargs=argparse.REMAINDER,
                   help="dump: OUT.npz and retrieval_map.py's flags; replay: SET=NPZ:DATASET:ROOT[,...] ...")
    args = p.parse_args(argv[:1])
    if args.step == "dump":
        dump(argv[1], argv[2:])
    else:
        replay(argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
