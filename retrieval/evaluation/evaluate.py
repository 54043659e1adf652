"""The official retrieval metrics (docs/cli.md section 18).

Average precision
-----------------
:func:`compute_ap` is the trapezoidal AP shared, line for line, by

* the revisited benchmark (Radenovic et al., ``revisitop`` ``compute_ap``),
* the original Oxford/Paris ``compute_ap.cpp`` (``old_recall`` /
  ``old_precision`` trapezoids, junk ``continue``-d out of the ranking), and
* INRIA Holidays ``eval_holidays.py`` (``score_ap_from_ranks_1``).

For the k-th positive (0-based) found at 0-based position ``r`` of the ranking
*after junk removal*, it adds ``(p0 + p1) / 2 / n_positives`` with
``p0 = k / r`` (``1`` when ``r == 0``) and ``p1 = (k + 1) / (r + 1)``.
``n_positives`` counts every positive, including those the ranking never
reaches, which therefore contribute 0 (exactly what ``compute_ap.cpp`` does
with a truncated ranked list).

Rankings
--------
``evaluate(dataset, rankings)``: ``rankings[i]`` lists database indices (into
``dataset.images``) by increasing distance for ``dataset.queries[i]``; a full
ranking or a prefix.  Images absent from a ranking are treated as ranked after
everything (a positive never ranked adds 0 to AP and counts as not in any
top-k).  Ties: the order given is used as-is, no re-sorting or tie averaging.
A repeated index keeps its first position only.  Junk images are removed from
the ranking before positions are counted.  Holidays: the query image
(``Query.index``) is removed from its own ranking before positions are counted,
shifting later positions by one (``rank_shift`` in ``eval_holidays.py``).

mP@k (revisited ``compute_map``, kappas 1, 5, 10): with ``pos`` the 1-based
junk-removed positions of the positives *found in the ranking* and
``kq = min(max(pos), k)``, ``P@k = #(pos <= kq) / kq``.  (Note the official
quirk: when the last positive found is within the top k, the denominator is its
position, not k.)  On a ranking shorter than the database, positives it never
reaches are simply not in ``pos``, exactly as in ``compute_map`` given a
truncated ``ranks`` array, so the cutoff is capped at the last positive found.
A query with no positive in its ranking has ``P@k = 0`` (``compute_map`` would
fail on ``max`` of an empty array there).
Queries without any positive for a protocol are skipped for that protocol
(the official ``nempty``), for both mAP and mP@k.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .datasets import Dataset, Query

__all__ = [
    "KAPPAS",
    "compute_ap",
    "positive_positions",
    "average_precision",
    "precision_at_k",
    "ns_score",
    "evaluate",
]

KAPPAS = (1, 5, 10)


def compute_ap(ranks: Sequence[int] | np.ndarray, n_positives: int) -> float:
    """Trapezoidal average precision of one query.

    ``ranks``: sorted 0-based positions (in the ranking with junk removed) of
    the positives that were retrieved; ``n_positives``: total number of
    positives, retrieved or not.  Same value as revisitop ``compute_ap``,
    Oxford ``compute_ap.cpp`` and Holidays ``score_ap_from_ranks_1``.
    """
    if n_positives <= 0:
        raise ValueError("compute_ap needs n_positives >= 1")
    ranks = np.asarray(ranks, dtype=np.float64).ravel()
    if ranks.size > n_positives:
        raise ValueError(f"{ranks.size} ranks for only {n_positives} positives")
    if ranks.size == 0:
        return 0.0
    if np.any(np.diff(ranks) <= 0) or ranks[0] < 0:
        raise ValueError("ranks must be distinct, non-negative and increasing")
    j = np.arange(ranks.size, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        p0 = np.where(ranks == 0, 1.0, j / np.where(ranks == 0, 1.0, ranks))
    p1 = (j + 1.0) / (ranks + 1.0)
    return float(np.sum((p0 + p1) / 2.0) / n_positives)


def _clean_ranking(ranking, n_images: int) -> np.ndarray:
    r = np.asarray(ranking)
    if r.ndim != 1:
        r = r.ravel()
    if r.size == 0:
        return r.astype(np.int64)
    if not np.issubdtype(r.dtype, np.integer):
        if not np.all(np.equal(np.mod(r, 1), 0)):
            raise ValueError("rankings must hold integer database indices")
    r = r.astype(np.int64)
    if r.min() < 0 or r.max() >= n_images:
        raise ValueError(f"ranking index out of range [0, {n_images})")
    # keep the first occurrence of a repeated index, order otherwise unchanged
    _, first = np.unique(r, return_index=True)
    if first.size != r.size:
        r = r[np.sort(first)]
    return r


def positive_positions(
    ranking: np.ndarray,
    positives: np.ndarray,
    junk: np.ndarray,
    n_images: int,
    exclude: int | None = None,
) -> np.ndarray:
    """0-based positions of the positives in ``ranking`` once the junk images
    (and ``exclude``, the Holidays query itself) have been removed from it.

    ``ranking`` must already be clean (distinct, in range).  Junk wins over
    positive when an image is in both (as in ``compute_ap.cpp``).
    """
    drop = np.zeros(n_images, dtype=bool)
    if len(junk):
        drop[np.asarray(junk, dtype=np.int64)] = True
    if exclude is not None:
        drop[int(exclude)] = True
    is_pos = np.zeros(n_images, dtype=bool)
    if len(positives):
        is_pos[np.asarray(positives, dtype=np.int64)] = True
    kept = ranking[~drop[ranking]]
    return np.flatnonzero(is_pos[kept]).astype(np.int64)


def average_precision(positions: np.ndarray, n_positives: int) -> float:
    return compute_ap(positions, n_positives)


def precision_at_k(
    positions: np.ndarray, n_positives: int, kappas: Sequence[int] = KAPPAS
) -> list[float]:
    """Revisited ``compute_map`` precision at k (see module docstring)."""
    pos = np.asarray(positions, dtype=np.float64) + 1.0  # 1-based
    if pos.size > n_positives:
        raise ValueError(f"{pos.size} positions for only {n_positives} positives")
    if pos.size == 0:
        return [0.0 for _ in kappas]
    last = float(pos.max())
    out = []
    for k in kappas:
        kq = min(last, float(k))
        out.append(float(np.sum(pos <= kq) / kq))
    return out


def ns_score(ranking: np.ndarray, group: np.ndarray) -> int:
    """UKBench: how many of the group (itself included) are in the top 4."""
    top = np.asarray(ranking, dtype=np.int64)[:4]
    return int(np.isin(top, np.asarray(group, dtype=np.int64)).sum())


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def _protocol_sets(q: Query) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Revisited protocols: name -> (positives, junk)."""
    easy = q.easy if q.easy is not None else np.empty(0, np.int64)
    hard = q.hard if q.hard is not None else np.empty(0, np.int64)
    junk = q.revisited_junk if q.revisited_junk is not None else q.junk
    return {
        "easy": (easy, np.union1d(junk, hard)),
        "medium": (np.union1d(easy, hard), junk),
        "hard": (hard, np.union1d(junk, easy)),
    }


def evaluate(dataset: Dataset, rankings: Sequence[np.ndarray]) -> dict:
    """Score ``rankings`` (one per ``dataset.queries``) with the dataset's
    official metric.

    Returns ``{"metric", "value", "queries", "images", "per_query"}``:

    * mAP sets: ``value`` = mAP in 0..1 over the queries with at least one
      positive; ``per_query`` = ``[{"query": name, "ap": float | None}]``
      (None: no positive, skipped).
    * ukbench: ``value`` = N-S score in 0..4; ``per_query`` =
      ``[{"query": name, "score": int}]``.
    * revisited sets also carry ``"easy"``, ``"medium"``, ``"hard"`` (mAPs),
      ``"mp@k"`` = ``{"easy": [P@1, P@5, P@10], "medium": [...], "hard":
      [...]}``, ``"kappas"`` and ``"skipped"`` (queries without positives per
      protocol); ``value`` = Medium mAP and ``per_query`` entries hold
      ``easy``/``medium``/``hard`` APs (None when skipped) with ``ap`` = Medium.

    ``value`` is NaN when no query could be scored.
    """
    queries = dataset.queries
    if len(rankings) != len(queries):
        raise ValueError(f"{len(rankings)} rankings for {len(queries)} queries")
    n_images = len(dataset.images)
    ranks = [_clean_ranking(r, n_images) for r in rankings]
    base = {"queries": len(queries), "images": n_images}

    if dataset.metric == "ns":
        per = []
        for q, r in zip(queries, ranks):
            per.append({"query": q.name, "score": ns_score(r, q.positives)})
        value = _mean([p["score"] for p in per])
        return {"metric": "ns", "value": value, **base, "per_query": per}

    if dataset.metric != "mAP":
        raise ValueError(f"unknown metric {dataset.metric!r}")

    holidays = dataset.name == "holidays"
    revisited = dataset.name in ("roxford5k", "rparis6k") or any(
        q.easy is not None or q.hard is not None for q in queries
    )

    if not revisited:
        per = []
        aps = []
        for q, r in zip(queries, ranks):
            exclude = q.index if holidays else None
            pos = q.positives
            if holidays and q.index is not None:
                pos = pos[pos != q.index]
            if len(pos) == 0:
                per.append({"query": q.name, "ap": None})
                continue
            ap = compute_ap(positive_positions(r, pos, q.junk, n_images, exclude), len(pos))
            aps.append(ap)
            per.append({"query": q.name, "ap": ap})
        return {"metric": "mAP", "value": _mean(aps), **base, "per_query": per}

    protocols = ("easy", "medium", "hard")
    aps: dict[str, list[float]] = {p: [] for p in protocols}
    prs: dict[str, list[list[float]]] = {p: [] for p in protocols}
    skipped = {p: 0 for p in protocols}
    per = []
    for q, r in zip(queries, ranks):
        entry: dict = {"query": q.name}
        for p, (pos, junk) in _protocol_sets(q).items():
            if len(pos) == 0:
                skipped[p] += 1
                entry[p] = None
                continue
            positions = positive_positions(r, pos, junk, n_images)
            ap = compute_ap(positions, len(pos))
            aps[p].append(ap)
            prs[p].append(precision_at_k(positions, len(pos), KAPPAS))
            entry[p] = ap
        entry["ap"] = entry["medium"]
        per.append(entry)
    maps = {p: _mean(aps[p]) for p in protocols}
    mpk = {
        p: ([float(v) for v in np.mean(prs[p], axis=0)] if prs[p] else [float("nan")] * len(KAPPAS))
        for p in protocols
    }
    return {
        "metric": "mAP",
        "value": maps["medium"],
        **base,
        **maps,
        "mp@k": mpk,
        "kappas": list(KAPPAS),
        "skipped": skipped,
        "per_query": per,
    }
