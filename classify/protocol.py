"""The evaluation protocol of `classify run`, shared by `classify factors`.

C is chosen on the training part only, by k-fold cross-validation of train + validation
repeated `CV_REPEATS` times (held-out scores averaged), the model is refit on train +
validation at that C, and the test split is used once.

A validation split joins the cross-validation pool instead of being the only held-out
set: one split of a few hundred images cannot tell neighbouring C apart (their held-out
accuracies differ by single images; benchmarks/results/factors.md), while repeated
folds over the whole training part score every image `CV_REPEATS` times. This is also the
procedure of the plain baseline (LogisticRegressionCV over train + validation).
"""
from __future__ import annotations

import sys
from collections import Counter

from . import metrics
from .data import DataError, Dataset, Split
from .features import FeatureTable
from .models import CV_REPEATS, Classifier, to_indicator

__all__ = ["usable", "fit_training_part", "evaluate_split", "run_protocol", "warn_C_at_edge"]


def usable(split: Split | None, table: FeatureTable) -> tuple[list[str], list[tuple[str, ...]]]:
    """The paths of `split` that have a vector in `table` (readable images), and their labels."""
    if split is None:
        return [], []
    keep = [i for i, p in enumerate(split.paths) if p in table.vectors]
    return [split.paths[i] for i in keep], [split.labels[i] for i in keep]


def fit_training_part(ds: Dataset, table: FeatureTable, method: str, cv: int, seed: int,
                      repeats: int = CV_REPEATS) -> tuple[Classifier, int, int]:
    """Choose C by repeated CV of the training part (train + validation) and fit on it;
    -> (clf, n_train, n_val)."""
    tr_paths, tr_labels = usable(ds.train, table)
    va_paths, va_labels = usable(ds.val, table)
    have = {c for labs in tr_labels + va_labels for c in labs}
    lost = [c for c in ds.classes if c not in have]
    if lost:
        raise DataError(f"training class {', '.join(lost)} has no readable image (all were skipped)")
    counts = Counter(c for labs in tr_labels + va_labels for c in labs)
    for c in sorted(c for c, n in counts.items() if n == 1):
        print(f"classify: warning: class {c!r} has a single training image: expect its predictions to be "
              "unreliable (add images); cross-validation cannot hold it out and scores it on itself",
              file=sys.stderr)
    clf = Classifier(method=method, cv=cv, random_state=seed, repeats=repeats)
    clf.fit(table.matrix(tr_paths + va_paths), tr_labels + va_labels, classes=ds.classes)
    return clf, len(tr_paths) + len(va_paths), len(va_paths)


def evaluate_split(clf: Classifier, split: Split, table: FeatureTable) -> dict:
    """Metrics on the readable images of `split`; test classes unknown to the model are
    reported and their images left out of the metrics (no model can predict them)."""
    paths, labels = usable(split, table)
    known = set(clf.classes_)
    unseen: dict[str, int] = {}
    for labs in labels:
        for c in labs:
            if c not in known:
                unseen[c] = unseen.get(c, 0) + 1
    keep = [i for i, labs in enumerate(labels) if not labs or any(c in known for c in labs)]
    for c, n in sorted(unseen.items()):
        print(f"classify: warning: test class {c!r} ({n} images) was not seen in training; "
              "its images are left out of the metrics", file=sys.stderr)
    X = table.matrix([paths[i] for i in keep])
    Y = to_indicator([labels[i] for i in keep], clf.classes_)
    if len(keep) == 0:
        raise DataError(f"{split.name} split: no readable image of a known class to evaluate")
    out = metrics.evaluate(clf.decision_function(X), Y, multilabel=clf.multilabel_)
    out.update(test=len(keep), unseen_test_classes=dict(sorted(unseen.items())), labels=list(clf.classes_))
    return out




def run_protocol(ds: Dataset, table: FeatureTable, method: str, cv: int, seed: int,
                 repeats: int = CV_REPEATS) -> tuple[Classifier, dict]:
    """Fit on the training part, evaluate once on the test split; -> (clf, the metrics and
    C-selection fields of `classify run --json`)."""
    clf, n_train, n_val = fit_training_part(ds, table, method, cv, seed, repeats)
    res = evaluate_split(clf, ds.test, table)
    sel = clf.selection_
    return clf, {
        "accuracy": res["accuracy"], "mean_per_class": res["mean_per_class"], "map": res["map"],
        "classes": len(clf.classes_), "train": n_train, "test": res["test"], "method": method,
        "C": clf.C_, "C_at_edge": clf.C_at_edge_, "validation": n_val, "selection": sel["mode"],
        "cv": sel["folds"] if sel["mode"] == "cv" else None,
        "cv_repeats": sel["repeats"] if sel["mode"] == "cv" else None,
        "sweep_seconds": sel["sweep_seconds"], "fit_seconds": sel["fit_seconds"],
        "sweep_Cs": sel["Cs"], "sweep_scores": sel["scores"], "sweep_iterations": sel["n_iter"],
        "multilabel": clf.multilabel_, "labels": res["labels"],
        "per_class_accuracy": res["per_class_accuracy"], "confusion_matrix": res["confusion_matrix"],
        "unseen_test_classes": res["unseen_test_classes"],
    }


def warn_C_at_edge(clf: Classifier) -> None:
    """Say on stderr when the chosen C is an end of its grid: the best C may lie beyond."""
    if clf.C_at_edge_:
        Cs = clf.selection_["Cs"]
        print(f"classify: warning: C={clf.C_:.3g} is the {clf.C_at_edge_} value of the grid "
              f"({Cs[0]:.3g}..{Cs[-1]:.3g}); the best C may lie outside it", file=sys.stderr)
