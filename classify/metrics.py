"""Classification metrics: top-1 accuracy, mean per-class accuracy, 11-point VOC mAP.

All functions take a score matrix ``scores`` [n, K] (higher = more likely; any monotone
score works) and a label indicator matrix ``Y`` [n, K] of 0/1 (one 1 per row for a
single-label task). Multi-label definitions generalise the single-label ones:

* top-1 accuracy: the fraction of images whose top-scoring class is one of their labels
  (images without any label, possible in multi-label tasks, are left out: they count
  only in the mAP);
* per-class accuracy of class c: among the images labelled c, the fraction for which c is
  among the top-k scores, k = that image's number of labels (k = 1: the top-1 is c);
  mean per-class accuracy averages it over the classes with at least one image;
* confusion matrix [K, K]: row = true class, column = top-1 prediction; an image with
  several labels is counted once in the row of each of its labels;
* mAP: the mean over classes with at least one positive of the PASCAL VOC 2007 11-point
  interpolated average precision.
"""
from __future__ import annotations

import numpy as np

__all__ = ["top1_accuracy", "per_class_accuracy", "mean_per_class_accuracy", "confusion", "voc07_ap", "mean_ap", "evaluate"]


def _check(scores: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    Y = np.asarray(Y).astype(bool)
    if scores.ndim != 2 or scores.shape != Y.shape:
        raise ValueError(f"scores {scores.shape} and labels {Y.shape} must both be [n, K]")
    return scores, Y


def top1_accuracy(scores: np.ndarray, Y: np.ndarray) -> float:
    """Fraction of rows whose arg-max score is a true label."""
    scores, Y = _check(scores, Y)
    labelled = Y.any(axis=1)
    if not labelled.any():
        return float("nan")
    top = scores.argmax(axis=1)
    return float(Y[np.arange(len(Y)), top][labelled].mean())


def per_class_accuracy(scores: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Per-class accuracy [K] (NaN for classes without images); see the module docstring."""
    scores, Y = _check(scores, Y)
    k = Y.sum(axis=1)
    # Rank of each class within its row (0 = top score); ties resolved by class order,
    # like argmax, so single-label per-class accuracy agrees with the confusion matrix.
    order = np.argsort(-scores, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(scores.shape[1])[None, :].repeat(len(scores), 0), axis=1)
    hit = Y & (rank < k[:, None])
    counts = Y.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, hit.sum(axis=0) / np.maximum(counts, 1), np.nan)


def mean_per_class_accuracy(scores: np.ndarray, Y: np.ndarray) -> float:
    """Mean of `per_class_accuracy` over the classes that have at least one image."""
    acc = per_class_accuracy(scores, Y)
    return float(np.nanmean(acc)) if np.isfinite(acc).any() else float("nan")


def confusion(scores: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Confusion matrix [K, K] of ints: rows true class, columns top-1 prediction."""
    scores, Y = _check(scores, Y)
    K = scores.shape[1]
    cm = np.zeros((K, K), dtype=np.int64)
    top = scores.argmax(axis=1)
    rows, cols = np.nonzero(Y)
    np.add.at(cm, (cols, top[rows]), 1)
    return cm


def voc07_ap(scores: np.ndarray, positive: np.ndarray) -> float:
    """PASCAL VOC 2007 11-point interpolated AP of one class.

    AP = mean over t in {0, 0.1, ..., 1} of the maximum precision at any recall >= t
    (0 when recall t is never reached). NaN when there is no positive.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positive = np.asarray(positive).astype(bool).ravel()
    n_pos = int(positive.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(positive[order])
    fp = np.cumsum(~positive[order])
    recall = tp / n_pos
    precision = tp / np.maximum(tp + fp, 1)
    ap = 0.0
    for t in np.linspace(0.0, 1.0, 11):
        reached = recall >= t - 1e-12
        ap += precision[reached].max() if reached.any() else 0.0
    return float(ap / 11.0)


def mean_ap(scores: np.ndarray, Y: np.ndarray) -> float:
    """Mean 11-point VOC AP over the classes with at least one positive."""
    scores, Y = _check(scores, Y)
    aps = [voc07_ap(scores[:, c], Y[:, c]) for c in range(Y.shape[1]) if Y[:, c].any()]
    return float(np.mean(aps)) if aps else float("nan")


def evaluate(scores: np.ndarray, Y: np.ndarray, *, multilabel: bool = False) -> dict:
    """The metrics of a test run: accuracy, mean_per_class, map (None unless multi-label),
    per_class (list, None for classes without images) and confusion_matrix (list of lists)."""
    scores, Y = _check(scores, Y)
    per_class = per_class_accuracy(scores, Y)
    return {
        "accuracy": top1_accuracy(scores, Y),
        "mean_per_class": mean_per_class_accuracy(scores, Y),
        "map": mean_ap(scores, Y) if multilabel else None,
        "per_class_accuracy": [None if np.isnan(a) else float(a) for a in per_class],
        "confusion_matrix": confusion(scores, Y).tolist(),
    }
