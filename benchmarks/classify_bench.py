"""Baseline vs the full classification pipeline on one dataset folder.

    python benchmarks/classify_bench.py DATA_DIR [extractor options] [--store FILE]
        [--methods svm,logreg] [--jitters 1,12] [--cv 4] [--json OUT.json]

Baseline ("plain"), for every jitter: the averaged descriptors L2-normalised (no power
normalisation), scikit-learn LogisticRegressionCV with 5 values of C chosen by 4-fold CV
on the training part (train + validation when there is one), evaluated on the test
split; `--baseline-features raw` skips the L2 (the baseline of RESULTS section 3).
Full pipeline: `classify run` with its defaults for every method x jitter (C by --cv
fold CV of train + validation, repeated 3 times). Prints a table with accuracy, mean per-class accuracy,
mAP, C, seconds and the C-sweep seconds; `--json` writes
``{"dataset": str, "baselines": [{...}, one per jitter], "runs": [{...run --json...}], "config": {...}}``.
Features come from the shared store, so the baseline and jitter-1 runs extract once.
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
from classify.data import load_dataset  # noqa: E402
from classify.features import region_name  # noqa: E402
from classify.models import to_indicator  # noqa: E402
from retrieval.config import add_extractor_args, extractor_config_from_args, runtime_config_from_args  # noqa: E402
from retrieval.extractor import Extractor, Skipped  # noqa: E402
from retrieval.features import describe  # noqa: E402
from retrieval.store import FeatureStore  # noqa: E402
from retrieval.whitening import l2_normalize  # noqa: E402

EXTRACTOR_FLAGS = ("backbone", "weights", "onnx", "onnx_output", "input_spec", "layer", "pool", "patch_mode",
                   "device", "batch_size", "workers")


def baseline(args, jitter: int) -> dict:
    from sklearn.linear_model import LogisticRegressionCV

    t0 = time.perf_counter()
    region = region_name(jitter)
    ds = load_dataset(args.data_dir)
    extractor = Extractor(extractor_config_from_args(args), runtime_config_from_args(args))
    train_part = ds.train.paths + (ds.val.paths if ds.val else [])
    train_labels = ds.train.labels + (ds.val.labels if ds.val else [])
    raw: dict[str, np.ndarray] = {}
    with FeatureStore.open(args.store) as store:
        for out in describe(train_part + ds.test.paths, extractor, store, [region], progress=False):
            if not isinstance(out, Skipped):
                mean = out.descriptors[region].mean(axis=0)
                raw[out.path] = mean if args.baseline_features == "raw" else l2_normalize(mean)
    if ds.multilabel:
        return {"skipped_reason": "baseline is single-label only"}
    tr = [i for i, p in enumerate(train_part) if p in raw]
    te = [i for i, p in enumerate(ds.test.paths) if p in raw and ds.test.labels[i][0] in ds.classes]
    X = np.stack([raw[train_part[i]] for i in tr])
    y = [train_labels[i][0] for i in tr]
    Xt = np.stack([raw[ds.test.paths[i]] for i in te])
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
            "classes": len(classes), "train": len(tr), "test": len(te), "method": f"baseline-{args.baseline_features}",
            "C": float(np.atleast_1d(clf.C_)[0]), "seconds": time.perf_counter() - t0, "sweep_seconds": sweep,
            "jitter": jitter}


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
    p.add_argument("--json", metavar="OUT")
    add_extractor_args(p, search=False)
    args = p.parse_args(argv)
    rows, baselines = [], []
    for jitter in [int(j) for j in args.jitters.split(",")]:
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
