"""The Index API: build, persist, reopen, search, remove, move, resume."""
import shutil

import numpy as np
import pytest

from retrieval import ExtractorConfig, Index, InputSpec, RuntimeConfig, SearchConfig
from retrieval.engine.index import IndexUsageError

from conftest import SELF_DISTANCE, make_scene

CONFIG = ExtractorConfig(backbone="resnet18", weights="none", input_spec=InputSpec(size=(64, 64)))
SEARCH = SearchConfig(levels=(1, 2), pca_dim=16)


def _create(path, store, **kw):
    return Index.create(path, CONFIG, SEARCH, store=store, runtime=RuntimeConfig(batch_size=16), **kw)


def test_build_search_reopen_round_trip(tmp_path, image_dir):
    paths = sorted(str(p) for p in image_dir.iterdir())
    with _create(tmp_path / "idx", tmp_path / "s.sqlite") as idx:
        report = idx.add(paths, progress=False)
        assert (report.added, report.already_present, report.images) == (6, 0, 6)
        before = idx.search(paths, k=3)
        info = idx.info()
    assert info["images"] == 6 and info["patches"] == 30 and info["dim"] == 16
    assert info["native_kernel"].startswith("retrieval._kernel")
    # Every image finds itself first, at distance 0, through the same window.
    for path, result in zip(paths, before):
        top = result.hits[0]
        assert top.path == path and top.distance < SELF_DISTANCE
        assert top.query_box == top.db_box
        assert [h.rank for h in result.hits] == [1, 2, 3]
        assert all(a.distance <= b.distance for a, b in zip(result.hits, result.hits[1:]))
    with Index.open(tmp_path / "idx") as idx:
        after = idx.search(paths, k=3)
    assert [[(h.path, h.distance) for h in r.hits] for r in after] == \
        [[(h.path, h.distance) for h in r.hits] for r in before]


def test_each_hit_carries_the_size_of_its_image(tmp_path):
    """A hit's width and height are those of the image it names (what the server's JSON
    gives each hit), for images of several sizes."""
    sizes = [(160, 120), (96, 144), (200, 100), (128, 128)]
    paths = []
    for i, size in enumerate(sizes):
        paths.append(str(tmp_path / f"img{i}.jpg"))
        make_scene(i, size).save(paths[-1], quality=90)
    with _create(tmp_path / "idx", tmp_path / "s.sqlite") as idx:
        idx.add(paths, progress=False)
        results = idx.search(paths, k=4)
    size_of = dict(zip(paths, sizes))
    assert all(len(r.hits) == 4 for r in results)
    assert all((h.width, h.height) == size_of[h.path] for r in results for h in r.hits)
    assert "width" not in results[0].hits[0].to_dict()  # the query JSON of SPEC section 5 is unchanged


def test_transformed_crop_finds_its_source(tmp_path, image_dir):
    query = tmp_path / "query.jpg"
    make_scene(4).crop((20, 10, 150, 110)).rotate(4).resize((110, 85)).save(query)
    with _create(tmp_path / "idx", tmp_path / "s.sqlite") as idx:
        idx.add([str(p) for p in image_dir.iterdir()], progress=False)
        hits = idx.search([str(query)], k=6)[0].hits
    assert hits[0].path.endswith("img4.jpg")
    qx0, qy0, qx1, qy1 = hits[0].query_box
    assert 0 <= qx0 < qx1 <= 110 and 0 <= qy0 < qy1 <= 85  # boxes in the query's pixels


def test_add_is_idempotent_and_remove_works(tmp_path, image_dir):
    paths = sorted(str(p) for p in image_dir.iterdir())
    with _create(tmp_path / "idx", tmp_path / "s.sqlite") as idx:
        idx.add(paths[:4], progress=False)
        report = idx.add(paths, progress=False)
        assert (report.added, report.already_present, report.images) == (2, 4, 6)
        report = idx.remove([paths[0], paths[1], str(tmp_path / "never-added.jpg")])
        assert (report.removed, report.images) == (2, 4)
        hits = idx.search([paths[0]], k=10)[0].hits
        assert {h.path for h in hits} == set(paths[2:])
        assert idx.info()["patches"] == 4 * 5


def test_moved_file_is_recognised_by_content(tmp_path, image_dir):
    with _create(tmp_path / "idx", tmp_path / "s.sqlite") as idx:
        idx.add([str(p) for p in image_dir.iterdir()], progress=False)
        moved = tmp_path / "elsewhere.jpg"
        shutil.move(image_dir / "img5.jpg", moved)
        report = idx.add([str(moved)], progress=False)
        assert (report.added, report.already_present, report.images) == (0, 1, 6)
        assert idx.search([str(moved)], k=1)[0].hits[0].path == str(moved)


def test_existing_index_with_other_config_is_refused(tmp_path, image_dir):
    with _create(tmp_path / "idx", tmp_path / "s.sqlite"):
        pass
    with pytest.raises(IndexUsageError, match="another configuration"):
        Index.create(tmp_path / "idx", CONFIG, SearchConfig(levels=(1,), pca_dim=16), store=tmp_path / "s.sqlite")
    with pytest.raises(IndexUsageError, match="not an index"):
        Index.open(tmp_path / "nothing-here")


def test_whiten_on_another_set_and_ivf_index(tmp_path, image_dir):
    other = tmp_path / "other"
    other.mkdir()
    for i in range(10, 16):
        make_scene(i).save(other / f"o{i}.jpg")
    paths = sorted(str(p) for p in image_dir.iterdir())
    with _create(tmp_path / "idx", tmp_path / "s.sqlite", whiten_on=[str(other)], index_type="IVF2,Flat") as idx:
        idx.add(paths, progress=False)
        info = idx.info()
        hits = idx.search(paths[:1], k=2)[0].hits
    assert info["index_type"] == "IVF2,Flat" and info["images"] == 6
    assert hits[0].path == paths[0]
    # Issue 23 row 19: learned on other images, the shrinkage is estimated from them.
    assert info["whitening"]["rule"] == "ledoit-wolf-images"
    # The whitening was fit on the other set, not on the database.
    with _create(tmp_path / "idx2", tmp_path / "s.sqlite") as own:
        own.add(paths, progress=False)
        assert not np.allclose(own.whitening.mean_, Index.open(tmp_path / "idx").whitening.mean_)
        assert own.info()["whitening"]["rule"] == "auto"


def test_an_open_index_sees_images_added_by_another_handle(tmp_path, image_dir):
    paths = sorted(str(p) for p in image_dir.iterdir())
    with _create(tmp_path / "idx", tmp_path / "s.sqlite") as reader:
        reader.add(paths[:3], progress=False)
        assert len(reader.search(paths[:1], k=10)[0].hits) == 3
        with Index.open(tmp_path / "idx") as writer:
            writer.add(paths[3:], progress=False)
        assert {h.path for h in reader.search(paths[:1], k=10)[0].hits} == set(paths)


def test_faiss_candidates_then_exact_rerank_match_exact_search(tmp_path, image_dir):
    """Force the large-collection path (FAISS candidates + kernel re-rank) on a small index."""
    paths = sorted(str(p) for p in image_dir.iterdir())
    with _create(tmp_path / "idx", tmp_path / "s.sqlite", index_type="IVF2,Flat") as idx:
        idx.add(paths, progress=False)
        exact = idx.search(paths, k=3)
        every = idx.search(paths, k=None)
        approx = idx.search(paths, k=3, exact_limit=0, nprobe=2, per_patch=30)
        narrow = idx.search(paths, k=3, exact_limit=0, nprobe=1, per_patch=1)
    as_list = lambda results: [[(h.path, round(h.distance, 5)) for h in r.hits] for r in results]
    # With every window nominated, the candidates are every image: exactly the exact ranking.
    assert as_list(approx) == as_list(exact)
    # With one window per query window fewer images may be scored, but each one exactly:
    # its distance is the one exact search gives it, and the query itself comes first.
    for query, r, full in zip(paths, narrow, every):
        truth = {h.path: h.distance for h in full.hits}
        assert r.hits[0].path == query
        assert all(h.distance == pytest.approx(truth[h.path], abs=1e-6) for h in r.hits)


def test_empty_index_answers_with_no_hits(tmp_path, image_dir):
    with _create(tmp_path / "idx", tmp_path / "s.sqlite") as idx:
        report = idx.add([], progress=False)
        assert (report.added, report.images) == (0, 0)
        (result,) = idx.search([str(image_dir / "img0.jpg")], k=5)
        assert result.hits == [] and idx.info()["images"] == 0
