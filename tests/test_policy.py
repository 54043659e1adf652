"""The writer's rules (`WritePolicy`) on their own, and as `Index` obeys and reports them."""
from __future__ import annotations

import numpy as np
import pytest

from retrieval import ExtractorConfig, Index, InputSpec, RuntimeConfig, SearchConfig
from retrieval.engine.policy import WritePolicy
from retrieval.engine.snapshot import read_state

from conftest import make_scene

POLICY = WritePolicy()


def test_tiers_group_sizes_within_the_merge_factor():
    assert [POLICY.tier(n) for n in (1, 3, 4, 15, 16, 63, 64)] == [0, 0, 1, 1, 2, 2, 3]
    assert WritePolicy(merge_factor=2).tier(8) == 3


def test_the_smallest_full_tier_merges_first():
    # Tier 0 holds three segments (not enough), tier 1 four: those four merge.
    assert POLICY.segments_to_rewrite([1, 2, 5, 6, 3, 7, 8], [0] * 7) == [2, 3, 5, 6]
    # Two full tiers: the smaller one goes first, so small segments never pile up.
    assert POLICY.segments_to_rewrite([20, 1, 20, 2, 20, 3, 20, 2], [0] * 8) == [1, 3, 5, 7]
    assert POLICY.segments_to_rewrite([1, 2, 3, 20, 40], [0] * 5) == []


def test_compaction_comes_before_merging():
    sizes = [1, 1, 1, 1, 100]
    assert POLICY.segments_to_rewrite(sizes, [0, 0, 0, 0, 24]) == [0, 1, 2, 3]  # 24 % removed: not yet
    assert POLICY.segments_to_rewrite(sizes, [0, 0, 0, 0, 25]) == [4]
    assert POLICY.segments_to_rewrite([0, 10], [0, 0]) == []  # an empty segment never divides by zero


def test_whitening_refits_on_doubling_until_the_sample_is_full():
    fitted = {"source": "database", "sample_images": 100, "images": 100}
    assert not POLICY.refit_due(fitted, 199)
    assert POLICY.refit_due(fitted, 200)
    full = {"source": "database", "sample_images": 2048, "images": 5000}
    assert not POLICY.refit_due(full, 10**6)
    for fixed in ({"source": "whiten_on", "sample_images": 50, "images": 10},
                  {"source": "shared", "sample_images": 0, "images": 10}):
        assert not POLICY.refit_due(fixed, 10**6)
    assert POLICY.refit_rule(fitted) == "re-fitted when the collection reaches 200 images"
    assert POLICY.refit_rule(full).startswith("fixed: the sample is full")


def test_faiss_rules():
    assert not POLICY.wants_candidates(2000) and POLICY.wants_candidates(2001)
    assert not POLICY.retrain_due(1000, 3999) and POLICY.retrain_due(1000, 4000)
    assert not POLICY.purge_due(100, 80) and POLICY.purge_due(100, 79)
    assert not POLICY.wants_layout(639) and POLICY.wants_layout(640)


@pytest.mark.parametrize("bad", [dict(merge_factor=1), dict(refit_growth=1), dict(purge_fraction=0),
                                 dict(compact_removed_fraction=1.5), dict(whiten_sample_images=0)])
def test_nonsense_rules_are_refused(bad):
    with pytest.raises(ValueError, match="WritePolicy"):
        WritePolicy(**bad)


CONFIG = ExtractorConfig(backbone="resnet18", weights="none", layer="layer3", patch_mode="roi",
                         input_spec=InputSpec(size=(64, 64)))


def test_index_follows_and_reports_its_policy(tmp_path):
    """Merging by tier and re-fitting by growth happen where the policy says, seen from
    the published state, and `info()` reports the rules in force."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    paths = []
    for i in range(12):
        make_scene(np.random.default_rng(i)).save(folder / f"s{i:02d}.jpg")
        paths.append(str(folder / f"s{i:02d}.jpg"))
    policy = WritePolicy(merge_factor=2, whiten_sample_images=6)
    search = SearchConfig(levels=(1, 2), pca_dim=8)
    with Index.create(tmp_path / "idx", CONFIG, search, store=tmp_path / "s.sqlite",
                      runtime=RuntimeConfig(batch_size=8), policy=policy) as idx:
        idx.add(paths[:2], progress=False)
        first = read_state(tmp_path / "idx")
        assert first.whitening["images"] == 2 and [s["images"] for s in first.segments] == [2]
        idx.add(paths[2:3], progress=False)  # 3 < 2 x 2: no refit; segments 2 and 1 are tiers 1 and 0
        state = read_state(tmp_path / "idx")
        assert state.whitening["file"] == first.whitening["file"]
        assert sorted(s["images"] for s in state.segments) == [1, 2]
        idx.add(paths[3:4], progress=False)  # 4 = 2 x 2: refit, every image re-whitened into one segment
        state = read_state(tmp_path / "idx")
        assert state.whitening["images"] == 4 and [s["images"] for s in state.segments] == [4]
        idx.add(paths[4:12], progress=False)  # 12 >= 2 x 4 but the 6-image sample is full after this fit
        state = read_state(tmp_path / "idx")
        assert state.whitening["sample_images"] == 6
        info = idx.info()
        assert info["policy"] == policy.describe()
        assert info["whitening"]["refit"] == "fixed: the sample is full (6 images)"
