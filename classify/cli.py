"""`classify`: transfer-learning classification on the feature store shared with retrieval.

    classify run     DATA_DIR [--method svm|logreg] [--jitter 1|12] [--cv 4] [--store FILE] [extractor options] [--json]
    classify train   DATA_DIR --out MODEL [same options]
    classify eval    MODEL SPLIT [--store FILE] [--json]
    classify predict MODEL IMAGE... [--store FILE] [--json]

Exit codes: 0 done; 2 usage error (bad flag, unusable dataset layout such as a class
folder without images, missing model file); 3 done but some inputs were skipped (named
on stderr and in the JSON "skipped" list); 1 any other failure (e.g. a refused model file);
141, silently, when stdout is a closed pipe (see `retrieval.cliutil.stdout_closed`).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path


from retrieval.cliutil import add_subcommands, stdout_closed
from retrieval.config import (
    add_runtime_args,
    ConfigError,
    ExtractorConfig,
    RuntimeConfig,
    add_extractor_args,
    add_ray_arg,
    extractor_config_from_args,
    runtime_config_from_args,
)
from retrieval.extractor import make_extractor
from retrieval.images import expand_inputs
from retrieval.store import FeatureStore

from . import metrics
from .data import DataError, Dataset, Split, load_dataset, load_split
from .features import JITTERS, FeatureTable, image_vectors
from .modelfile import ModelFileError, load_model
from .models import METHODS, Classifier, cv_folds, to_indicator

LAYOUT_HELP = """\
DATA_DIR layouts:
  folders  DATA_DIR/train/<class>/* and DATA_DIR/test/<class>/*; val/ or validation/
           next to them is the validation split (C is chosen on it, then the model is
           refit on train+validation). Without test/, val/ or validation/ is the TEST
           split and C is chosen by --cv fold cross-validation of train/.
  CSV      DATA_DIR/train.csv and DATA_DIR/test.csv (optional val.csv / validation.csv),
           rows "path,label[,label...]", paths relative to the CSV; multi-label when any
           training row has other than one label.
Features: average of the region set's raw descriptors (1 = whole image, 12 = corners,
centre, whole, and mirrors), L2-normalised, then signed square root.
SVM C grid: 1e-3..1e2 (6 values); logreg C: 45 values in 1e-6..1e5, warm-started.
"""


_MODEL_HELP = "model file written by `classify train`"


def _fold_count(text: str) -> int:
    """`--cv K`: an integer >= 2 (one fold would leave nothing to train or to hold out)."""
    try:
        k = int(text)
    except ValueError:
        k = 0
    if k < 2:
        raise argparse.ArgumentTypeError(f"folds must be an integer >= 2 (got {text!r})")
    return k


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", metavar="FILE", help="feature store (default: the one retrieval uses)")
    p.add_argument("--json", action="store_true", help="print a JSON object on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_runtime(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("runtime")
    add_runtime_args(group)
    add_ray_arg(group)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="classify", description=__doc__.split("\n\n")[0], epilog=LAYOUT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = add_subcommands(parser, dest="command", required=True)
    for name in ("run", "train"):
        sp = sub.add_parser(
            name, epilog=LAYOUT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
            help="choose C, train and evaluate on test" if name == "run" else "choose C, train on train(+validation), save a model",
        )
        sp.add_argument("data_dir", metavar="DATA_DIR", help="dataset folder: train/<class>/ + test/<class>/, or train.csv + test.csv (layouts below)")
        if name == "train":
            sp.add_argument("--out", required=True, metavar="MODEL", help="model file to write (.npz)")
        sp.add_argument("--method", choices=METHODS, default="logreg", help="linear SVM or logistic regression (default logreg)")
        sp.add_argument("--jitter", type=int, choices=JITTERS, default=1, help="1 (whole image) or 12 samples averaged")
        sp.add_argument("--cv", type=_fold_count, default=4, metavar="K",
                        help="cross-validation folds (>= 2) when there is no validation split (default 4)")
        sp.add_argument("--seed", type=int, default=0, help="fold shuffling seed")
        _add_common(sp)
        add_extractor_args(sp, search=False)
        add_ray_arg(sp)
        sp.set_defaults(func=cmd_run if name == "run" else cmd_train)
    sp = sub.add_parser("eval", help="evaluate a model on a split (folder of class folders, or a CSV)")
    sp.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    sp.add_argument("split", metavar="SPLIT", help="images to evaluate on: a folder of class folders, or a CSV of path,label[,label...]")
    _add_common(sp)
    _add_runtime(sp)
    sp.set_defaults(func=cmd_eval)
    sp = sub.add_parser("predict", help="predict the class of images (files, folders, @list.txt)")
    sp.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    sp.add_argument("images", metavar="IMAGE", nargs="+", help="an image file, a folder (recursive) or @list.txt")
    _add_common(sp)
    _add_runtime(sp)
    sp.set_defaults(func=cmd_predict)
    return parser


# ----------------------------------------------------------------------------- helpers


def _vectors(paths: list[str], config: ExtractorConfig, runtime: RuntimeConfig, args, jitter: int) -> FeatureTable:
    store = FeatureStore.open(args.store)
    try:
        return image_vectors(paths, make_extractor(config, runtime), store, jitter, progress=not args.quiet)
    finally:
        store.close()


def _report_skipped(table: FeatureTable) -> list[dict]:
    out = [{"path": s.path, "reason": s.reason} for s in table.skipped]
    for s in out:
        print(f"classify: skipped {s['path']}: {s['reason']}", file=sys.stderr)
    return out


def _usable(split: Split | None, table: FeatureTable) -> tuple[list[str], list[tuple[str, ...]]]:
    if split is None:
        return [], []
    keep = [i for i, p in enumerate(split.paths) if p in table.vectors]
    return [split.paths[i] for i in keep], [split.labels[i] for i in keep]


def _fit(ds: Dataset, table: FeatureTable, args) -> tuple[Classifier, int, int]:
    """Fit on the training part (train + validation) only; returns (clf, n_train, n_val)."""
    tr_paths, tr_labels = _usable(ds.train, table)
    va_paths, va_labels = _usable(ds.val, table)
    have = {c for labs in tr_labels + va_labels for c in labs}
    lost = [c for c in ds.classes if c not in have]
    if lost:
        raise DataError(f"training class {', '.join(lost)} has no readable image (all were skipped)")
    counts = Counter(c for labs in tr_labels + va_labels for c in labs)
    for c in sorted(c for c, n in counts.items() if n == 1):
        how = "" if va_paths else "; cross-validation cannot hold it out and scores it on itself"
        print(f"classify: warning: class {c!r} has a single training image: expect its predictions to be "
              f"unreliable (add images){how}", file=sys.stderr)
    clf = Classifier(method=args.method, cv=args.cv, random_state=args.seed)
    X_val = table.matrix(va_paths) if va_paths else None
    clf.fit(table.matrix(tr_paths), tr_labels, X_val, va_labels if va_paths else None, classes=ds.classes)
    return clf, len(tr_paths) + len(va_paths), len(va_paths)


def _evaluate(clf: Classifier, split: Split, table: FeatureTable) -> dict:
    """Metrics on the readable images of `split`; test classes unknown to the model are
    reported and their images left out of the metrics (no model can predict them)."""
    paths, labels = _usable(split, table)
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


def _check_dim(clf: Classifier, table: FeatureTable) -> None:
    if table.vectors:
        dim = len(next(iter(table.vectors.values())))
        if dim != clf.model_.W.shape[1]:
            raise ModelFileError(f"features have {dim} dimensions, the model expects {clf.model_.W.shape[1]}")


def _emit(args, result: dict, text: str) -> None:
    if args.json:
        print(json.dumps(result))
    else:
        print(text)


def _summary(r: dict) -> str:
    m = "n/a" if r.get("map") is None else f"{r['map']:.4f}"
    return (f"accuracy {r['accuracy']:.4f}  mean per-class {r['mean_per_class']:.4f}  mAP {m}  "
            f"({r['classes']} classes, {r.get('train', '-')} train, {r['test']} test, {r['method']}, C={r['C']:.3g}, "
            f"{r['seconds']:.1f}s)")


# ----------------------------------------------------------------------------- commands


def _prepare_training(args):
    config = extractor_config_from_args(args)
    runtime = runtime_config_from_args(args)
    ds = load_dataset(args.data_dir)
    if ds.val is None:
        # Checked on the listed images before any extraction, so an impossible --cv costs
        # nothing; fit checks again on the readable ones.
        cv_folds(to_indicator(ds.train.labels, ds.classes), args.cv, ds.multilabel, args.seed)
    return config, runtime, ds


def cmd_run(args) -> int:
    t0 = time.perf_counter()
    config, runtime, ds = _prepare_training(args)
    all_paths = ds.train.paths + (ds.val.paths if ds.val else []) + ds.test.paths
    table = _vectors(all_paths, config, runtime, args, args.jitter)
    skipped = _report_skipped(table)
    clf, n_train, n_val = _fit(ds, table, args)
    res = _evaluate(clf, ds.test, table)
    sel = clf.selection_
    result = {
        "accuracy": res["accuracy"], "mean_per_class": res["mean_per_class"], "map": res["map"],
        "classes": len(clf.classes_), "train": n_train, "test": res["test"], "method": args.method,
        "C": clf.C_, "seconds": time.perf_counter() - t0,
        "validation": n_val, "jitter": args.jitter, "selection": sel["mode"],
        "cv": sel["folds"] if sel["mode"] == "cv" else None,
        "sweep_seconds": sel["sweep_seconds"], "fit_seconds": sel["fit_seconds"],
        "sweep_Cs": sel["Cs"], "sweep_scores": sel["scores"], "sweep_iterations": sel["n_iter"],
        "multilabel": clf.multilabel_, "labels": res["labels"],
        "per_class_accuracy": res["per_class_accuracy"], "confusion_matrix": res["confusion_matrix"],
        "unseen_test_classes": res["unseen_test_classes"], "skipped": skipped,
        "extracted": table.extracted, "extractor_key": config.key(),
    }
    _emit(args, result, _summary(result))
    return 3 if skipped else 0


def cmd_train(args) -> int:
    t0 = time.perf_counter()
    config, runtime, ds = _prepare_training(args)
    table = _vectors(ds.train.paths + (ds.val.paths if ds.val else []), config, runtime, args, args.jitter)
    skipped = _report_skipped(table)
    clf, n_train, n_val = _fit(ds, table, args)
    clf.save(args.out, extractor=config.to_dict(), extractor_key=config.key(), jitter=args.jitter,
             feature_dim=int(clf.model_.W.shape[1]), trained_on=ds.root, train=n_train, validation=n_val)
    result = {
        "model": str(args.out), "classes": len(clf.classes_), "train": n_train, "validation": n_val,
        "method": args.method, "C": clf.C_, "jitter": args.jitter, "selection": clf.selection_["mode"],
        "sweep_seconds": clf.selection_["sweep_seconds"], "skipped": skipped,
        "extracted": table.extracted, "seconds": time.perf_counter() - t0,
    }
    _emit(args, result, f"wrote {args.out}: {len(clf.classes_)} classes, {n_train} images, {args.method} C={clf.C_:.3g}")
    return 3 if skipped else 0


def _load(args) -> tuple[Classifier, ExtractorConfig, int]:
    if not Path(args.model).is_file():
        raise DataError(f"{args.model}: model file not found")
    clf = load_model(args.model)
    meta = clf.meta_
    try:
        config = ExtractorConfig.from_dict(meta["extractor"])
        jitter = int(meta["jitter"])
    except (KeyError, TypeError, ValueError) as err:
        raise ModelFileError(f"{args.model}: no usable extractor configuration ({err})") from None
    if meta.get("extractor_key") and config.key() != meta["extractor_key"]:
        print("classify: warning: the extractor's weights differ from those the model was trained with "
              f"(key {config.key()} != {meta['extractor_key']})", file=sys.stderr)
    return clf, config, jitter


def cmd_eval(args) -> int:
    t0 = time.perf_counter()
    clf, config, jitter = _load(args)
    split = load_split(args.split, "test")
    table = _vectors(split.paths, config, runtime_config_from_args(args), args, jitter)
    skipped = _report_skipped(table)
    _check_dim(clf, table)
    res = _evaluate(clf, split, table)
    result = {
        "accuracy": res["accuracy"], "mean_per_class": res["mean_per_class"], "map": res["map"],
        "classes": len(clf.classes_), "test": res["test"], "method": clf.method, "C": clf.C_,
        "seconds": time.perf_counter() - t0, "jitter": jitter, "multilabel": clf.multilabel_,
        "labels": res["labels"], "per_class_accuracy": res["per_class_accuracy"],
        "confusion_matrix": res["confusion_matrix"], "unseen_test_classes": res["unseen_test_classes"],
        "skipped": skipped, "extracted": table.extracted,
    }
    _emit(args, result, _summary(result))
    return 3 if skipped else 0


def cmd_predict(args) -> int:
    clf, config, jitter = _load(args)
    paths = expand_inputs(args.images)
    table = _vectors(paths, config, runtime_config_from_args(args), args, jitter)
    skipped = _report_skipped(table)
    _check_dim(clf, table)
    done = [p for p in paths if p in table.vectors]
    preds = []
    if done:
        X = table.matrix(done)
        # Probabilities for logistic regression; decision values (OvO: votes + confidence) for SVMs.
        S = clf.predict_proba(X) if clf.method == "logreg" else clf.decision_function(X)
        for path, row, label in zip(done, S, clf.predict(X)):
            entry = {"path": path, "label": label if isinstance(label, str) else (label[0] if label else None),
                     "scores": {c: float(v) for c, v in zip(clf.classes_, row)}}
            if clf.multilabel_:
                entry["labels"] = list(label)
            preds.append(entry)
    result = {"predictions": preds, "skipped": skipped}
    text = "\n".join(f"{p['path']}\t{p['label']}\t{p['scores'][p['label']]:.4f}" for p in preds)
    _emit(args, result, text)
    return 3 if skipped else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `classify` console script; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # buffered output meets a closed pipe here, where it is handled
        return code
    except BrokenPipeError:
        return stdout_closed()
    except (ConfigError, DataError) as err:
        print(f"classify: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("classify: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - any other failure is exit 1 with a message
        print(f"classify: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
