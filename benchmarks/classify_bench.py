"""Baseline vs the full classification pipeline on one dataset folder.

    python benchmarks/classify_bench.py DATA_DIR [extractor options] [--store FILE]
        [--methods svm,logreg] [--jitters 1,12] [--cv 4] [--resplits N] [--json OUT.json]

Baseline ("plain"), for every jitter: the averaged descriptors L2-normalised (no power
normalisation), scikit-learn LogisticRegressionCV with 5 values of C chosen by 4-fold CV
on the training part (train + validation when there is one), evaluated on the test
split; `--baseline-features raw` skips the L2 (the baseline of benchmarks/results/classification.md).
Full pipeline: `classify run` with its defaults for every method x jitter (C by --cv
fold CV of train + validation, repeated 3 times). Prints a table with accuracy, mean per-class accuracy,
mAP, C, seconds and the C-sweep seconds; `--json` writes
``{"dataset": str, "baselines": [{...}, one per jitter], "runs": [{...run --json...}], "config": {...}}``.
Features come from the shared store, so the baseline and jitter-1 runs extract once.

`--resplits N`: one test split of a few hundred images tells the two apart by single
images, so this pools every labelled image and re-splits it N times at random
(stratified, the official test size), fits the baseline and the `classify run` defaults
(logistic regression through `classify.protocol.run_protocol`) on each, and prints the
paired difference of test accuracy: mean, standard error (plain, and corrected for the
overlap of the re-splits: "se NB"), wins / ties / losses.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from classify import cli, metrics  # noqa: E402
from classify.data import Dataset, Split, load_dataset  # noqa: E402
from classify.features import FeatureTable, encode, region_name  # noqa: E402
from classify.models import to_indicator  # noqa: E402
from classify.protocol import run_protocol  # noqa: E402
from retrieval.cli.args import add_extractor_args, extractor_config_from_args, runtime_config_from_args  # noqa: E402
from retrieval.extraction.extractor import Extractor, Skipped  # noqa: E402
from retrieval.extraction.features import describe  # noqa: E402
from retrieval.extraction.store import FeatureStore  # noqa: E402
from retrieval.engine.whitening import l2_normalize  # noqa: E402

EXTRACTOR_FLAGS = ("backbone", "weights", "onnx", "onnx_output", "input_spec", "layer", "pool", "patch_mode",
                   "device", "batch_size", "workers")


def labelled(ds: Dataset) -> tuple[list[str], list[tuple[str, ...]]]:
    """Every labelled image of the dataset (train, validation, test) and its labels."""
    return (ds.train.paths + (ds.val.paths if ds.val else []) + ds.test.paths,
            ds.train.labels + (ds.val.labels if ds.val else []) + ds.test.labels)


def stored_windows(args, ds: Dataset, jitter: int) -> dict[str, np.ndarray]:
    """Raw window descriptors of the jitter's region set, by path, read from the store
    (extracted on a miss); unreadable images are left out."""
    region = region_name(jitter)
    extractor = Extractor(extractor_config_from_args(args), runtime_config_from_args(args))
    with FeatureStore.open(args.store) as store:
        return {out.path: out.descriptors[region]
                for out in describe(labelled(ds)[0], extractor, store, [region], progress=False)
                if not isinstance(out, Skipped)}


def baseline_vectors(args, windows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The baseline's features by path: averaged descriptors, L2-normalised unless
    `--baseline-features raw`."""
    means = {path: w.mean(axis=0) for path, w in windows.items()}
    return means if args.baseline_features == "raw" else {path: l2_normalize(m) for path, m in means.items()}


def fit_baseline(ds: Dataset, vectors: dict[str, np.ndarray]) -> dict:
    """LogisticRegressionCV (5 C, 4-fold CV of train + validation), scored once on test."""
    from sklearn.linear_model import LogisticRegressionCV

    train_part = ds.train.paths + (ds.val.paths if ds.val else [])
    train_labels = ds.train.labels + (ds.val.labels if ds.val else [])
    tr = [i for i, p in enumerate(train_part) if p in vectors]
    te = [i for i, p in enumerate(ds.test.paths) if p in vectors and ds.test.labels[i][0] in ds.classes]
    X = np.stack([vectors[train_part[i]] for i in tr])
    y = [train_labels[i][0] for i in tr]
    Xt = np.stack([vectors[ds.test.paths[i]] for i in te])
    t1 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf = LogisticRegressionCV(Cs=5, cv=4, max_iter=1000).fit(X, y)
    sweep = time.perf_counter() - t1
    classes = list(clf.classes_)
    res = metrics.evaluate(clf.decision_function(Xt) if len(classes) > 2 else
                           np.stack([-clf.decision_function(Xt), clf.decision_function(Xt)], 1),
                           to_indicator([ds.test.labels[i] for i in te], classes))
    return {"accuracy": res["accuracy"], "mean_per_class": res["mean_per_class"], "map": None,
            "classes": len(classes), "train": len(tr), "test": len(te),
            "C": float(np.atleast_1d(clf.C_)[0]), "sweep_seconds": sweep}


def baseline(args, jitter: int) -> dict:
    t0 = time.perf_counter()
    ds = load_dataset(args.data_dir)
    if ds.multilabel:
        return {"skipped_reason": "baseline is single-label only"}
    row = fit_baseline(ds, baseline_vectors(args, stored_windows(args, ds, jitter)))
    row.update(method=f"baseline-{args.baseline_features}", seconds=time.perf_counter() - t0, jitter=jitter)
    return row


def resplit(ds: Dataset, seed: int) -> Dataset:
    """The labelled images of every split pooled and split again at random, stratified by
    class, with the official number of test images (validation joins the training part)."""
    from sklearn.model_selection import StratifiedShuffleSplit

    paths, labels = labelled(ds)
    split = StratifiedShuffleSplit(n_splits=1, test_size=len(ds.test.paths), random_state=seed)
    tr, te = next(split.split(np.zeros(len(paths)), [lab[0] for lab in labels]))
    return Dataset(ds.root, Split("train", [paths[i] for i in tr], [labels[i] for i in tr]),
                   Split("test", [paths[i] for i in te], [labels[i] for i in te]))


def resplits(args, jitter: int) -> dict:
    """Baseline and `classify run` defaults (logistic regression, its C selection) on
    `args.resplits` random re-splits of the same images: paired test accuracies."""
    ds = load_dataset(args.data_dir)
    if ds.multilabel:
        return {"skipped_reason": "baseline is single-label only"}
    # One read of the store serves both: the baseline's vectors, and the product's
    # (`classify.encode`, what `image_vectors` applies for `classify run`).
    windows = stored_windows(args, ds, jitter)
    vectors = baseline_vectors(args, windows)
    table = FeatureTable({path: encode(w) for path, w in windows.items()})
    base, ours = [], []
    for seed in range(args.resplits):
        split = resplit(ds, seed)
        base.append(fit_baseline(split, vectors)["accuracy"])
        with contextlib.redirect_stderr(io.StringIO()):
            ours.append(run_protocol(split, table, "logreg", args.cv, seed=0)[1]["accuracy"])
        print(f"jitter {jitter} split {seed}: baseline {base[-1]:.4f} defaults {ours[-1]:.4f}", file=sys.stderr)
    diff = np.array(ours) - np.array(base)
    n_test, n_all = len(ds.test.paths), len(labelled(ds)[0])
    # The re-splits share images, so their differences are correlated and the plain
    # standard error is too small; Nadeau & Bengio's (2003) correction widens it by the
    # test / train size ratio.
    var = diff.var(ddof=1) if len(diff) > 1 else float("nan")
    return {"jitter": jitter, "resplits": args.resplits, "test": n_test,
            "baseline_mean": float(np.mean(base)), "defaults_mean": float(np.mean(ours)),
            "diff_mean": float(diff.mean()), "diff_se": float(np.sqrt(var / len(diff))),
            "diff_se_corrected": float(np.sqrt(var * (1 / len(diff) + n_test / (n_all - n_test)))),
            "wins": int((diff > 0).sum()), "ties": int((diff == 0).sum()), "losses": int((diff < 0).sum()),
            "baseline": base, "defaults": ours}


def run_one(args, method: str, jitter: int) -> dict:
    argv = ["run", args.data_dir, "--method", method, "--jitter", str(jitter), "--cv", str(args.cv), "--json", "--quiet"]
    if args.store:
        argv += ["--store", args.store]
    for flag in EXTRACTOR_FLAGS:
        value = getattr(args, flag)
        if value is not None:
            argv += [f"--{flag.replace('_', '-')}", str(value)]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli.main(argv)
    if code not in (0, 3):
        raise SystemExit(f"classify run failed ({code}): {' '.join(argv)}")
    return json.loads(buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data_dir", metavar="DATA_DIR")
    p.add_argument("--store", metavar="FILE")
    p.add_argument("--methods", default="svm,logreg")
    p.add_argument("--jitters", default="1,12")
    p.add_argument("--cv", type=int, default=4)
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--baseline-features", choices=("l2", "raw"), default="l2",
                   help="baseline features: averaged descriptors L2-normalised (default) or raw")
    p.add_argument("--resplits", type=int, default=0, metavar="N",
                   help="instead of the official split: N random stratified re-splits of all the "
                        "labelled images (same test size), baseline against the logreg defaults, paired")
    p.add_argument("--json", metavar="OUT")
    add_extractor_args(p, search=False)
    args = p.parse_args(argv)
    jitters = [int(j) for j in args.jitters.split(",")]
    if args.resplits:
        out = [resplits(args, jitter) for jitter in jitters]
        print(f"{'jitter':>6} {'splits':>6} {'baseline':>9} {'defaults':>9} {'diff':>8} {'+-se':>7} {'+-se NB':>8} "
              f"{'W/T/L':>9}")
        for r in out:
            if "skipped_reason" in r:
                print(r["skipped_reason"])
                continue
            print(f"{r['jitter']:>6} {r['resplits']:>6} {r['baseline_mean']:9.4f} {r['defaults_mean']:9.4f} "
                  f"{r['diff_mean']:+8.4f} {r['diff_se']:7.4f} {r['diff_se_corrected']:8.4f} "
                  f"{r['wins']:>3}/{r['ties']}/{r['losses']}")
        if args.json:
            Path(args.json).write_text(json.dumps({"dataset": args.data_dir, "resplits": out,
                                                   "config": extractor_config_from_args(args).to_dict()}, indent=1))
        return 0
    rows, baselines = [], []
    for jitter in jitters:
        if not args.no_baseline:
            baselines.append(baseline(args, jitter))
            rows.append(baselines[-1])
        for method in args.methods.split(","):
            rows.append(run_one(args, method, jitter))
    print(f"{'method':>16} {'jitter':>6} {'acc':>7} {'mpc':>7} {'mAP':>7} {'C':>9} {'seconds':>8} {'sweep s':>8}")
    for r in rows:
        m = "-" if r.get("map") is None else f"{r['map']:.4f}"
        print(f"{r['method']:>16} {r['jitter']:>6} {r['accuracy']:7.4f} {r['mean_per_class']:7.4f} {m:>7} "
              f"{r['C']:9.3g} {r['seconds']:8.1f} {r.get('sweep_seconds', 0):8.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "dataset": args.data_dir, "baselines": baselines,
            "runs": [r for r in rows if r not in baselines], "config": extractor_config_from_args(args).to_dict(),
        }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
