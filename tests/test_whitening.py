import numpy as np
import pytest

from retrieval.whitening import PCAWhitening, l2_normalize


def _data(n=500, d=40, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) * np.linspace(3, 0.1, d)
    return (rng.normal(size=(n, d)) @ mix + 5).astype(np.float32)


def test_whitening_gives_identity_covariance_on_its_fit_data():
    x = _data()
    w = PCAWhitening(16).fit(x)
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


def test_dimension_is_capped_by_rank_and_zero_disables():
    x = _data(n=10, d=40)
    assert PCAWhitening(256).fit(x).output_dim == 9
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
    assert not list(tmp_path.glob("*.tmp*"))
