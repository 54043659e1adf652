"""The feature store: content-keyed dedup, reuse across runs, renamed files."""
import shutil

import numpy as np
import pytest

from retrieval.config import ExtractorConfig, InputSpec, RuntimeConfig
from retrieval.extractor import Extractor, Skipped
from retrieval.features import ImageFeatures, describe
from retrieval.store import FeatureStore

CONFIG = ExtractorConfig(backbone="resnet18", weights="none", input_spec=InputSpec(size=(64, 64)))


class CountingExtractor(Extractor):
    """The real extractor, counting the images it is asked to run through the network."""

    calls = 0

    def extract(self, jobs, **kw):
        jobs = list(jobs)
        CountingExtractor.calls += len(jobs)
        return super().extract(jobs, **kw)


@pytest.fixture
def extractor():
    CountingExtractor.calls = 0
    return CountingExtractor(CONFIG, RuntimeConfig(batch_size=8))


def test_put_get_round_trip(tmp_path):
    with FeatureStore.open(tmp_path / "s.sqlite") as store:
        a = np.random.default_rng(0).normal(size=(4, 7)).astype(np.float32)
        store.put("d1", "cfg", 30, 20, {"level2": a})
        got = store.get("d1", "cfg", ["level2", "level1"])
        assert list(got) == ["level2"]
        np.testing.assert_array_equal(got["level2"], a)
        assert store.image_size("d1") == (30, 20)
        assert store.get("d1", "other-cfg", ["level2"]) == {}


def test_same_content_is_extracted_once(tmp_path, image_dir, extractor):
    copy = tmp_path / "copy-of-img0.jpg"
    shutil.copy(image_dir / "img0.jpg", copy)
    paths = [str(image_dir / "img0.jpg"), str(copy), str(image_dir / "img1.jpg")]
    with FeatureStore.open(tmp_path / "s.sqlite") as store:
        first = list(describe(paths, extractor, store, ["level1", "level2"], progress=False))
        assert all(isinstance(f, ImageFeatures) for f in first)
        # Identical content is extracted and stored once, even within one run.
        assert CountingExtractor.calls == 2
        assert store.count(extractor.key) == 2
        assert sorted(f.path for f in first) == sorted(paths)
        by_path = {f.path: f for f in first}
        np.testing.assert_array_equal(by_path[paths[0]].descriptors["level2"], by_path[str(copy)].descriptors["level2"])
        calls = CountingExtractor.calls
        # A renamed file and a second run cost no extraction at all.
        renamed = tmp_path / "renamed.jpg"
        shutil.move(copy, renamed)
        again = list(describe([str(renamed), paths[0]], extractor, store, ["level1", "level2"], progress=False))
        assert CountingExtractor.calls == calls
        assert not any(f.extracted for f in again)
        np.testing.assert_array_equal(again[0].descriptors["level1"], by_path[paths[0]].descriptors["level1"])


def test_only_missing_levels_are_extracted(tmp_path, image_dir, extractor):
    path = str(image_dir / "img2.jpg")
    with FeatureStore.open(tmp_path / "s.sqlite") as store:
        (one,) = describe([path], extractor, store, ["level1"], progress=False)
        (both,) = describe([path], extractor, store, ["level1", "level2"], progress=False)
        assert both.extracted and set(both.descriptors) == {"level1", "level2"}
        np.testing.assert_array_equal(one.descriptors["level1"], both.descriptors["level1"])
        assert both.descriptors["level2"].shape[0] == 4


def test_unreadable_inputs_are_skipped_with_reasons(tmp_path, image_dir, extractor):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    paths = [str(empty), str(text), str(tmp_path / "missing.jpg"), str(image_dir / "img3.jpg")]
    with FeatureStore.open(tmp_path / "s.sqlite") as store:
        out = {o.path: o for o in describe(paths, extractor, store, ["level1"], progress=False)}
    assert isinstance(out[str(image_dir / "img3.jpg")], ImageFeatures)
    reasons = {p: o.reason for p, o in out.items() if isinstance(o, Skipped)}
    assert reasons == {
        str(empty): "empty file",
        str(text): "not an image (unrecognised format)",
        str(tmp_path / "missing.jpg"): "file not found",
    }
