import numpy as np
import pytest

from retrieval.engine.whitening import PCAWhitening, l2_normalize


def _data(n=500, d=40, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) * np.linspace(3, 0.1, d)
    return (rng.normal(size=(n, d)) @ mix + 5).astype(np.float32)


def test_whitening_gives_identity_covariance_on_its_fit_data():
    x = _data()
    w = PCAWhitening(16, shrinkage=0.0).fit(x)
    z = w.whiten(x)
    assert z.shape == (500, 16)
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(np.cov(z, rowvar=False), np.eye(16), atol=2e-3)


def test_transform_is_l2_whiten_l2():
    x = _data()
    w = PCAWhitening(8).fit(x)
    out = w.transform(x[:10])
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    manual = (l2_normalize(x[:10]) - w.mean_) @ w.projection_
    np.testing.assert_allclose(out, l2_normalize(manual), atol=1e-5)


def test_shrinkage_follows_the_sample_size():
    """Few windows per dimension: eigenvalues shrunk all the way (a PCA rotation that
    keeps every direction, never the clamped whitening that collapsed small indexes);
    many: little shrinkage. Too few to estimate anything: not whitened at all."""
    small = PCAWhitening(256).fit(_data(n=30, d=40))
    assert small.fitted_ and small.shrinkage_ == 1.0 and small.output_dim == 40
    large = PCAWhitening(16).fit(_data(n=5000, d=40))
    assert large.shrinkage_ == pytest.approx(4 * 40 / 5000) and large.output_dim == 16
    tiny = PCAWhitening(16).fit(_data(n=1, d=40))
    assert not tiny.fitted_ and tiny.output_dim == 40
    np.testing.assert_allclose(tiny.transform(_data(n=3, d=40)), l2_normalize(_data(n=3, d=40)), atol=1e-6)


def test_streamed_fit_equals_one_shot_fit():
    x = _data(n=3000)
    one = PCAWhitening(16).fit(x)
    chunks = PCAWhitening(16).fit_chunks(x[i:i + 700] for i in range(0, 3000, 700))
    np.testing.assert_allclose(chunks.transform(x[:20]), one.transform(x[:20]), atol=1e-4)
    assert chunks.n_samples_ == 3000


def test_zero_disables():
    x = _data(n=10, d=40)
    off = PCAWhitening(0).fit(x)
    np.testing.assert_allclose(off.transform(x), l2_normalize(x), atol=1e-6)
    with pytest.raises(ValueError, match="dimension"):
        off.transform(x[:, :5])


def test_save_load_round_trip(tmp_path):
    x = _data()
    w = PCAWhitening(12).fit(x)
    w.save(tmp_path / "w.npz")
    back = PCAWhitening.load(tmp_path / "w.npz")
    np.testing.assert_array_equal(back.transform(x), w.transform(x))
    assert back.summary() == w.summary()
    assert not list(tmp_path.glob("*.tmp*"))
    (tmp_path / "w.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="w.npz"):
        PCAWhitening.load(tmp_path / "w.npz")


@pytest.mark.parametrize("n, d", [(30, 40), (500, 40), (100, 300)])
def test_shrinkage_estimated_from_the_data_is_sklearns(n, d):
    """Issue 23 row 19: "ledoit-wolf" and "oas", computed from the streamed sums, give
    sklearn.covariance's values on the L2-normalized windows."""
    covariance = pytest.importorskip("sklearn.covariance", reason="scikit-learn is not installed")
    x = _data(n=n, d=d, seed=n + d).astype(np.float64)
    unit = l2_normalize(x).astype(np.float64)
    streamed = PCAWhitening(16, shrinkage="ledoit-wolf").fit_chunks([x[: n // 3], x[n // 3:]])
    assert streamed.shrinkage_ == pytest.approx(covariance.ledoit_wolf_shrinkage(unit), rel=1e-6)
    oas = PCAWhitening(16, shrinkage="oas").fit(x)
    assert oas.shrinkage_ == pytest.approx(covariance.OAS().fit(unit).shrinkage_, rel=1e-6)
    assert PCAWhitening(16).fit(x).shrinkage_ == pytest.approx(min(1, 4 * d / n))
    with pytest.raises(ValueError, match="ledoit-wolf"):
        PCAWhitening(16, shrinkage="median").fit(x)


def test_ledoit_wolf_with_images_as_the_sample_size(tmp_path):
    """Issue 23 row 19: an image's windows are not independent samples, so
    "ledoit-wolf-images" rescales Ledoit-Wolf's estimate (which falls as 1/n) from n
    windows to n / windows_per_image images; with one window per image it is Ledoit-Wolf."""
    x = _data(n=600, d=40, seed=3)
    lw = PCAWhitening(16, shrinkage="ledoit-wolf").fit(x).shrinkage_
    assert PCAWhitening(16, shrinkage="ledoit-wolf-images").fit(x).shrinkage_ == pytest.approx(lw)
    per_image = PCAWhitening(16, shrinkage="ledoit-wolf-images").fit_chunks([x[:300], x[300:]], windows_per_image=6)
    assert per_image.shrinkage_ == pytest.approx(min(1.0, 6 * lw)) and per_image.shrinkage_ > lw
    with pytest.raises(ValueError, match="whole images of 7"):
        PCAWhitening(16).fit_chunks([x[:300]], windows_per_image=7)


def test_the_rule_is_saved_and_files_from_before_read_as_auto(tmp_path):
    """The whitening file says which rule fitted it; one saved before the rule was stored
    was fitted by "auto", and still reads (and transforms) as it did."""
    x = _data()
    w = PCAWhitening(12, shrinkage="ledoit-wolf-images").fit(x)
    w.save(tmp_path / "w.npz")
    assert PCAWhitening.load(tmp_path / "w.npz").summary()["rule"] == "ledoit-wolf-images"
    old = PCAWhitening(12).fit(x)
    old.save(tmp_path / "old.npz")
    with np.load(tmp_path / "old.npz") as data:
        np.savez(tmp_path / "before.npz", **{k: data[k] for k in data.files if k != "rule"})
    before = PCAWhitening.load(tmp_path / "before.npz")
    assert before.summary() == old.summary() and before.summary()["rule"] == "auto"
    np.testing.assert_array_equal(before.transform(x), old.transform(x))
