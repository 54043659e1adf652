"""Linear classifiers on image vectors, and the choice of C on the training part only.

`Classifier(method="svm")`: linear SVMs (liblinear, squared hinge, through
scikit-learn's LinearSVC). Single-label tasks: one-vs-one with voting (ties broken by the
summed confidences, as scikit-learn's OneVsOneClassifier does). Multi-label tasks:
one-vs-all, one SVM per class. C is chosen from `SVM_CS` (1e-3 .. 1e2, 6 log-spaced
values).

`Classifier(method="logreg")`: L2-regularised logistic regression minimised with L-BFGS
(scipy). Single-label tasks: multinomial (softmax over all classes, also for two
classes). Multi-label tasks: one sigmoid per class, fitted jointly. The objective is
scikit-learn's, divided by C * n: ``mean loss + ||W||^2 / (2 C n)``; the intercept is
not penalised. C runs over `LOGREG_CS` (45 log-spaced values in [1e-6, 1e5]) from
the smallest up, each fit starting from the previous solution (warm start). Each fit
stops like scikit-learn's lbfgs defaults: max|gradient| <= 1e-4 or 100 iterations (on
separable data large C has no finite optimum; the path then moves on).

Choosing C: on the validation split when one is given to `fit` (then the final model is
fitted on train + validation), otherwise by k-fold cross-validation (stratified for
single-label tasks, shuffled; the only image of a class is trained on in every fold and
scored on itself, see `cv_folds`) of the training data, repeated `repeats` times with
different shuffles (seeds random_state, random_state + 1, ...). Test data never enter.
The criterion is the held-out top-1 accuracy (mAP for multi-label tasks) averaged over
every held-out part; ties go to the lower held-out log-loss for logreg, and to the
smaller C for the SVM.

Why repeated: held-out accuracies of neighbouring C differ by single images, so one
shuffle of the folds (or one validation split of a few hundred images) picks C by
chance among a plateau (benchmarks/results/factors.md: the chosen C moved between
5.6 and 100 with the --cv value alone). Averaging `CV_REPEATS` shuffles holds every
image out that many times and makes the choice depend on the data, not on one split.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
from scipy.special import expit, log_expit, logsumexp

from retrieval.config import ConfigError

from . import metrics
from .modelfile import read_model_file, write_model_file

__all__ = ["LOGREG_CS", "SVM_CS", "METHODS", "CV_REPEATS", "LinearModel", "logreg_path", "fit_svm", "cv_folds", "Classifier",
           "to_indicator"]

LOGREG_CS = np.logspace(-6, 5, 45)
SVM_CS = np.logspace(-3, 2, 6)
METHODS = ("svm", "logreg")
# Shuffles of the k-fold split whose held-out scores are averaged to choose C (see above).
CV_REPEATS = 3
MAX_ITER = 100  # per C, as scikit-learn; a warm-started path rarely needs it


@dataclass
class LinearModel:
    """Scores = X @ W.T + b, then combined per `kind`.

    kind: ``softmax`` (multinomial logreg), ``sigmoid`` (multi-label logreg), ``ova``
    (one SVM per class), ``ovo`` (one SVM per class pair; `pairs` [P, 2] holds (i, j),
    a positive decision votes for j).
    """

    kind: str
    W: np.ndarray
    b: np.ndarray
    n_classes: int
    pairs: np.ndarray | None = None

    def raw(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X, dtype=np.float64) @ self.W.T + self.b

    def decision(self, X: np.ndarray) -> np.ndarray:
        """[n, K] class scores: logits, per-class margins, or OvO votes + confidences."""
        Z = self.raw(X)
        if self.kind != "ovo":
            return Z
        n, K = len(Z), self.n_classes
        votes = np.zeros((n, K))
        conf = np.zeros((n, K))
        for p, (i, j) in enumerate(self.pairs):
            pos = Z[:, p] > 0
            votes[pos, j] += 1
            votes[~pos, i] += 1
            conf[:, j] += Z[:, p]
            conf[:, i] -= Z[:, p]
        # Confidences are squashed into (-1/3, 1/3) so they only break ties between votes.
        return votes + conf / (3 * (np.abs(conf) + 1))

    def proba(self, X: np.ndarray) -> np.ndarray:
        Z = self.raw(X)
        if self.kind == "softmax":
            return np.exp(Z - logsumexp(Z, axis=1, keepdims=True))
        if self.kind == "sigmoid":
            return expit(Z)
        raise ValueError("probabilities exist for logistic regression only")


def to_indicator(labels: Sequence, classes: Sequence[str]) -> np.ndarray:
    """Labels (a class name, or a tuple of names, per row) -> 0/1 matrix [n, K].
    Names not in `classes` are dropped (an unseen class has no column)."""
    index = {c: k for k, c in enumerate(classes)}
    Y = np.zeros((len(labels), len(classes)), dtype=np.float64)
    for r, lab in enumerate(labels):
        for c in (lab,) if isinstance(lab, str) else lab:
            if c in index:
                Y[r, index[c]] = 1.0
    return Y


# --------------------------------------------------------------------------- logreg


def _objective(w: np.ndarray, X: np.ndarray, XT: np.ndarray, Y: np.ndarray, C: float, softmax: bool):
    n, D = X.shape
    K = Y.shape[1]
    W = w[: D * K].reshape(K, D)
    b = w[D * K :]
    Z = X @ W.T + b
    if softmax:
        lse = logsumexp(Z, axis=1)
        loss = float(np.mean(lse - np.sum(Y * Z, axis=1)))
        G = np.exp(Z - lse[:, None]) - Y
    else:
        loss = float(np.mean(np.sum(-Y * log_expit(Z) - (1 - Y) * log_expit(-Z), axis=1)))
        G = expit(Z) - Y
    G /= n
    reg = 1.0 / (C * n)
    f = loss + 0.5 * reg * float(np.sum(W * W))
    # XT is X transposed and contiguous: G.T @ X on a strided view is several times slower.
    gW = (XT @ G).T + reg * W
    return f, np.concatenate([gW.ravel(), G.sum(axis=0)])


def lbfgs(fun, x0: np.ndarray, *, max_iter: int = MAX_ITER, m: int = 10, gtol: float = 1e-4,
          ftol: float = 1e-10, h0: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Minimise `fun` (returns value, gradient) by L-BFGS with Armijo backtracking.

    Returns (x, iterations). Written here because scipy's L-BFGS-B spends ~10x longer
    per iteration than the objective itself at 10k+ variables (a 45-C sweep on 3k images
    x 1280 dims took minutes); the two-loop recursion below costs O(m n).
    Stops when max|grad| <= gtol or the relative decrease of f falls below ftol. `h0`
    (inverse curvature per variable) scales the first step, which matters on a
    warm-started path where the gradient is small and a unit step overshoots.
    """
    x = np.array(x0, dtype=np.float64)
    f, g = fun(x)
    hist: list[tuple[np.ndarray, np.ndarray, float]] = []
    nit = 0
    while nit < max_iter and np.max(np.abs(g)) > gtol:
        q = g.copy()
        alphas = []
        for s, y, rho in reversed(hist):
            a = rho * float(s @ q)
            q -= a * y
            alphas.append(a)
        if hist:
            s, y, _ = hist[-1]
            q *= float(s @ y) / float(y @ y)
        elif h0 is not None:
            q *= h0
        else:
            q /= max(float(np.linalg.norm(g)), 1e-12)  # first step: unit length
        for (s, y, rho), a in zip(hist, reversed(alphas)):
            q += s * (a - rho * float(y @ q))
        d = -q
        gd = float(g @ d)
        if gd >= 0:  # not a descent direction: restart from steepest descent
            hist.clear()
            d = -g / max(float(np.linalg.norm(g)), 1e-12)
            gd = float(g @ d)
        step = 1.0
        while True:
            f_new, g_new = fun(x + step * d)
            if f_new <= f + 1e-4 * step * gd:
                break
            step *= 0.5
            if step < 1e-12:
                return x, nit
        s = step * d
        y = g_new - g
        sy = float(s @ y)
        if sy > 1e-12:  # keep the curvature pair only when it is positive
            hist.append((s, y, 1.0 / sy))
            if len(hist) > m:
                hist.pop(0)
        x = x + s
        nit += 1
        done = abs(f - f_new) <= ftol * max(1.0, abs(f))
        f, g = f_new, g_new
        if done:
            break
    return x, nit


def logreg_path(
    X: np.ndarray,
    Y: np.ndarray,
    Cs: Sequence[float],
    *,
    multilabel: bool = False,
    warm_start: bool = True,
    max_iter: int = MAX_ITER,
) -> Iterator[tuple[float, LinearModel, int]]:
    """Fit L2 logistic regression for each C in `Cs` (in the given order); yields
    (C, model, L-BFGS iterations). With `warm_start`, each fit starts from the previous
    solution, which is what makes a 45-value sweep cheap."""
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    n, D = X.shape
    K = Y.shape[1]
    softmax = not multilabel
    XT = np.ascontiguousarray(X.T)
    sq_norm = float(np.max(np.sum(X * X, axis=1))) if n else 1.0
    w = np.zeros(K * D + K)
    for C in Cs:
        # Strong regularisation (C * n << 1) makes the weights ~1/(C n) times stiffer than
        # the unpenalised intercept, and L-BFGS crawls (hundreds of iterations). Optimising
        # the weights in units of sqrt(C n) there balances the two.
        scale = np.ones_like(w)
        scale[: K * D] = min(1.0, np.sqrt(float(C) * n))
        x0 = (w if warm_start else np.zeros_like(w)) / scale

        def fun(v, C=float(C), scale=scale):
            f, g = _objective(v * scale, X, XT, Y, C, softmax)
            return f, g * scale

        # Upper bound of the curvature: penalty + softmax/sigmoid Hessian (<= 1/2 |x|^2).
        h0 = np.full_like(w, 2.0)
        h0[: K * D] = 1.0 / (scale[0] ** 2 * (1.0 / (float(C) * n) + 0.5 * sq_norm))
        v, nit = lbfgs(fun, x0, max_iter=max_iter, h0=h0)
        w = v * scale
        model = LinearModel("softmax" if softmax else "sigmoid", w[: K * D].reshape(K, D).copy(), w[K * D :].copy(), K)
        yield float(C), model, nit


def _log_loss(model: LinearModel, X: np.ndarray, Y: np.ndarray) -> float:
    P = np.clip(model.proba(X), 1e-15, 1 - 1e-15)
    if model.kind == "softmax":
        return float(-np.mean(np.sum(Y * np.log(P), axis=1)))
    return float(-np.mean(np.sum(Y * np.log(P) + (1 - Y) * np.log(1 - P), axis=1)))


# --------------------------------------------------------------------------- svm


def _binary_svm(X: np.ndarray, y: np.ndarray, C: float) -> tuple[np.ndarray, float]:
    """One liblinear SVM; a one-sided problem gets a constant decision of that side."""
    from sklearn.svm import LinearSVC

    if y.all() or not y.any():
        return np.zeros(X.shape[1]), 1.0 if y.all() else -1.0
    svm = LinearSVC(C=C, dual="auto", max_iter=5000, random_state=0)
    with warnings.catch_warnings():
        # liblinear may stop at max_iter for large C; the fit is still usable.
        warnings.simplefilter("ignore")
        svm.fit(X, y.astype(int))
    return svm.coef_[0].astype(np.float64), float(svm.intercept_[0])


def fit_svm(X: np.ndarray, Y: np.ndarray, C: float, *, multilabel: bool = False) -> LinearModel:
    """One-vs-all SVMs (multi-label) or one-vs-one SVMs (single-label) at this C."""
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y).astype(bool)
    K = Y.shape[1]
    if multilabel:
        fits = [_binary_svm(X, Y[:, k], C) for k in range(K)]
        return LinearModel("ova", np.stack([w for w, _ in fits]), np.array([b for _, b in fits]), K)
    pairs = np.array([(i, j) for i in range(K) for j in range(i + 1, K)], dtype=np.int64).reshape(-1, 2)
    Ws, bs = [], []
    for i, j in pairs:
        rows = Y[:, i] | Y[:, j]
        w, b = _binary_svm(X[rows], Y[rows, j], C)
        Ws.append(w)
        bs.append(b)
    W = np.stack(Ws) if Ws else np.zeros((0, X.shape[1]))
    return LinearModel("ovo", W, np.array(bs, dtype=np.float64), K, pairs)


# --------------------------------------------------------------------------- selection


def cv_folds(Y: np.ndarray, k: int, multilabel: bool, seed: int, repeats: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train rows, held-out rows) of `k`-fold cross-validation over the rows of `Y` [n, K]:
    stratified for single-label tasks, shuffled with `seed`; with `repeats` > 1, the folds
    of `repeats` shuffles (seeds seed, seed + 1, ...) one after the other (k * repeats
    pairs, every row held out `repeats` times).

    A row holding the only image of a class cannot be validated: held out (even by
    leave-one-out), its class would be missing from that fold's training part and it
    would be misclassified at every C, so no held-out score could tell a C that learns
    the class from one that ignores it, and the tie-breaks chose the smallest C, a model
    predicting the other classes everywhere. Such a row is therefore in every fold's
    training part *and* scored in every held-out part: a C too small to fit even its own
    training image loses. Multi-label tasks with fewer than `k` other rows use that many
    folds.
    Raises ConfigError (a usage error, naming `--cv` with the value given) when the
    training data cannot be split `k` ways.
    """
    from sklearn.model_selection import KFold, StratifiedKFold

    if k < 2:
        raise ConfigError(f"--cv needs at least 2 folds (got {k})")
    if repeats < 1:
        raise ConfigError(f"--cv-repeats needs at least 1 (got {repeats})")
    if repeats > 1:
        return [pair for r in range(repeats) for pair in cv_folds(Y, k, multilabel, seed + r)]
    Y = np.asarray(Y)
    counts = Y.sum(axis=0)
    single = (Y[:, counts == 1] > 0).any(axis=1)
    rows, kept = np.flatnonzero(~single), np.flatnonzero(single)
    if multilabel:
        if len(rows) < 2:
            raise ConfigError(f"--cv {k}: cross-validation needs at least 2 training images of "
                              f"classes that have more than one (got {len(rows)}); add images")
        parts = KFold(min(k, len(rows)), shuffle=True, random_state=seed).split(rows)
    else:
        y = Y.argmax(axis=1)
        largest = int(counts.max()) if len(Y) else 0
        if largest < k:
            fix = f"use --cv {largest} or add images" if largest >= 2 else "add images"
            raise ConfigError(f"--cv {k} needs at least {k} training images in some class, "
                              f"but the largest class has {largest}: {fix}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "least populated class has fewer members than folds"
            parts = StratifiedKFold(k, shuffle=True, random_state=seed).split(rows, y[rows])
    return [(np.concatenate([rows[a], kept]), np.concatenate([rows[b], kept])) for a, b in parts]


def _score(scores: np.ndarray, Y: np.ndarray, multilabel: bool) -> float:
    return metrics.mean_ap(scores, Y) if multilabel else metrics.top1_accuracy(scores, Y)


class Classifier:
    """Linear classifier with C chosen on training data only (scikit-learn style).

    >>> clf = Classifier(method="logreg", cv=4).fit(X_train, y_train)
    >>> clf.C_, clf.predict(X_test), clf.decision_function(X_test)

    `y` is a sequence of class names (single-label) or of tuples of names (multi-label:
    chosen when any row does not have exactly one label). `Cs` defaults to `LOGREG_CS`
    or `SVM_CS`; a single value skips the selection. Without a validation split, C is
    chosen by `cv`-fold cross-validation repeated `repeats` times (module docstring).

    Fitted attributes: ``classes_``, ``multilabel_``, ``C_``, ``model_`` (LinearModel),
    ``selection_`` (dict: mode, folds, repeats, Cs, scores, n_iter, sweep_seconds).
    """

    def __init__(
        self,
        method: str = "logreg",
        Cs: Sequence[float] | None = None,
        cv: int = 4,
        *,
        warm_start: bool = True,
        random_state: int = 0,
        repeats: int = CV_REPEATS,
    ) -> None:
        self.method = method
        self.Cs = Cs
        self.cv = cv
        self.repeats = repeats
        self.warm_start = warm_start
        self.random_state = random_state

    # sklearn-style parameter access
    def get_params(self, deep: bool = True) -> dict:
        return {k: getattr(self, k) for k in ("method", "Cs", "cv", "warm_start", "random_state", "repeats")}

    def set_params(self, **params) -> "Classifier":
        for k, v in params.items():
            setattr(self, k, v)
        return self

    def _grid(self) -> np.ndarray:
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)} (got {self.method!r})")
        grid = LOGREG_CS if self.Cs is None and self.method == "logreg" else SVM_CS if self.Cs is None else self.Cs
        return np.sort(np.asarray(grid, dtype=np.float64))

    def _fit_one(self, X: np.ndarray, Y: np.ndarray, C: float) -> LinearModel:
        if self.method == "svm":
            return fit_svm(X, Y, C, multilabel=self.multilabel_)
        # Follow the warm-started path up to C: the same solution a sweep reaches.
        grid = [c for c in self._grid() if c < C] + [C]
        *_, (_, model, _) = logreg_path(X, Y, grid, multilabel=self.multilabel_, warm_start=self.warm_start)
        return model

    def _sweep(self, X: np.ndarray, Y: np.ndarray, held: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]):
        """Held-out score (and tie-break loss) of every C, averaged over the `held` splits."""
        grid = self._grid()
        scores = np.zeros((len(held), len(grid)))
        losses = np.zeros((len(held), len(grid)))
        iters = np.zeros(len(grid), dtype=np.int64)
        for f, (Xa, Ya, Xb, Yb) in enumerate(held):
            if self.method == "logreg":
                path = logreg_path(Xa, Ya, grid, multilabel=self.multilabel_, warm_start=self.warm_start)
                for c, (_, model, nit) in enumerate(path):
                    scores[f, c] = _score(model.decision(Xb), Yb, self.multilabel_)
                    losses[f, c] = _log_loss(model, Xb, Yb)
                    iters[c] += nit
            else:
                for c, C in enumerate(grid):
                    model = fit_svm(Xa, Ya, C, multilabel=self.multilabel_)
                    scores[f, c] = _score(model.decision(Xb), Yb, self.multilabel_)
                    losses[f, c] = c  # ties -> smaller C
        mean_s = np.nanmean(scores, axis=0)
        mean_l = losses.mean(axis=0)
        best = min(range(len(grid)), key=lambda c: (-mean_s[c], mean_l[c]))
        return grid, best, mean_s, iters

    def fit(self, X: np.ndarray, y: Sequence, X_val: np.ndarray | None = None, y_val: Sequence | None = None,
            classes: Sequence[str] | None = None) -> "Classifier":
        """Choose C (on X_val/y_val if given, else by `cv`-fold CV of X), then fit on all
        the given data (X plus X_val) at that C."""
        labels = list(y) + (list(y_val) if y_val is not None else [])
        self.multilabel_ = any(not isinstance(lab, str) and len(lab) != 1 for lab in labels)
        self.classes_ = sorted(classes) if classes is not None else sorted(
            {c for lab in labels for c in ((lab,) if isinstance(lab, str) else lab)}
        )
        if len(self.classes_) < 2:
            raise ValueError(f"need at least 2 classes to train (got {self.classes_})")
        X = np.asarray(X, dtype=np.float64)
        Y = to_indicator(list(y), self.classes_)
        grid = self._grid()
        t0 = time.perf_counter()
        if len(grid) == 1:
            self.C_ = float(grid[0])
            self.selection_ = {"mode": "fixed", "folds": 0, "repeats": 0, "Cs": grid.tolist(), "scores": None,
                               "n_iter": None}
        else:
            if X_val is not None and y_val is not None and len(y_val):
                held = [(X, Y, np.asarray(X_val, dtype=np.float64), to_indicator(list(y_val), self.classes_))]
                mode, folds, repeats = "validation", 1, 1
            else:
                parts = cv_folds(Y, self.cv, self.multilabel_, self.random_state, self.repeats)
                held = [(X[a], Y[a], X[b], Y[b]) for a, b in parts]
                mode, repeats = "cv", self.repeats
                folds = len(parts) // repeats
            grid, best, mean_s, iters = self._sweep(X, Y, held)
            self.C_ = float(grid[best])
            self.selection_ = {
                "mode": mode, "folds": folds, "repeats": repeats, "Cs": grid.tolist(),
                "scores": [None if np.isnan(s) else float(s) for s in mean_s],
                "n_iter": iters.tolist() if self.method == "logreg" else None,
            }
        self.selection_["sweep_seconds"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        if X_val is not None and y_val is not None and len(y_val):
            X = np.concatenate([X, np.asarray(X_val, dtype=np.float64)])
            Y = np.concatenate([Y, to_indicator(list(y_val), self.classes_)])
        self.model_ = self._fit_one(X, Y, self.C_)
        self.selection_["fit_seconds"] = time.perf_counter() - t1
        return self

    @property
    def C_at_edge_(self) -> str | None:
        """"lowest" / "highest" when the chosen C is an end of a grid it was selected
        from (the best C may lie beyond it), else None."""
        Cs = self.selection_["Cs"]
        if self.selection_["mode"] == "fixed" or len(Cs) < 2:
            return None
        return "lowest" if self.C_ == Cs[0] else "highest" if self.C_ == Cs[-1] else None

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Class scores [n, K] in `classes_` order (higher = more likely)."""
        return self.model_.decision(X)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Probabilities [n, K] (logreg only)."""
        return self.model_.proba(X)

    def predict(self, X: np.ndarray) -> list:
        """Top-1 class name per row; multi-label: the tuple of classes whose margin is
        positive (probability > 0.5), or the top-1 class when none is."""
        S = self.decision_function(X)
        top = S.argmax(axis=1)
        if not self.multilabel_:
            return [self.classes_[k] for k in top]
        return [tuple(self.classes_[k] for k in np.nonzero(row > 0)[0]) or (self.classes_[t],) for row, t in zip(S, top)]

    def score(self, X: np.ndarray, y: Sequence) -> float:
        """Top-1 accuracy on (X, y)."""
        return metrics.top1_accuracy(self.decision_function(X), to_indicator(list(y), self.classes_))

    def save(self, path, **meta) -> None:
        """Write a safe model file (see `classify.modelfile`); `meta` goes in its header."""
        model: LinearModel = self.model_
        header = {
            **meta,
            "method": self.method,
            "kind": model.kind,
            "multilabel": bool(self.multilabel_),
            "classes": list(self.classes_),
            "C": float(self.C_),
            "selection": getattr(self, "selection_", None),
        }
        write_model_file(path, header, model.W, model.b, model.pairs)

    @classmethod
    def load(cls, path) -> "Classifier":
        """Read a model file; its header is available as ``clf.meta_``."""
        header, W, b, pairs = read_model_file(path)
        clf = cls(method=header["method"])
        clf.classes_ = list(header["classes"])
        clf.multilabel_ = bool(header["multilabel"])
        clf.C_ = float(header["C"])
        clf.selection_ = header.get("selection")
        clf.model_ = LinearModel(header["kind"], W, b, len(clf.classes_), pairs)
        clf.meta_ = header
        return clf


def load_model(path) -> Classifier:
    """Read a model file safely (never unpickles); the header is ``clf.meta_``."""
    return Classifier.load(path)
