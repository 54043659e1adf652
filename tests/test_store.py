"""The feature store: content-keyed dedup, reuse across runs, renamed files."""
import shutil

import numpy as np
import pytest

from retrieval.config import ExtractorConfig, InputSpec, RuntimeConfig
from retrieval.extraction.extractor import Extractor, Skipped
from retrieval.extraction.features import ImageFeatures, describe
from retrieval.extraction.store import FeatureStore, stored_form

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
        # float16 on disk: what comes back is exactly what stored_form() promised
        np.testing.assert_array_equal(got["level2"], stored_form(a).astype(np.float32))
        assert stored_form(a).dtype == np.float16
        half = stored_form(a)  # already in the stored form: kept, not converted again
        store.put("d3", "cfg", 30, 20, {"level2": half})
        np.testing.assert_array_equal(store.get("d3", "cfg", ["level2"])["level2"], half.astype(np.float32))
        np.testing.assert_allclose(got["level2"], a, rtol=1e-3, atol=1e-3)
        huge = a * 1e6  # beyond float16's range: kept in float32
        store.put("d2", "cfg", 30, 20, {"level2": huge})
        np.testing.assert_array_equal(store.get("d2", "cfg", ["level2"])["level2"], huge)
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


def test_schema_1_store_is_upgraded_and_read(tmp_path):
    """A store written before float16 storage (float32 rows, no dtype column) still reads."""
    import sqlite3

    path = tmp_path / "old.sqlite"
    a = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    with sqlite3.connect(path) as conn:
        conn.executescript("""
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE configs (key TEXT PRIMARY KEY, config TEXT NOT NULL);
            CREATE TABLE images (digest TEXT PRIMARY KEY, width INTEGER NOT NULL, height INTEGER NOT NULL);
            CREATE TABLE descriptors (digest TEXT NOT NULL, config TEXT NOT NULL, region TEXT NOT NULL,
                n INTEGER NOT NULL, dim INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (digest, config, region));
            INSERT INTO meta VALUES ('schema', '1');
        """)
        conn.execute("INSERT INTO descriptors VALUES ('d', 'c', 'level1', 3, 4, ?)", (a.tobytes(),))
    with FeatureStore.open(path) as store:
        np.testing.assert_array_equal(store.get("d", "c", ["level1"])["level1"], a)
        np.testing.assert_array_equal(store.get_many(["d"], "c", ["level1"])["d"], a)


def test_a_file_that_is_not_a_store_is_refused(tmp_path):
    from retrieval.extraction.store import StoreError

    bad = tmp_path / "notes.txt"
    bad.write_text("my notes")
    with pytest.raises(StoreError, match="not a feature store"):
        FeatureStore.open(bad)
    assert bad.read_text() == "my notes"
