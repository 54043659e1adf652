"""Tests of `classify`: metrics, encoding, models, model files, layouts, CLI, store reuse.

Most tests use a tiny colour-statistics backbone patched into `Extractor.backbone`, so
they run in seconds and the classes (red / green / blue images) are learnable; one test
runs a real random-init torchvision network end to end.
"""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from PIL import Image

from classify import cli, metrics
from classify.features import encode, image_vectors, power_normalize
from classify import ModelFileError, load_model
from classify.models import LOGREG_CS, Classifier, cv_folds, logreg_path, to_indicator
from retrieval.config import ExtractorConfig, RuntimeConfig
from retrieval.extraction.extractor import Extractor
from retrieval.extraction.features import describe
from retrieval.extraction.store import FeatureStore

COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}
FAKE = ["--backbone", "fake-colour", "--weights", "none", "--quiet", "--batch-size", "8", "--workers", "1"]


class ColourBackbone:
    """Stand-in network: per-channel mean and std of each (32 x 32) input."""

    input_size = (32, 32)
    output_kind = "vector"
    dynamic_size = False

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.calls += 1
        x = images.astype(np.float32) / 255.0
        return np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2)), np.ones((len(x), 1), np.float32)], axis=1)

    def summary(self) -> dict:
        return {"kind": "fake"}


@pytest.fixture
def fake_backbone(monkeypatch):
    net = ColourBackbone()
    monkeypatch.setattr(Extractor, "backbone", property(lambda self: net))
    return net


def _image(path, colour, seed, size=48):
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour)[None, None, :] + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _make_split(root, split, classes, n, seed=0):
    for ci, cls in enumerate(classes):
        for i in range(n):
            _image(root / split / cls / f"{cls}{i}.png", COLOURS[cls], seed + 100 * ci + i)


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "data"
    _make_split(root, "train", COLOURS, 6, seed=0)
    _make_split(root, "test", COLOURS, 3, seed=1000)
    return root


def _run(capsys, argv):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, (json.loads(out) if "--json" in argv and out.strip() else out), err


# ----------------------------------------------------------------------------- metrics


def test_metrics_hand_computed():
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    Y = to_indicator(["a", "b", "b"], ["a", "b"])
    assert metrics.top1_accuracy(scores, Y) == pytest.approx(2 / 3)
    # class a: 1/1, class b: 1/2 -> mean 0.75 (top-1 accuracy is 2/3: they differ)
    assert metrics.mean_per_class_accuracy(scores, Y) == pytest.approx(0.75)
    assert metrics.confusion(scores, Y).tolist() == [[1, 0], [1, 1]]
    out = metrics.evaluate(scores, Y)
    assert out["map"] is None and out["confusion_matrix"] == [[1, 0], [1, 1]]


def test_voc07_11_point_ap():
    # ranks: P R R N -> precision 1, .5, .667, .5 at recall .5, .5, 1, 1
    ap = metrics.voc07_ap([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0])
    assert ap == pytest.approx((6 * 1.0 + 5 * (2 / 3)) / 11)
    # the positive ranked last: precision 1/3 at recall 1 for all 11 points
    assert metrics.voc07_ap([0.9, 0.8, 0.1], [0, 0, 1]) == pytest.approx(1 / 3)
    scores = np.array([[0.9, 0.1], [0.8, 0.7], [0.7, 0.9], [0.6, 0.2]])
    Y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    ap0 = metrics.voc07_ap(scores[:, 0], Y[:, 0])  # P N P N
    ap1 = metrics.voc07_ap(scores[:, 1], Y[:, 1])  # ranks: P(0.9) P(0.7) N N -> 1
    assert ap1 == pytest.approx(1.0)
    assert metrics.mean_ap(scores, Y) == pytest.approx((ap0 + ap1) / 2)
    # multi-label top-1: rows 0,1,2 labelled; top-1 of row 1 is class 0 (wrong)
    assert metrics.top1_accuracy(scores, Y) == pytest.approx(2 / 3)


def test_power_norm_and_encode_order():
    assert power_normalize(np.array([4.0, -9.0, 0.0])).tolist() == pytest.approx([2.0, -3.0, 0.0])
    # average first, then L2, then signed sqrt (when power normalisation is on)
    win = np.array([[2.0, 4.0], [4.0, 4.0]])  # mean (3, 4) -> (0.6, 0.8) -> sqrt
    assert encode(win, power_norm=True).tolist() == pytest.approx([np.sqrt(0.6), np.sqrt(0.8)], rel=1e-6)
    assert encode(np.array([[-3.0, 4.0]]), power_norm=True).tolist() == pytest.approx(
        [-np.sqrt(0.6), np.sqrt(0.8)], rel=1e-6)
    assert encode(win, power_norm=False).tolist() == pytest.approx([0.6, 0.8], rel=1e-6)


def test_c_on_the_edge_of_its_grid_is_said(fake_backbone, dataset, tmp_path, capsys, monkeypatch):
    # Separable classes and a grid of tiny Cs: every C ties on accuracy and the log loss
    # keeps falling with C, so the largest C of the grid wins.
    X, y = _blobs(n=60, K=2, spread=0.1)
    clf = Classifier(Cs=[1e-6, 1e-5, 1e-4], cv=3).fit(X, y)
    assert clf.C_ == 1e-4 and clf.C_at_edge_ == "highest"
    assert Classifier(Cs=[1.0]).fit(X, y).C_at_edge_ is None  # no selection, no edge
    monkeypatch.setattr("classify.models.LOGREG_CS", np.array([1e-6, 1e-5, 1e-4]))
    code, out, err = _run(capsys, ["run", str(dataset), "--cv", "3", "--store", str(tmp_path / "s.sqlite"),
                                   "--json", *FAKE])
    assert code == 0, err
    assert out["C_at_edge"] == "highest" and "highest value of the grid" in err


# ----------------------------------------------------------------------------- models


def _blobs(n=120, K=3, D=20, seed=0, spread=1.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (K, D))
    y = rng.integers(0, K, n)
    return centres[y] + spread * rng.normal(0, 1, (n, D)), [f"c{k}" for k in y]


def test_warm_start_path_fewer_iterations_same_solutions():
    X, y = _blobs()
    Y = to_indicator(y, ["c0", "c1", "c2"])
    Cs = LOGREG_CS[:36:2]  # up to C = 1e2: past that the blobs are separable and fits stop at max_iter
    warm = list(logreg_path(X, Y, Cs, warm_start=True))
    cold = list(logreg_path(X, Y, Cs, warm_start=False))
    assert sum(n for *_, n in warm) < 0.8 * sum(n for *_, n in cold)
    for (_, mw, _), (_, mc, _) in zip(warm[:8], cold[:8]):  # well-conditioned part of the path
        assert np.abs(mw.decision(X) - mc.decision(X)).max() < 1e-2


def test_multinomial_logreg_matches_sklearn():
    from sklearn.linear_model import LogisticRegression

    X, y = _blobs(seed=3, spread=2.0)
    Y = to_indicator(y, ["c0", "c1", "c2"])
    (_, model, _), = logreg_path(X, Y, [0.1])
    ref = LogisticRegression(C=0.1, tol=1e-8, max_iter=2000).fit(X, y)
    assert np.abs(model.proba(X) - ref.predict_proba(X)).max() < 1e-3


@pytest.mark.parametrize("method", ["svm", "logreg"])
def test_classifier_single_label(method):
    X, y = _blobs(seed=1)
    Xt, yt = _blobs(seed=1, n=60)  # same centres (same seed), new noise draws differ by n
    clf = Classifier(method=method, cv=3).fit(X, y)
    assert clf.selection_["mode"] == "cv" and clf.selection_["folds"] == 3
    assert clf.C_ in clf.selection_["Cs"]
    assert clf.score(X, y) > 0.9
    assert clf.decision_function(X).shape == (len(X), 3)
    if method == "svm":
        assert clf.model_.kind == "ovo" and len(clf.model_.pairs) == 3


def test_repeated_cv_holds_every_row_out_once_per_shuffle():
    X, y = _blobs(n=60, seed=5)
    Y = to_indicator(y, ["c0", "c1", "c2"])
    pairs = cv_folds(Y, 3, False, seed=7, repeats=4)
    assert len(pairs) == 12
    for r in range(4):
        shuffle = pairs[3 * r: 3 * r + 3]  # shuffle r is the plain split with seed 7 + r
        assert all(np.array_equal(a, c) and np.array_equal(b, d)
                   for (a, b), (c, d) in zip(shuffle, cv_folds(Y, 3, False, seed=7 + r)))
        held = np.sort(np.concatenate([b for _, b in shuffle]))
        assert held.tolist() == list(range(60))  # each row held out once per shuffle
    # the shuffles differ (otherwise repeating would average the same split)
    assert not np.array_equal(pairs[0][1], pairs[3][1])


def test_c_selection_averages_the_held_out_scores_of_repeated_shuffles():
    # Noisy, overlapping classes: held-out accuracy differs between shuffles.
    X, y = _blobs(n=90, seed=4, spread=2.5)
    classes = ["c0", "c1", "c2"]
    Y = to_indicator(y, classes)
    grid = LOGREG_CS[16:40:3]
    clf = Classifier(Cs=grid, cv=3, repeats=3, random_state=11).fit(X, y)
    sel = clf.selection_
    assert (sel["mode"], sel["folds"], sel["repeats"]) == ("cv", 3, 3)
    # the criterion, recomputed by hand: accuracy per held-out part, averaged over 3 x 3 parts
    per_part = []
    for r in range(3):
        for a, b in cv_folds(Y, 3, False, seed=11 + r):
            per_part.append([metrics.top1_accuracy(m.decision(X[b]), Y[b])
                             for _, m, _ in logreg_path(X[a], Y[a], grid)])
    expected = np.mean(per_part, axis=0)
    assert sel["scores"] == pytest.approx(expected.tolist())
    assert sel["scores"][list(grid).index(clf.C_)] == max(sel["scores"])
    # one shuffle alone scores differently: the average is over all of them
    single = Classifier(Cs=grid, cv=3, repeats=1, random_state=11).fit(X, y)
    assert single.selection_["scores"] == pytest.approx(np.mean(per_part[:3], axis=0).tolist())
    assert single.selection_["scores"] != pytest.approx(sel["scores"])
    # deterministic: the same data and seed give the same choice
    again = Classifier(Cs=grid, cv=3, repeats=3, random_state=11).fit(X, y)
    assert again.C_ == clf.C_ and again.selection_["scores"] == sel["scores"]


def test_c_selection_sees_training_data_only():
    X, y = _blobs(seed=2, spread=3.0)
    Xv, yv = X[:30] + 0.1, y[:30]
    a = Classifier(method="svm").fit(X, y)
    # the selection only depends on (X, y): flipping unrelated "test" data cannot change it
    b = Classifier(method="svm").fit(X.copy(), list(y))
    assert a.C_ == b.C_ and a.selection_["scores"] == b.selection_["scores"]
    c = Classifier(method="logreg").fit(X, y, Xv, yv)
    assert c.selection_["mode"] == "validation"


# ----------------------------------------------------------------------------- model file


def test_model_file_round_trip_and_pickle_refused(tmp_path):
    X, y = _blobs(seed=4)
    for method in ("svm", "logreg"):
        clf = Classifier(method=method, Cs=[1.0]).fit(X, y)
        path = tmp_path / f"{method}.npz"
        clf.save(path, jitter=1, extractor={"backbone": "x"})
        back = Classifier.load(path)
        assert back.classes_ == clf.classes_ and back.C_ == clf.C_ and back.meta_["jitter"] == 1
        assert np.allclose(back.decision_function(X), clf.decision_function(X))
        assert back.predict(X) == clf.predict(X)

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    raw = tmp_path / "raw.npz"
    raw.write_bytes(pickle.dumps({"W": Evil()}))
    boxed = tmp_path / "boxed.npz"
    good = np.load(tmp_path / "svm.npz")
    np.savez(boxed, header=good["header"], W=np.array([Evil()], dtype=object), b=good["b"], pairs=good["pairs"])
    for bad in (raw, boxed):
        with pytest.raises(ModelFileError):
            load_model(bad)
    assert not marker.exists()
    # a header that lies about its shapes is refused too
    lying = tmp_path / "lying.npz"
    np.savez(lying, header=np.load(tmp_path / "logreg.npz")["header"], W=np.zeros((2, 5)), b=np.zeros(2))
    with pytest.raises(ModelFileError):
        load_model(lying)


# ----------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("method,jitter", [("svm", "12"), ("logreg", "1")])
def test_cli_run_json(fake_backbone, dataset, tmp_path, capsys, method, jitter):
    code, out, err = _run(capsys, ["run", str(dataset), "--method", method, "--jitter", jitter,
                                   "--cv", "3", "--store", str(tmp_path / "s.sqlite"), "--json", *FAKE])
    assert code == 0, err
    for key, typ in [("accuracy", float), ("mean_per_class", float), ("classes", int), ("train", int),
                     ("test", int), ("method", str), ("C", float), ("seconds", float)]:
        assert isinstance(out[key], typ), key
    assert out["map"] is None and out["classes"] == 3 and out["train"] == 18 and out["test"] == 9
    assert out["method"] == method and out["jitter"] == int(jitter) and out["cv"] == 3
    assert out["accuracy"] == 1.0
    assert np.array(out["confusion_matrix"]).sum() == 9 and out["skipped"] == []


def test_cli_train_eval_predict(fake_backbone, dataset, tmp_path, capsys):
    model, store = tmp_path / "m.npz", str(tmp_path / "s.sqlite")
    code, out, err = _run(capsys, ["train", str(dataset), "--out", str(model), "--jitter", "12",
                                   "--store", store, "--json", *FAKE])
    assert code == 0, err
    assert load_model(model).meta_["extractor"]["backbone"] == "fake-colour"
    assert load_model(model).meta_["jitter"] == 12
    code, out, err = _run(capsys, ["eval", str(model), str(dataset / "test"), "--store", store, "--json", "--quiet"])
    assert code == 0, err
    assert out["accuracy"] == 1.0 and out["test"] == 9 and out["extracted"] == 9
    img = dataset / "test" / "blue" / "blue0.png"
    code, out, err = _run(capsys, ["predict", str(model), str(img), "--store", store, "--json", "--quiet"])
    assert code == 0, err
    (pred,) = out["predictions"]
    assert pred["label"] == "blue" and set(pred["scores"]) == set(COLOURS) and out["skipped"] == []
    code, _, err = _run(capsys, ["eval", str(tmp_path / "missing.npz"), str(dataset / "test")])
    assert code == 2 and "missing.npz" in err


def test_empty_class_folder_named(fake_backbone, dataset, tmp_path, capsys):
    (dataset / "train" / "purple").mkdir()
    (dataset / "train" / "purple" / "notes.txt").write_text("no images here")
    code, _, err = _run(capsys, ["run", str(dataset), "--store", str(tmp_path / "s.sqlite"), *FAKE])
    assert code == 2
    assert "purple" in err and "no images" in err


@pytest.mark.parametrize("method", ["svm", "logreg"])
def test_class_with_one_training_image_warned_and_learned(fake_backbone, dataset, tmp_path, capsys, method):
    # Held out in cross-validation, the only blue image left blue out of that fold's
    # training: every C missed it alike, the tie-break took the smallest C, and that
    # model called every test image red or green.
    for i in range(1, 6):
        (dataset / "train" / "blue" / f"blue{i}.png").unlink()
    code, out, err = _run(capsys, ["run", str(dataset), "--method", method, "--cv", "3",
                                   "--store", str(tmp_path / "s.sqlite"), "--json", *FAKE])
    assert code == 0, err
    assert "'blue' has a single training image" in err
    assert out["per_class_accuracy"][out["labels"].index("blue")] == 1.0
    assert out["accuracy"] == 1.0


def test_unseen_test_class_reported(fake_backbone, dataset, tmp_path, capsys):
    _image(dataset / "test" / "grey" / "g.png", (128, 128, 128), 7)
    code, out, err = _run(capsys, ["run", str(dataset), "--store", str(tmp_path / "s.sqlite"), "--json", *FAKE])
    assert code == 0, err
    assert out["unseen_test_classes"] == {"grey": 1} and out["test"] == 9
    assert "grey" in err


def test_corrupt_image_skipped_exit_3(fake_backbone, dataset, tmp_path, capsys):
    bad = dataset / "train" / "red" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    code, out, err = _run(capsys, ["run", str(dataset), "--store", str(tmp_path / "s.sqlite"), "--json", *FAKE])
    assert code == 3
    assert [s["path"] for s in out["skipped"]] == [str(bad.resolve())]
    assert out["skipped"][0]["reason"] and str(bad.resolve()) in err
    assert out["train"] == 18


def test_store_reuse_no_second_extraction(fake_backbone, dataset, tmp_path, capsys, monkeypatch):
    store_path = tmp_path / "shared.sqlite"
    # 1) a retrieval-style extraction of level 1 with the same configuration fills the store
    config = ExtractorConfig(backbone="fake-colour", weights="none")
    paths = sorted(str(p.resolve()) for p in dataset.rglob("*.png"))
    with FeatureStore.open(store_path) as store:
        first = list(describe(paths, Extractor(config, RuntimeConfig(batch_size=8, workers=1)), store, ["level1"], progress=False))
    assert len(first) == 27 and all(f.extracted for f in first)
    # 2) classify must not run the network again
    def refuse(*a, **k):
        raise AssertionError("extraction ran although every image is in the store")

    monkeypatch.setattr(Extractor, "extract", refuse)
    code, out, err = _run(capsys, ["run", str(dataset), "--store", str(store_path), "--json", *FAKE])
    assert code == 0, err
    assert out["extracted"] == 0 and out["accuracy"] == 1.0
    # the vectors equal the encoding of the stored level-1 rows
    with FeatureStore.open(store_path) as store:
        table = image_vectors(paths[:1], Extractor(config), store, 1, progress=False)
    assert np.allclose(table.vectors[paths[0]], encode(first[[f.path for f in first].index(paths[0])].descriptors["level1"]))


def test_c_selection_in_run_uses_train_rows_only(fake_backbone, dataset, tmp_path, capsys, monkeypatch):
    seen = []

    class Spy(Classifier):
        def fit(self, X, y, X_val=None, y_val=None, classes=None):
            seen.append((len(X), None if X_val is None else len(X_val), list(y)))
            return super().fit(X, y, X_val, y_val, classes)

    monkeypatch.setattr("classify.protocol.Classifier", Spy)
    _make_split(dataset, "validation", COLOURS, 2, seed=5000)
    code, out, err = _run(capsys, ["run", str(dataset), "--store", str(tmp_path / "s.sqlite"), "--json", *FAKE])
    assert code == 0, err
    (n_rows, n_val, labels), = seen
    # C is chosen by repeated CV of the training part: train (18) + validation (6), no test row
    assert (n_rows, n_val) == (24, None) and out["selection"] == "cv" and out["test"] == 9
    assert out["cv"] == 4 and out["cv_repeats"] == 3
    assert out["train"] == 24 and out["validation"] == 6


def test_no_test_dir_means_val_is_test(fake_backbone, tmp_path, capsys):
    root = tmp_path / "hym"
    _make_split(root, "train", ["red", "blue"], 5)
    _make_split(root, "val", ["red", "blue"], 2, seed=99)
    code, out, err = _run(capsys, ["run", str(root), "--cv", "2", "--store", str(tmp_path / "s.sqlite"), "--json", *FAKE])
    assert code == 0, err
    assert out["test"] == 4 and out["train"] == 10 and out["selection"] == "cv"


@pytest.mark.parametrize("method", ["svm", "logreg"])
def test_csv_multilabel(fake_backbone, tmp_path, capsys, method):
    root = tmp_path / "ml"
    rows = {"train": [], "test": []}
    for split, n, seed in (("train", 8, 0), ("test", 3, 500)):
        for i in range(n):
            for name, colour, labels in (("r", (220, 30, 30), "warm"), ("b", (30, 30, 220), "cold"),
                                         ("m", (200, 30, 200), "warm,cold")):
                p = root / "img" / f"{split}_{name}{i}.png"
                _image(p, colour, seed + i * 7 + ord(name))
                rows[split].append(f"img/{p.name},{labels}")
    for split in rows:
        (root / f"{split}.csv").write_text("path,labels\n" + "\n".join(rows[split]) + "\n")
    code, out, err = _run(capsys, ["run", str(root), "--method", method, "--cv", "2",
                                   "--store", str(tmp_path / "s.sqlite"), "--json", *FAKE])
    assert code == 0, err
    assert out["multilabel"] is True and isinstance(out["map"], float) and out["map"] > 0.9
    assert out["classes"] == 2 and out["test"] == 9


def test_real_backbone_end_to_end(tmp_path, capsys):
    """Random-init torchvision network through the real extractor (no fake)."""
    root = tmp_path / "data"
    _make_split(root, "train", ["red", "blue"], 3)
    _make_split(root, "test", ["red", "blue"], 1, seed=77)
    store = str(tmp_path / "s.sqlite")
    argv = ["run", str(root), "--backbone", "resnet18", "--weights", "none", "--input-spec", "size=64", "--device", "cpu",
            "--cv", "2", "--method", "svm", "--jitter", "12", "--store", store, "--json", "--quiet", "--workers", "1"]
    code, out, err = _run(capsys, argv)
    assert code == 0, err
    assert out["extracted"] == 8 and out["test"] == 2
    code, out, err = _run(capsys, argv)
    assert code == 0 and out["extracted"] == 0


def test_features_from_retrieval_build_are_reused(tmp_path, capsys, monkeypatch):
    """`retrieval build` (the real CLI, real network) fills the store; `classify run` with
    the same extractor flags and store then extracts nothing."""
    from conftest import make_scene, run_cli

    data = tmp_path / "data"
    for split, n in (("train", 3), ("test", 2)):
        for c, cls in enumerate(("ants", "bees")):
            folder = data / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                make_scene(100 * c + 10 * (split == "test") + i, size=(96, 72)).save(folder / f"{i}.jpg")
    store = tmp_path / "shared.sqlite"
    flags = ["--backbone", "resnet18", "--weights", "none", "--input-spec", "size=64", "--store", str(store)]
    built = run_cli("build", str(tmp_path / "idx"), str(data), *flags, "--levels", "1", "--pca-dim", "4", "--quiet", "--json")
    assert built.returncode == 0, built.stderr
    assert json.loads(built.stdout)["added"] == 10

    def refuse(*a, **k):
        raise AssertionError("classify extracted although retrieval build stored every image")

    monkeypatch.setattr(Extractor, "extract", refuse)
    code, out, err = _run(capsys, ["run", str(data), *flags, "--cv", "3", "--json", "--quiet"])
    assert code == 0, err
    assert out["extracted"] == 0 and out["train"] == 6 and out["test"] == 4
