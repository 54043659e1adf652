"""Metric tests: every expected value is worked out by hand in the comments.

AP rule (revisitop compute_ap == compute_ap.cpp == eval_holidays
score_ap_from_ranks_1): for the k-th positive (0-based) at 0-based position r
of the junk-free ranking, add (p0 + p1) / 2 / n_pos with p0 = k / r (1 if
r == 0) and p1 = (k + 1) / (r + 1).
"""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.evaluation.datasets import Dataset, Query
from retrieval.evaluation.evaluate import compute_ap, evaluate


def _i(*v):
    return np.asarray(v, dtype=np.int64)


def _q(name, positives, junk=(), index=None, **kw):
    return Query(name=name, path=f"/x/{name}.jpg", bbox=None, positives=_i(*positives),
                 junk=_i(*junk), index=index, **kw)


def _ds(name, n_images, queries, metric="mAP"):
    return Dataset(name=name, root="/x", metric=metric,
                   images=[f"/x/{i:03d}.jpg" for i in range(n_images)], queries=queries)


# --------------------------------------------------------------------------
# compute_ap


def test_compute_ap_hand_values():
    # positives at 1-based ranks 1 and 3 of 2 positives (0-based 0 and 2):
    #   k=0, r=0: p0=1, p1=1/1      -> (1 + 1) / 2       = 1
    #   k=1, r=2: p0=1/2, p1=2/3    -> (1/2 + 2/3) / 2   = 7/12
    #   AP = (1 + 7/12) / 2 = 19/24
    assert compute_ap([0, 2], 2) == pytest.approx(19 / 24)
    # a single positive at 0-based 1: (0/1 + 1/2) / 2 = 1/4
    assert compute_ap([1], 1) == pytest.approx(1 / 4)
    # perfect ranking of 3 positives -> 1
    assert compute_ap([0, 1, 2], 3) == pytest.approx(1.0)
    # positive at 0 of 3 positives, the other two never retrieved:
    #   (1 + 1) / 2 / 3 = 1/3  (unretrieved positives still count in n_pos)
    assert compute_ap([0], 3) == pytest.approx(1 / 3)
    assert compute_ap([], 4) == 0.0
    with pytest.raises(ValueError):
        compute_ap([0], 0)


def _ap_cpp(pos: set, amb: set, ranked: list) -> float:
    """Literal port of the original Oxford compute_ap.cpp."""
    old_recall, old_precision, ap = 0.0, 1.0, 0.0
    intersect, j = 0, 0
    for x in ranked:
        if x in amb:
            continue
        if x in pos:
            intersect += 1
        recall = intersect / float(len(pos))
        precision = intersect / (j + 1.0)
        ap += (recall - old_recall) * ((old_precision + precision) / 2.0)
        old_recall, old_precision = recall, precision
        j += 1
    return ap


def _ap_holidays(query, ranked: list, gt: set) -> float:
    """Literal port of eval_holidays.py (rank_shift + score_ap_from_ranks_1)."""
    tp_ranks, rank_shift = [], 0
    for rank, name in enumerate(ranked):
        if name == query:
            rank_shift = -1
        elif name in gt:
            tp_ranks.append(rank + rank_shift)
    ap, step = 0.0, 1.0 / len(gt)
    for ntp, rank in enumerate(tp_ranks):
        p0 = 1.0 if rank == 0 else ntp / float(rank)
        p1 = (ntp + 1) / float(rank + 1)
        ap += (p1 + p0) * step / 2.0
    return ap


def test_evaluate_matches_official_compute_ap_cpp_on_random_rankings():
    rng = np.random.default_rng(0)
    n = 40
    for trial in range(60):
        perm = rng.permutation(n)
        pos = perm[: rng.integers(1, 8)]
        junk = perm[8: 8 + rng.integers(0, 6)]
        ranking = rng.permutation(n)[: rng.integers(1, n + 1)]  # full or prefix
        ds = _ds("oxford5k", n, [_q("q", sorted(pos), sorted(junk))])
        got = evaluate(ds, [ranking])["value"]
        want = _ap_cpp(set(pos.tolist()), set(junk.tolist()), ranking.tolist())
        assert got == pytest.approx(want, abs=1e-6), trial


def test_evaluate_matches_official_eval_holidays_on_random_rankings():
    rng = np.random.default_rng(1)
    n = 30
    for trial in range(60):
        qi = int(rng.integers(n))
        others = [i for i in rng.permutation(n)[:6].tolist() if i != qi][:5]
        ranking = rng.permutation(n)[: rng.integers(1, n + 1)]
        ds = _ds("holidays", n, [_q("q", sorted(others), index=qi)])
        got = evaluate(ds, [ranking])["value"]
        want = _ap_holidays(qi, ranking.tolist(), set(others))
        assert got == pytest.approx(want, abs=1e-12), trial


# --------------------------------------------------------------------------
# original protocol: junk, ties, missing positives


def test_junk_is_removed_not_negative():
    # images 0..3; positive {2}, junk {1}; ranking [0, 1, 2, 3]
    # junk removed -> [0, 2, 3]: positive at 0-based 1 -> (0/1 + 1/2)/2 = 1/4
    # (if junk counted as a negative: position 2 -> (0 + 1/3)/2 = 1/6)
    ds = _ds("paris6k", 4, [_q("q", [2], junk=[1])])
    res = evaluate(ds, [_i(0, 1, 2, 3)])
    assert res["value"] == pytest.approx(1 / 4)
    assert res["metric"] == "mAP" and res["queries"] == 1 and res["images"] == 4
    # junk ranked first does not hurt: [1, 2, 0, 3] -> [2, 0, 3] -> AP 1
    assert evaluate(ds, [_i(1, 2, 0, 3)])["value"] == pytest.approx(1.0)


def test_ties_use_the_given_order():
    # The ranking is taken as given (no re-sorting by index, no tie averaging):
    # [2, 0, 1] with positive {0}: position 1 -> 1/4 ; sorting would give 1.
    ds = _ds("oxford5k", 3, [_q("q", [0])])
    assert evaluate(ds, [_i(2, 0, 1)])["value"] == pytest.approx(1 / 4)
    assert evaluate(ds, [_i(0, 2, 1)])["value"] == pytest.approx(1.0)
    # repeated index keeps its first position: [2, 0, 2, 1] == [2, 0, 1]
    assert evaluate(ds, [_i(2, 0, 2, 1)])["value"] == pytest.approx(1 / 4)


def test_missing_positives_count_in_denominator():
    # positives {0, 5, 7}; ranking prefix [0, 1, 2] only reaches image 0:
    # AP = (1 + 1)/2 / 3 = 1/3 (5 and 7 count as ranked after everything)
    ds = _ds("oxford5k", 8, [_q("q", [0, 5, 7])])
    assert evaluate(ds, [_i(0, 1, 2)])["value"] == pytest.approx(1 / 3)
    # empty ranking -> 0
    assert evaluate(ds, [_i()])["value"] == 0.0


def test_map_is_mean_over_queries_and_skips_empty():
    # q1: positive at 0 -> 1 ; q2: positives {1, 3} in [0, 1, 2, 3]:
    #   positions 1 and 3 -> ((0 + 1/2)/2 + (1/3 + 2/4)/2)/2 = (1/4 + 5/12)/2 = 1/3
    # q3 has no positives: skipped.  mAP = (1 + 1/3)/2 = 2/3
    ds = _ds("oxford5k", 4, [_q("a", [0]), _q("b", [1, 3]), _q("c", [])])
    res = evaluate(ds, [_i(0, 1, 2, 3)] * 3)
    assert res["value"] == pytest.approx(2 / 3)
    assert res["per_query"][0]["ap"] == pytest.approx(1.0)
    assert res["per_query"][1]["ap"] == pytest.approx(1 / 3)
    assert res["per_query"][2]["ap"] is None


# --------------------------------------------------------------------------
# Holidays


def test_holidays_query_removed_from_its_own_ranking():
    # images 0=100000(q) 1=100001 2=100002 3=100100 4=100101 ; query 0, positives {1, 2}
    ds = _ds("holidays", 5, [_q("100000", [1, 2], index=0)])
    # ranking [0, 3, 1, 4, 2] -> self removed -> [3, 1, 4, 2]: positives at 1 and 3
    #   ((0 + 1/2)/2 + (1/3 + 2/4)/2) / 2 = (1/4 + 5/12)/2 = 1/3
    # (without self-exclusion: positions 2 and 4 -> (1/6 + 13/40)/2 = 59/240)
    assert evaluate(ds, [_i(0, 3, 1, 4, 2)])["value"] == pytest.approx(1 / 3)
    # self not first: [3, 0, 1, 2, 4] -> [3, 1, 2, 4]: positives at 1 and 2
    #   ((0 + 1/2)/2 + (1/2 + 2/3)/2) / 2 = (1/4 + 7/12)/2 = 5/12
    assert evaluate(ds, [_i(3, 0, 1, 2, 4)])["value"] == pytest.approx(5 / 12)
    # ranking without the query at all gives the same as with it removed
    assert evaluate(ds, [_i(3, 1, 4, 2)])["value"] == pytest.approx(1 / 3)


def test_self_exclusion_only_for_holidays():
    # the same ranking on an Oxford-style set: query image 0 is ranked and is
    # not a positive, so it counts as a negative: positions 2 and 4 -> 59/240
    ds = _ds("oxford5k", 5, [_q("q", [1, 2], index=0)])
    assert evaluate(ds, [_i(0, 3, 1, 4, 2)])["value"] == pytest.approx(59 / 240)


# --------------------------------------------------------------------------
# UKBench


def test_ukbench_ns_score():
    # 8 images, groups {0,1,2,3} and {4,5,6,7}; each positives set includes itself
    qs = [_q(f"u{i}", range(4 * (i // 4), 4 * (i // 4) + 4), index=i) for i in range(8)]
    ds = _ds("ukbench", 8, qs, metric="ns")
    # ranking [0..7] for every query: top 4 = {0,1,2,3} -> 4 for images 0-3, 0 for 4-7
    rankings = [np.arange(8) for _ in range(8)]
    # image 4: [4, 0, 5, 1, 6, ...] -> top 4 = 4, 0, 5, 1 -> 2 of its group
    rankings[4] = _i(4, 0, 5, 1, 6, 2, 7, 3)
    # image 5: [5, 6, 7, 4, ...] -> 4
    rankings[5] = _i(5, 6, 7, 4, 0, 1, 2, 3)
    # image 6: prefix [6] only -> 1 (itself counts)
    rankings[6] = _i(6)
    # image 7: [0, 1, 2, 7, 4] -> only 7 in the top 4 -> 1 (the 4 at rank 5 does not count)
    rankings[7] = _i(0, 1, 2, 7, 4)
    res = evaluate(ds, rankings)
    # (4 + 4 + 4 + 4 + 2 + 4 + 1 + 1) / 8 = 24/8 = 3.0
    assert res["metric"] == "ns"
    assert res["value"] == pytest.approx(3.0)
    assert [p["score"] for p in res["per_query"]] == [4, 4, 4, 4, 2, 4, 1, 1]


# --------------------------------------------------------------------------
# Revisited


def _rq(name, easy, hard, junk):
    easy, hard, junk = _i(*easy), _i(*hard), _i(*junk)
    return Query(name=name, path=f"/x/{name}.jpg", bbox=(0, 0, 1, 1),
                 positives=np.union1d(easy, hard), junk=junk,
                 easy=easy, hard=hard, revisited_junk=junk)


def test_revisited_protocols_hand_made_gnd():
    # 10 images.  Query A: easy {0, 3}, hard {5}, junk {1}; ranking 0..9.
    #  Easy  : pos {0,3}, junk {1,5} -> [0,2,3,4,6,...]: positions 0, 2
    #          AP = 19/24 ; 1-based pos [1,3], last=3:
    #          P@1 = 1/1 = 1, P@5: kq=min(3,5)=3 -> 2/3, P@10 -> 2/3
    #  Medium: pos {0,3,5}, junk {1} -> [0,2,3,4,5,...]: positions 0, 2, 4
    #          AP = (1 + 7/12 + (2/4 + 3/5)/2) / 3 = (1 + 7/12 + 11/20)/3 = 32/45
    #          1-based [1,3,5], last=5: P@1 = 1, P@5 = 3/5, P@10: kq=5 -> 3/5
    #  Hard  : pos {5}, junk {1,0,3} -> [2,4,5,...]: position 2
    #          AP = (0/2 + 1/3)/2 = 1/6 ; 1-based [3]: P@1 = 0/1 = 0,
    #          P@5: kq=3 -> 1/3, P@10 -> 1/3
    # Query B: easy {}, hard {2}, junk {}; ranking [2, 0, 1, 3..9]
    #  Easy skipped (no positive); Medium and Hard: pos {2} at 0 -> AP 1, P@k 1
    qa = _rq("A", [0, 3], [5], [1])
    qb = _rq("B", [], [2], [])
    ds = _ds("roxford5k", 10, [qa, qb])
    res = evaluate(ds, [np.arange(10), _i(2, 0, 1, 3, 4, 5, 6, 7, 8, 9)])
    assert res["easy"] == pytest.approx(19 / 24)                   # A only
    assert res["medium"] == pytest.approx((32 / 45 + 1) / 2)        # = 77/90
    assert res["hard"] == pytest.approx((1 / 6 + 1) / 2)            # = 7/12
    assert res["value"] == pytest.approx(77 / 90)
    assert res["mp@k"]["easy"] == pytest.approx([1.0, 2 / 3, 2 / 3])
    assert res["mp@k"]["medium"] == pytest.approx([1.0, (3 / 5 + 1) / 2, (3 / 5 + 1) / 2])
    assert res["mp@k"]["hard"] == pytest.approx([0.5, (1 / 3 + 1) / 2, (1 / 3 + 1) / 2])
    assert res["skipped"] == {"easy": 1, "medium": 0, "hard": 0}
    assert res["per_query"][1]["easy"] is None
    assert res["queries"] == 2 and res["images"] == 10


def test_revisited_mpk_with_unretrieved_positive():
    # easy {0, 9}; prefix ranking [0, 1, 2]: 9 never ranked, so as in revisitop's
    # compute_map the cutoff is capped at the last positive found (position 1):
    # kq = 1 for every k, P@1 = P@5 = P@10 = 1.  AP = (1 + 1)/2 / 2 = 1/2
    ds = _ds("rparis6k", 10, [_rq("A", [0, 9], [], [])])
    res = evaluate(ds, [_i(0, 1, 2)])
    assert res["mp@k"]["easy"] == pytest.approx([1.0, 1.0, 1.0])
    assert res["easy"] == pytest.approx(0.5)
    # no positive ranked at all -> P@k = 0, AP = 0
    res = evaluate(ds, [_i(1, 2)])
    assert res["mp@k"]["medium"] == [0.0, 0.0, 0.0] and res["medium"] == 0.0


def _official_compute_map(ranks, gnd, kappas):
    """Port of revisitop compute_map (ranks: [n_images, n_queries])."""
    m = 0.0
    nq = len(gnd)
    pr = np.zeros(len(kappas))
    nempty = 0
    for i in range(nq):
        qgnd = np.array(gnd[i]["ok"])
        if qgnd.shape[0] == 0:
            nempty += 1
            continue
        qgndj = np.array(gnd[i]["junk"])
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
        junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgndj)]
        k = 0
        ij = 0
        if len(junk):
            ip = 0
            while ip < len(pos):
                while ij < len(junk) and pos[ip] > junk[ij]:
                    k += 1
                    ij += 1
                pos[ip] = pos[ip] - k
                ip += 1
        ap = 0.0
        step = 1.0 / len(qgnd)
        for j, rank in enumerate(pos):
            p0 = 1.0 if rank == 0 else float(j) / rank
            p1 = float(j + 1) / (rank + 1)
            ap += (p0 + p1) * step / 2.0
        m += ap
        pos = pos + 1
        for j, kap in enumerate(kappas):
            kq = min(max(pos), kap)
            pr[j] += (pos <= kq).sum() / kq
    return m / (nq - nempty), pr / (nq - nempty)


def test_revisited_matches_official_compute_map_on_random_gnd():
    rng = np.random.default_rng(2)
    n, nq = 60, 7
    queries, gnd_e, gnd_m, gnd_h = [], [], [], []
    for qi in range(nq):
        perm = rng.permutation(n)
        easy = perm[: rng.integers(0, 6)]
        hard = perm[6: 6 + rng.integers(1, 6)]
        junk = perm[12: 12 + rng.integers(0, 6)]
        queries.append(_rq(f"q{qi}", sorted(easy), sorted(hard), sorted(junk)))
        gnd_e.append({"ok": easy, "junk": np.concatenate([junk, hard])})
        gnd_m.append({"ok": np.concatenate([easy, hard]), "junk": junk})
        gnd_h.append({"ok": hard, "junk": np.concatenate([junk, easy])})
    ranks = np.stack([rng.permutation(n) for _ in range(nq)], axis=1)  # full rankings
    res = evaluate(_ds("roxford5k", n, queries), [ranks[:, i] for i in range(nq)])
    for name, g in (("easy", gnd_e), ("medium", gnd_m), ("hard", gnd_h)):
        m, pr = _official_compute_map(ranks, g, [1, 5, 10])
        assert res[name] == pytest.approx(m, abs=1e-12), name
        assert res["mp@k"][name] == pytest.approx(pr.tolist(), abs=1e-12), name


def test_revisited_matches_official_compute_map_on_short_rankings():
    # Rankings of 15 of the 60 images (as a search returning its top 15): positives
    # beyond the prefix are never found, and compute_map, given the truncated ranks
    # array, caps the P@k cutoff at the last positive found.  The port above fails
    # (max of an empty array) on a query with no positive found, as the original does,
    # so every protocol's first positive is put inside the prefix.
    rng = np.random.default_rng(5)
    n, nq, depth = 60, 9, 15
    queries, gnd_e, gnd_m, gnd_h, rankings = [], [], [], [], []
    for qi in range(nq):
        perm = rng.permutation(n)
        easy = perm[: rng.integers(1, 8)]
        hard = perm[8: 8 + rng.integers(1, 8)]
        junk = perm[16: 16 + rng.integers(0, 6)]
        queries.append(_rq(f"q{qi}", sorted(easy), sorted(hard), sorted(junk)))
        gnd_e.append({"ok": easy, "junk": np.concatenate([junk, hard])})
        gnd_m.append({"ok": np.concatenate([easy, hard]), "junk": junk})
        gnd_h.append({"ok": hard, "junk": np.concatenate([junk, easy])})
        order = rng.permutation(n)
        first = [easy[0], hard[0]]
        order = np.concatenate([[order[0]], first, [i for i in order[1:] if i not in first]])
        rankings.append(order[:depth])
    res = evaluate(_ds("rparis6k", n, queries), rankings)
    ranks = np.stack(rankings, axis=1)
    unreached = 0
    for name, g in (("easy", gnd_e), ("medium", gnd_m), ("hard", gnd_h)):
        unreached += sum(not np.isin(q["ok"], ranks[:, i]).all() for i, q in enumerate(g))
        m, pr = _official_compute_map(ranks, g, [1, 5, 10])
        assert res[name] == pytest.approx(m, abs=1e-12), name
        assert res["mp@k"][name] == pytest.approx(pr.tolist(), abs=1e-12), name
    assert unreached > 0  # the case this test is about does occur


# --------------------------------------------------------------------------
# input validation


def test_rankings_validation():
    ds = _ds("oxford5k", 3, [_q("q", [0])])
    with pytest.raises(ValueError):
        evaluate(ds, [])                       # one ranking per query
    with pytest.raises(ValueError):
        evaluate(ds, [_i(0, 3)])               # out of range
    with pytest.raises(ValueError):
        evaluate(ds, [_i(-1, 0)])
