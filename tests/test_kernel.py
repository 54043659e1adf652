"""Native patch-distance kernel (retrieval.engine.kernel) against a NumPy reference."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from retrieval import _kernel
from retrieval.engine import kernel as K

ISAS = ["avx512", "avx2", "generic"]
SUPPORTED = set(_kernel.supported_isas())
RTOL, ATOL = 1e-5, 1e-6  # ATOL only matters for distances below 0.1


# ---------------------------------------------------------------- reference (NumPy, float64)
def reference(query, db, offsets, candidates=None, aggregate="min"):
    """dist[m] and the full per-image distance matrices, from q @ x.T in float64."""
    q = query.astype(np.float64)
    x = db.astype(np.float64)
    cand = np.arange(len(offsets) - 1) if candidates is None else candidates
    dist, mats = [], []
    for i in cand:
        dd = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * (q @ x[offsets[i]:offsets[i + 1]].T)))
        mats.append(dd)
        if dd.size == 0:
            dist.append(np.inf)
        elif aggregate == "min":
            dist.append(dd.min())
        else:
            dist.append(dd.min(axis=1).mean())
    return np.array(dist), mats


def unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_db(rng, d, n_images=60, max_patches=30):
    counts = rng.integers(1, max_patches + 1, size=n_images)
    counts[:3] = [1, max_patches, 1]  # always single-patch and full images
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return unit(rng, int(offsets[-1]), d), offsets


def assert_close(got, want):
    got = np.asarray(got, dtype=np.float64)
    assert got.shape == want.shape
    err = np.abs(got - want)
    bad = err > RTOL * np.abs(want) + ATOL
    assert not bad.any(), f"max abs err {err.max():.3g}, rel {np.max(err / np.maximum(want, 1e-30)):.3g}"


def check_pairs(dist, qi, dj, mats, aggregate):
    for k, dd in enumerate(mats):
        assert 0 <= qi[k] < dd.shape[0] and 0 <= dj[k] < dd.shape[1]
        # The deciding pair is the closest pair of the image ...
        assert dd[qi[k], dj[k]] <= dd.min() * (1 + RTOL) + ATOL
        if aggregate == "min":  # ... and realises the image distance.
            assert abs(dd[qi[k], dj[k]] - dist[k]) <= RTOL * dist[k] + ATOL


@pytest.fixture(params=ISAS)
def isa(request):
    if request.param not in SUPPORTED:
        pytest.skip(f"CPU lacks {request.param}")
    _kernel.set_isa(request.param)
    assert _kernel.isa() == request.param
    yield request.param
    _kernel.set_isa("auto")


# ---------------------------------------------------------------- correctness
@pytest.mark.parametrize("d", [3, 17, 128, 256])
@pytest.mark.parametrize("aggregate", ["min", "mean-min"])
def test_matches_reference(isa, d, aggregate):
    rng = np.random.default_rng(d)
    db, offsets = make_db(rng, d)
    for nq in (1, 7, 30, 37):  # 37 > one AVX2 query block (32 lanes)
        q = unit(rng, nq, d)
        dist, qi, dj = K.patch_distances(q, db, offsets, aggregate=aggregate)
        want, mats = reference(q, db, offsets, aggregate=aggregate)
        assert dist.dtype == np.float32 and qi.dtype == np.int32 and dj.dtype == np.int32
        assert_close(dist, want)
        check_pairs(dist, qi, dj, mats, aggregate)


@pytest.mark.parametrize("aggregate", ["min", "mean-min"])
def test_candidates_subset(isa, aggregate):
    rng = np.random.default_rng(1)
    db, offsets = make_db(rng, 128, n_images=80)
    q = unit(rng, 30, 128)
    # Unsorted, with repeats, consecutive runs and isolated images.
    cand = np.array([5, 6, 7, 79, 0, 3, 3, 40, 41, 12], dtype=np.int64)
    dist, qi, dj = K.patch_distances(q, db, offsets, candidates=cand, aggregate=aggregate)
    want, mats = reference(q, db, offsets, cand, aggregate)
    assert_close(dist, want)
    check_pairs(dist, qi, dj, mats, aggregate)
    full, _, _ = K.patch_distances(q, db, offsets, aggregate=aggregate)
    np.testing.assert_array_equal(dist, full[cand])
    empty = K.patch_distances(q, db, offsets, candidates=np.zeros(0, np.int64))
    assert all(a.shape == (0,) for a in empty)


@pytest.mark.parametrize("aggregate", ["min", "mean-min"])
def test_batch(isa, aggregate):
    rng = np.random.default_rng(2)
    d = 64
    db, offsets = make_db(rng, d, n_images=50)
    sizes = [1, 30, 5, 40, 13]
    qs = [unit(rng, n, d) for n in sizes]
    qoff = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    cand = np.array([3, 4, 5, 49, 0], dtype=np.int64)
    for c in (None, cand):
        got = K.patch_distances_batch(np.concatenate(qs), qoff, db, offsets, c, aggregate)
        assert got.shape == (len(sizes), len(offsets) - 1 if c is None else len(c))
        for k, q in enumerate(qs):
            want, _ = reference(q, db, offsets, c, aggregate)
            assert_close(got[k], want)
            single, _, _ = K.patch_distances(q, db, offsets, c, aggregate)
            np.testing.assert_allclose(got[k], single, rtol=1e-6)


@pytest.mark.parametrize("aggregate", ["min", "mean-min"])
@pytest.mark.parametrize("half", [False, True])
def test_each_query_its_own_candidates(isa, aggregate, half):
    """patch_distances_each gives every query exactly what patch_distances gives it alone
    with its own candidates: same distances and deciding pairs, bit for bit."""
    rng = np.random.default_rng(7)
    d = 96
    db, offsets = make_db(rng, d, n_images=120)
    db = db.astype(np.float16) if half else db
    sizes = [30, 1, 37, 5, 30]  # 37 > one AVX2 query block
    qs = [unit(rng, n, d) for n in sizes]
    qoff = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    pools = [np.sort(rng.choice(120, 40, replace=False)),  # scattered
             np.arange(10, 60),                             # one consecutive run
             np.zeros(0, np.int64),                         # no candidates
             np.array([119, 0, 3, 3, 64]),                  # unsorted, a repeat
             np.arange(120)]                                # every image
    cand = np.concatenate(pools).astype(np.int64)
    coff = np.concatenate([[0], np.cumsum([len(p) for p in pools])]).astype(np.int64)
    for threads in (1, 2):
        dist, qi, dj = K.patch_distances_each(np.concatenate(qs), qoff, db, offsets, cand, coff,
                                              aggregate, threads)
        assert dist.shape == qi.shape == dj.shape == (len(cand),)
        for k, (q, pool) in enumerate(zip(qs, pools)):
            alone = K.patch_distances(q, db, offsets, pool.astype(np.int64), aggregate)
            for got, want in zip((dist, qi, dj), alone):
                np.testing.assert_array_equal(got[coff[k]:coff[k + 1]], want)
        want, _ = reference(qs[0], db.astype(np.float32), offsets, pools[0], aggregate)
        assert_close(dist[:coff[1]], want)


def test_each_rejects_bad_candidate_offsets():
    rng = np.random.default_rng(8)
    db, offsets = make_db(rng, 16, n_images=5)
    q = unit(rng, 4, 16)
    qoff = np.array([0, 2, 4])
    cand = np.array([0, 1, 4])
    for coff in ([0, 3], [0, 1, 2], [1, 2, 3], [0, 4, 3]):  # count, end, start, order
        with pytest.raises(ValueError, match="candidate_offsets"):
            K.patch_distances_each(q, qoff, db, offsets, cand, np.array(coff), "min")
    with pytest.raises(ValueError, match="out of range"):
        K.patch_distances_each(q, qoff, db, offsets, np.array([0, 5]), np.array([0, 1, 2]), "min")
    with pytest.raises(ValueError, match="candidates must be given"):
        K.patch_distances_each(q, qoff, db, offsets, None, np.array([0, 0, 0]), "min")


def test_the_checks_over_every_image_name_what_is_wrong():
    """The loops that check each image's offsets, each candidate and each query's offsets
    (built to throw only when a check fails) still name the bad value."""
    rng = np.random.default_rng(9)
    db, offsets = make_db(rng, 16, n_images=5)
    q = unit(rng, 4, 16)
    bad = offsets.copy()
    bad[3] = bad[2] - 1
    with pytest.raises(ValueError, match="^offsets must be non-decreasing$"):
        K.patch_distances(q, db, bad)
    with pytest.raises(ValueError, match=r"^candidates\[2\] = 7 is out of range \[0, 5\)$"):
        K.patch_distances(q, db, offsets, np.array([0, 4, 7]))
    with pytest.raises(ValueError, match="^query_offsets must be strictly increasing"):
        K.patch_distances_batch(q, np.array([0, 2, 2, 4]), db, offsets)
    with pytest.raises(ValueError, match="^candidate_offsets must be non-decreasing$"):
        K.patch_distances_each(q, np.array([0, 1, 2, 4]), db, offsets, np.array([0, 1, 4]), np.array([0, 2, 1, 3]),
                               "min")


@pytest.mark.parametrize("aggregate", ["min", "mean-min"])
def test_float16_db(isa, aggregate):
    rng = np.random.default_rng(3)
    for d in (17, 256):
        db, offsets = make_db(rng, d)
        db16 = db.astype(np.float16)
        q = unit(rng, 30, d)
        dist, qi, dj = K.patch_distances(q, db16, offsets, aggregate=aggregate)
        want, mats = reference(q, db16.astype(np.float32), offsets, aggregate=aggregate)
        assert_close(dist, want)
        check_pairs(dist, qi, dj, mats, aggregate)


def test_near_duplicates_are_accurate(isa):
    """sqrt(2 - 2*dot) cancels as dot -> 1; copies of query patches must still match."""
    rng = np.random.default_rng(4)
    db, offsets = make_db(rng, 128, n_images=20)
    q = db[offsets[7] + 0:offsets[7] + 1].copy()  # image 7's first patch, exactly
    q = np.concatenate([q, unit(rng, 3, 128)])
    jitter = db[offsets[9]] + 1e-3 * unit(rng, 1, 128)[0]
    q = np.concatenate([q, (jitter / np.linalg.norm(jitter))[None].astype(np.float32)])
    for aggregate in ("min", "mean-min"):
        dist, qi, dj = K.patch_distances(q, db, offsets, aggregate=aggregate)
        want, _ = reference(q, db, offsets, aggregate=aggregate)
        assert_close(dist, want)
    dist, qi, dj = K.patch_distances(q, db, offsets)
    assert dist[7] < 1e-3 and (qi[7], dj[7]) == (0, 0)
    assert 5e-4 < dist[9] < 2e-3 and (qi[9], dj[9]) == (4, 0)


def test_empty_images_and_threads(isa):
    rng = np.random.default_rng(5)
    db = unit(rng, 10, 32)
    offsets = np.array([0, 4, 4, 10, 10], dtype=np.int64)  # images 1 and 3 are empty
    q = unit(rng, 6, 32)
    dist, qi, dj = K.patch_distances(q, db, offsets)
    assert np.isinf(dist[[1, 3]]).all() and (qi[[1, 3]] == -1).all() and (dj[[1, 3]] == -1).all()
    want, _ = reference(q, db, offsets)
    assert_close(dist[[0, 2]], want[[0, 2]])
    big, offs = make_db(rng, 32, n_images=300)
    a = K.patch_distances(q, big, offs, threads=1)
    b = K.patch_distances(q, big, offs, threads=2)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------- dispatch
def test_describe_and_env_override():
    assert K.summary().startswith("retrieval._kernel ")
    assert _kernel.isa() in K.summary()
    code = "from retrieval.engine import kernel as K; from retrieval import _kernel; print(_kernel.isa()); print(K.summary())"
    for want in SUPPORTED:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, "RETRIEVAL_KERNEL_ISA": want}, check=True)
        assert out.stdout.split()[0] == want
    for bad in ({"avx512", "avx2", "generic"} - SUPPORTED) | {"sse9"}:
        out = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True,
                             text=True, env={**os.environ, "RETRIEVAL_KERNEL_ISA": bad},
                             check=True)
        assert out.stdout.split()[0] in SUPPORTED and bad in out.stdout  # fell back, said so
        assert "RuntimeWarning" in out.stderr
    with pytest.raises(ValueError):
        _kernel.set_isa("sse9")


def test_missing_extension_raises_helpful_importerror():
    code = ("import sys; sys.modules['retrieval._kernel'] = None\n"
            "try:\n    import retrieval.engine.kernel\nexcept ImportError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("ERR") and "C++17" in out.stdout


# ---------------------------------------------------------------- validation
def test_bad_inputs_raise_valueerror():
    rng = np.random.default_rng(6)
    db, offsets = make_db(rng, 16, n_images=5)
    q = unit(rng, 3, 16)
    n_img = len(offsets) - 1
    bad_calls = [
        lambda: K.patch_distances(q, db.astype(np.float64), offsets),           # db dtype
        lambda: K.patch_distances(q, np.asfortranarray(db), offsets),           # not C order
        lambda: K.patch_distances(q, db[:, :8], offsets),                       # strided
        lambda: K.patch_distances(q, db.ravel(), offsets),                      # 1-D db
        lambda: K.patch_distances(q[:, :8], db, offsets),                       # d mismatch
        lambda: K.patch_distances(q[:0], db, offsets),                          # no patches
        lambda: K.patch_distances(q.astype(np.int32), db, offsets),             # int query
        lambda: K.patch_distances(q, db, offsets[::-1].copy()),                 # decreasing
        lambda: K.patch_distances(q, db, offsets + len(db)),                    # past the end
        lambda: K.patch_distances(q, db, offsets - 1),                          # negative
        lambda: K.patch_distances(q, db, offsets.astype(np.float64)),           # float offsets
        lambda: K.patch_distances(q, db, offsets, np.array([0, n_img])),        # cand range
        lambda: K.patch_distances(q, db, offsets, np.array([-1])),              # cand negative
        lambda: K.patch_distances(q, db, offsets, np.array([[0]])),             # cand 2-D
        lambda: K.patch_distances(q, db, offsets, aggregate="max"),             # aggregate
        lambda: K.patch_distances(q, db, offsets, threads=-1),                  # threads
        lambda: K.patch_distances_batch(q, np.array([0, 2]), db, offsets),      # qoff end
        lambda: K.patch_distances_batch(q, np.array([0, 0, 3]), db, offsets),   # empty query
        lambda: K.patch_distances_batch(q, np.array([1, 3]), db, offsets),      # qoff start
        lambda: K.patch_distances_batch(q, np.array([0]), db, offsets),         # no query
        # the raw binding validates too (no crash if the wrapper is bypassed)
        lambda: _kernel.distances(q, np.array([0, 3], np.int32), db, offsets, None, "min", 0,
                                  True),                                  # int32 qoff
        lambda: _kernel.distances(q, np.array([0, 3], np.int64), db, offsets[:-1] + 10**9,
                                  None, "min", 0, True),
    ]
    for k, call in enumerate(bad_calls):
        with pytest.raises(ValueError):
            call()
            pytest.fail(f"bad call #{k} did not raise")
