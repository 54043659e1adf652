"""Neighbour lists kept by the writer: after add and remove they equal a from-scratch
`retrieval dba`, in exact mode; with FAISS candidates a new image enters its near images' lists."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED, make_scene, needs_shared, run_cli
from retrieval import ExtractorConfig, Index, InputSpec, RuntimeConfig, SearchConfig
from retrieval.engine.index import IndexUsageError
from retrieval.engine.neighbour_lists import LIST_NPROBE
from retrieval.engine.neighbours import Neighbours
from retrieval.engine.policy import WritePolicy

CONFIG = ExtractorConfig(backbone="resnet18", weights="none", input_spec=InputSpec(size=(64, 64)))
SEARCH = SearchConfig(levels=(1, 2), pca_dim=16)


def _scenes(root, seeds):
    paths = []
    for s in seeds:
        path = root / f"s{s}.png"
        make_scene(s).save(path)
        paths.append(str(path))
    return paths


def _lists(index) -> Neighbours:
    found = Neighbours.load(index)
    assert found is not None
    return found


def test_lists_after_add_and_remove_equal_a_from_scratch_dba(tmp_path):
    first, more = _scenes(tmp_path, range(900, 908)), _scenes(tmp_path, range(950, 954))
    index = tmp_path / "idx"
    with Index.create(index, CONFIG, SEARCH, store=tmp_path / "s.sqlite", runtime=RuntimeConfig(batch_size=16)) as idx:
        idx.add(first[:3], progress=False)
        small = _lists(index)  # 3 images: 2 others each, the rest of the 10 places empty
        assert small.k == 10 and (small.neighbours >= 0).sum(axis=1).tolist() == [2, 2, 2]
        idx.add(first[3:] + more, progress=False)
        gone = [idx.manifest.by_path(p).id for p in (first[1], more[0])]
        assert np.isin(gone, _lists(index).neighbours).all()  # each is in other images' lists
        idx.remove([first[1], more[0]])
        assert idx.info()["neighbours"]["up_to_date"] is True
        kept = _lists(index)
        assert kept.meta["images"] == 10 and not np.isin(kept.neighbours, gone).any()
    # The from-scratch computation through the command line, on the same index.
    assert run_cli("dba", str(index), "-k", "10", "--json").returncode == 0
    scratch = _lists(index)
    assert scratch.ids.tolist() == kept.ids.tolist()
    assert scratch.neighbours.tolist() == kept.neighbours.tolist()
    assert np.array_equal(scratch.distances, kept.distances)
    assert (scratch.neighbours >= 0).sum(axis=1).tolist() == [9] * 10


def test_dba_k_is_kept_by_later_adds_and_a_new_image_enters_lists_through_candidates(tmp_path):
    paths = _scenes(tmp_path, range(700, 716))
    policy = WritePolicy(ann_min_images=4, layout_min_images=1000)
    index = tmp_path / "idx"
    with Index.create(index, CONFIG, SEARCH, store=tmp_path / "s.sqlite", runtime=RuntimeConfig(batch_size=16),
                      index_type="IVF2,Flat", policy=policy) as idx:
        idx.add(paths[:-1], progress=False)
        # Above the exact limit a list costs a candidate search per image: kept once asked for.
        assert not (index / "neighbours.npz").exists()
        idx.build_neighbours(3)
        copy = tmp_path / "copy.png"
        make_scene(700).save(copy)  # the same picture as paths[0]: each the other's nearest
        idx.add([str(copy)], progress=False)
        found = _lists(index)
        first, new = idx.manifest.by_path(paths[0]).id, idx.manifest.by_path(str(copy.resolve())).id
    assert found.k == 3 and found.meta["images"] == 16
    pos, known = found.rows(np.array([first, new]))
    assert known.all()
    assert found.neighbours[pos[0], 0] == new and found.neighbours[pos[1], 0] == first


def test_with_candidates_a_list_that_lost_images_is_searched_again_only_below_half(tmp_path, monkeypatch):
    """Above the exact limit, removing an image does not search again every list that named
    it: a list keeps its other entries, in order, with empty places at the end, until it has
    lost half of them; then it is searched again (and found whole). Without the rule every
    list naming a copy is searched."""
    from retrieval.engine import neighbour_lists

    paths = [str(Path(p).resolve()) for p in _scenes(tmp_path, range(720, 732))]
    copies = []
    for i in range(3):  # three copies of the first picture: each other's nearest and its
        copy = tmp_path / f"copy{i}.png"
        make_scene(720).save(copy)
        copies.append(str(copy.resolve()))
    policy = WritePolicy(ann_min_images=4, layout_min_images=1000)
    index = tmp_path / "idx"
    with Index.create(index, CONFIG, SEARCH, store=tmp_path / "s.sqlite", runtime=RuntimeConfig(batch_size=16),
                      index_type="IVF2,Flat", policy=policy) as idx:
        idx.add(paths + copies, progress=False)
        idx.build_neighbours(4)
        before = _lists(index)
        ids = {p: idx.manifest.by_path(p).id for p in paths + copies}
        removed = copies + [paths[5]]  # and one picture unlike the others
        first, gone = ids[paths[0]], [ids[c] for c in removed]
        row = {int(i): r for r, i in enumerate(before.ids)}
        assert set(before.neighbours[row[first], :3].tolist()) == set(gone[:3])  # its 3 copies, then another
        # Lists left with 2 of their 4 places or more are kept, the others searched again.
        left = {i: int((~np.isin(before.neighbours[row[i]], gone)).sum()) for i in before.ids.tolist()
                if i not in gone and np.isin(before.neighbours[row[i]], gone).any()}
        shortened = [i for i, n in left.items() if n >= 2]
        redone = [i for i, n in left.items() if n < 2]
        assert shortened and first in redone, left
        searched = []
        real = neighbour_lists.rank_many

        def counting(queries, *args, **kwargs):
            searched.append(len(queries))
            return real(queries, *args, **kwargs)

        monkeypatch.setattr(neighbour_lists, "rank_many", counting)
        idx.remove(removed)
        after = _lists(index)
        assert idx.info()["neighbours"]["up_to_date"] is True
        monkeypatch.setattr(neighbour_lists, "rank_many", real)
        idx.build_neighbours(4)
        scratch = _lists(index)
    assert sum(searched) == len(redone)  # those lists alone were searched, as from scratch
    arow = {int(i): r for r, i in enumerate(after.ids)}
    assert scratch.ids.tolist() == after.ids.tolist()
    for i in redone:
        assert after.neighbours[arow[i]].tolist() == scratch.neighbours[arow[i]].tolist()
    assert not np.isin(after.neighbours, gone).any()
    for i in shortened:
        old, old_d = before.neighbours[row[i]], before.distances[row[i]]
        still = ~np.isin(old, gone)
        n = int(still.sum())
        assert after.neighbours[arow[i], :n].tolist() == old[still].tolist()  # in order, moved up
        assert np.array_equal(after.distances[arow[i], :n], old_d[still])
        assert (after.neighbours[arow[i], n:] == -1).all() and np.isinf(after.distances[arow[i], n:]).all()


# -- an index without lists: adaptive re-ranking by query expansion alone, saying so ------------
def test_an_old_index_without_lists_reranks_by_expansion_alone_until_the_next_add(tmp_path):
    paths = _scenes(tmp_path, range(800, 808))
    index = tmp_path / "idx"
    with Index.create(index, CONFIG, SEARCH, store=tmp_path / "s.sqlite", runtime=RuntimeConfig(batch_size=16)) as idx:
        idx.add(paths[:6], progress=False)
        assert idx.info()["whitening"]["fitted"] is True  # 30 windows: whitened
    (index / "neighbours.npz").unlink()  # as an index built before the writer kept lists
    with Index.open(index) as idx:
        info = idx.info()
        assert info["neighbours"] is None and info["reranking"]["augmentation"] is False
        # Without lists the default is the plain ranking (re-ranking by default needs them).
        assert info["reranking"]["by_default"] is False
        default = idx.search([paths[0]], k=3)[0]
        assert default.note is None and all(h.rerank_distance is None for h in default.hits)
        result = idx.search([paths[0]], k=3, rerank=True)[0]
        assert result.note.startswith("re-ranked by query expansion only") and f"retrieval dba {index}" in result.note
        assert result.hits[0].path == paths[0] and all(h.rerank_distance is not None for h in result.hits)
        assert idx.search([paths[0]], k=3, rerank=False)[0].note is None
        with pytest.raises(IndexUsageError, match="retrieval dba"):  # a fixed count asked for: refused
            idx.search([paths[0]], k=3, dba=2)
        idx.add(paths[6:], progress=False)  # the writer computes every list at the next add
        assert idx.info()["neighbours"]["up_to_date"] is True
        assert idx.info()["reranking"] == {"augmentation": True, "by_default": True, "note": None}
        assert idx.search([paths[0]], k=3, rerank=True)[0].note is None
        default = idx.search([paths[0]], k=3)[0]  # now re-ranked by default, as asked above
        assert [(h.id, h.rerank_distance) for h in default.hits] == \
            [(h.id, h.rerank_distance) for h in idx.search([paths[0]], k=3, rerank=True)[0].hits]


def test_above_the_exact_limit_without_lists_the_query_says_how_it_was_reranked(tmp_path):
    paths = _scenes(tmp_path, range(600, 606))
    index = tmp_path / "idx"
    with Index.create(index, CONFIG, SEARCH, store=tmp_path / "s.sqlite", runtime=RuntimeConfig(batch_size=16),
                      index_type="IVF2,Flat", policy=WritePolicy(ann_min_images=4, layout_min_images=1000)) as idx:
        idx.add(paths, progress=False)
        assert idx.info()["neighbours"] is None  # not asked for: the writer keeps none
    out = run_cli("query", str(index), paths[1], "-k", "2", "--json", "--quiet", "--rerank")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)["results"][0]
    assert "query expansion only" in result["note"] and result["hits"][0]["path"] == paths[1]
    out = run_cli("query", str(index), paths[1], "-k", "2", "--quiet", "--rerank")
    assert out.returncode == 0 and f"note: re-ranked by query expansion only: {index}" in out.stderr


# -- the lists' candidate settings on real photos ------------------------------------------------
# A copy of a real photo sits within this of it with the tests' random-init network.
NEAR_COPY = 0.75


def _edited_copies(photos: list[Path], root: Path) -> dict[str, str]:
    """Three copies of each photo (half size, JPEG quality 30, centre crop of 80 % of the
    area): {copy path: its source's path}. (The random-init network puts brightened
    copies as far as strangers, so they say nothing about the candidates.)"""
    source_of = {}
    for n, photo in enumerate(photos):
        img = Image.open(photo).convert("RGB")
        w, h = img.size
        dx, dy = int(w * (1 - 0.8 ** 0.5) / 2), int(h * (1 - 0.8 ** 0.5) / 2)
        copies = {"half": img.resize((w // 2, h // 2)), "q30": img, "crop": img.crop((dx, dy, w - dx, h - dy))}
        for kind, copy in copies.items():
            path = root.resolve() / f"p{n:02d}-{kind}.jpg"
            copy.save(path, quality=30 if kind == "q30" else 90)
            source_of[str(path)] = str(photo)
    return source_of


@needs_shared("data", "hymenoptera", "val")
def test_above_the_exact_limit_the_lists_find_every_copy_of_real_photos_as_exact_lists_do(tmp_path):
    photos = [p.resolve() for p in sorted((SHARED / "data" / "hymenoptera" / "val").rglob("*.jpg"))[::5][:30]]
    source_of = _edited_copies(photos, tmp_path)
    paths = [str(p) for p in photos] + list(source_of)
    store = tmp_path / "s.sqlite"
    runtime = RuntimeConfig(batch_size=16)
    # The same images twice: lists scored over every pair (below the exact limit), and
    # lists from the window index with the lists' candidate settings: LIST_PER_PATCH
    # windows per window from LIST_NPROBE of 15 IVF lists (as many as 600 windows train
    # well); no layout index, so the window index alone must find them.
    with Index.create(tmp_path / "exact", CONFIG, SEARCH, store=store, runtime=runtime) as idx:
        idx.add(paths, progress=False)
        exact = _lists_by_path(idx)
    policy = WritePolicy(ann_min_images=4, layout_min_images=10**6)
    with Index.create(tmp_path / "candidates", CONFIG, SEARCH, store=store, runtime=runtime, index_type="IVF15,Flat",
                      policy=policy) as idx:
        idx.add(paths, progress=False)
        assert idx.info()["structure"]["search"] == "candidates" and LIST_NPROBE < 15
        idx.build_neighbours(10)
        found = _lists_by_path(idx)
    for copy, source in source_of.items():
        assert exact[copy].get(source, np.inf) <= NEAR_COPY  # the data is sound: every copy near its source
        # A pair is grouped from either image's list (duplicates.pair_distances); the
        # window-set distance is asymmetric, and a crop's windows find the photo's first.
        assert source in found[copy] or copy in found[source], (copy, found[copy])
        d = found[copy].get(source, found[source].get(copy))
        assert d in (exact[copy].get(source), exact[source].get(copy))  # scored exactly, as the exact lists do


def _lists_by_path(idx) -> dict[str, dict[str, float]]:
    """Each image's list as {path: distance}."""
    lists = idx.current_neighbours(10)
    entries = idx.manifest.get_many([int(i) for i in lists.ids])
    return {entries[int(i)].path: {entries[int(j)].path: float(d) for j, d in zip(row, dist) if j >= 0}
            for i, row, dist in zip(lists.ids, lists.neighbours, lists.distances)}


def test_searches_read_the_lists_once_per_version_of_the_file(tmp_path, monkeypatch):
    """Re-ranked searches share one reading of the lists (20 ms a query at 100,000 images
    when read for each) and read them again once the writer has replaced the file."""
    from retrieval.engine import neighbours as neighbours_module

    paths = _scenes(tmp_path, range(960, 968))
    index = tmp_path / "idx"
    reads: list[Path] = []
    load = Neighbours.load

    def counted(directory):
        reads.append(Path(directory))
        return load(directory)

    with Index.create(index, CONFIG, SEARCH, store=tmp_path / "s.sqlite", runtime=RuntimeConfig(batch_size=16)) as idx:
        idx.add(paths[:6], progress=False)
        monkeypatch.setattr(neighbours_module.Neighbours, "load", staticmethod(counted))
        first = [idx.search([p], k=3, rerank=True, dba=2)[0] for p in paths[:3]]
        assert len(reads) == 1 and all(r.hits[0].path == p for r, p in zip(first, paths[:3]))
        shared = neighbours_module.shared_lists(index)
        with pytest.raises(ValueError):
            shared.neighbours[0, 0] = -1  # every search sees the same lists: read-only
        idx.add(paths[6:], progress=False)  # the writer replaces the file with lists of 8 images
        before = len(reads)
        for p in paths[6:]:
            assert idx.search([p], k=1, rerank=True)[0].hits[0].path == p
        assert len(reads) == before + 1 and neighbours_module.shared_lists(index).meta["images"] == 8
