"""`classify`: transfer-learning classification on the feature store shared with retrieval.

    classify run     DATA_DIR [--method svm|logreg] [--jitter 1|12] [--cv 4] [--cv-repeats 3] [--store FILE] [extractor options] [--json]
    classify train   DATA_DIR --out MODEL [same options]
    classify eval    MODEL SPLIT [--store FILE] [--json]
    classify predict MODEL IMAGE... [--store FILE] [--json]
    classify factors DATA_DIR [--layer L,... | --onnx-output T,...] [--pool avg,max,gem] [--pca-dim 0,128,...]
                     [--jitter 1,12] [--power-norm on,off] [--method svm,logreg] [--fuse A+B] [--json] [--plot OUT.png]

Exit codes: 0 done; 2 usage error (bad flag, unusable dataset layout such as a class
folder without images, missing model file); 3 done but some inputs were skipped (named
on stderr and in the JSON "skipped" list); 1 any other failure (e.g. a refused model file);
141, silently, when stdout is a closed pipe (see `retrieval.cli.util.stdout_closed`).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


from retrieval.cli.util import add_subcommands, stdout_closed
from retrieval.cli.args import (
    add_extractor_args,
    add_ray_arg,
    add_runtime_args,
    extractor_config_from_args,
    runtime_config_from_args,
)
from retrieval.config import POOLS, ConfigError, ExtractorConfig, RuntimeConfig
from retrieval.extraction.extractor import Extractor
from retrieval.extraction.factory import make_extractor
from retrieval.extraction.images import expand_inputs
from retrieval.extraction.store import FeatureStore
from retrieval.fileio import storage_message

from .data import DataError, load_dataset, load_split
from .factors import FactorGrid, study
from .features import JITTERS, POWER_NORM, FeatureTable, image_vectors
from .modelfile import ModelFileError
from .models import CV_REPEATS, METHODS, Classifier, cv_folds, load_model, to_indicator
from .protocol import evaluate_split, fit_training_part, run_protocol, warn_C_at_edge

LAYOUT_HELP = """\
DATA_DIR layouts:
  folders  DATA_DIR/train/<class>/* and DATA_DIR/test/<class>/*; val/ or validation/
           next to them is the validation split (joins train/ as the training part).
           Without test/, val/ or validation/ is the TEST split.
  CSV      DATA_DIR/train.csv and DATA_DIR/test.csv (optional val.csv / validation.csv),
           rows "path,label[,label...]", paths relative to the CSV; multi-label when any
           training row has other than one label.
Features: average of the region set's raw descriptors (1 = whole image, 12 = corners,
centre, whole, and mirrors), L2-normalised, then (--power-norm on) signed square root.
C is chosen by --cv fold cross-validation of the training part (train + validation),
repeated --cv-repeats times with different shuffles and averaged; the model is then
refit on the whole training part. SVM C grid: 1e-3..1e2 (6 values); logreg C: 45
values in 1e-6..1e5, warm-started.
"""


_MODEL_HELP = "model file written by `classify train`"


def _int_at_least(least: int, what: str):
    """An argparse type: an integer >= `least`, else an error naming `what`."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = least - 1
        if n < least:
            raise argparse.ArgumentTypeError(f"{what} must be an integer >= {least} (got {text!r})")
        return n
    return parse


# `--cv K`: one fold would leave nothing to train or to hold out.
_fold_count = _int_at_least(2, "folds")
_repeat_count = _int_at_least(1, "repeats")


def _add_cv_args(sp) -> None:
    sp.add_argument("--cv", type=_fold_count, default=4, metavar="K",
                    help="cross-validation folds (>= 2) over train + validation to choose C (default 4)")
    sp.add_argument("--cv-repeats", type=_repeat_count, default=CV_REPEATS, metavar="N",
                    help="shuffles of the --cv split whose held-out scores are averaged (default "
                    "%(default)s; fewer is faster and noisier)")
    sp.add_argument("--seed", type=int, default=0, help="fold shuffling seed (repeats use seed, seed + 1, ...)")


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
        sp.add_argument("--power-norm", choices=("on", "off"), default="on" if POWER_NORM else "off",
                        help="signed square root of the L2-normalised features (default %(default)s, "
                        "chosen by the factor study: benchmarks/results/factors.md)")
        _add_cv_args(sp)
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
    _add_factors_parser(sub)
    return parser


_FACTORS_HELP = """\
Every combination of the comma lists is one configuration, evaluated like `classify run`
(C chosen on the training part only; the test split used once). Each (image, layer,
pooling, jitter) is extracted once through the feature store; power normalisation, PCA
(fitted on train + validation only), fusion and C are computed from stored features, so
re-running with other PCA sizes or methods extracts nothing.
Columns: acc = top-1 accuracy, mpc = mean per-class accuracy, mAP (multi-label only),
C (with < or > when it is the lowest / highest value of its grid), s = seconds,
extracted / stored = images run through the network / read from the store or reused.

example:
  classify factors ../shared/data/hymenoptera --onnx ../shared/weights/mobilenetv2-12-int8.onnx \\
      --onnx-output 356_quantized,391_quantized,426_quantized,627 --pool avg,max,gem \\
      --pca-dim 0,128,512 --fuse 391_quantized+627 --plot hym.png
"""


def _add_factors_parser(sub) -> None:
    # "resolve": the grid versions of --layer / --onnx-output / --pool replace the
    # single-value extractor flags.
    sp = sub.add_parser(
        "factors", conflict_handler="resolve", epilog=_FACTORS_HELP + "\n" + LAYOUT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="evaluate a grid of layer / pooling / PCA / jitter / power norm / method (transfer factors)",
    )
    sp.add_argument("data_dir", metavar="DATA_DIR", help="dataset folder, as for `classify run`")
    add_extractor_args(sp, search=False)
    g = sp.add_argument_group("factors (comma lists; every combination is evaluated)")
    g.add_argument("--layer", metavar="L,...", help="torch layers (see `retrieval layers --backbone NAME`; default: the network's default layer)")
    g.add_argument("--onnx-output", metavar="T,...", help="ONNX tensors (see `retrieval layers --onnx FILE`; default: the graph output)")
    g.add_argument("--pool", metavar="P,...", default="avg", help="poolings of conv maps: avg, max, gem (default avg)")
    g.add_argument("--pca-dim", metavar="N,...", default="0", help="PCA dimensions fitted on train + validation; 0 = none (default 0)")
    g.add_argument("--jitter", metavar="J,...", default="1", help="1 (whole image) and/or 12 (12 samples averaged) (default 1)")
    g.add_argument("--power-norm", metavar="on|off,...", default="on" if POWER_NORM else "off",
                   help="signed square root after L2: on, off or on,off (default %(default)s)")
    g.add_argument("--method", metavar="M,...", default="logreg", help="svm and/or logreg (default logreg)")
    g.add_argument("--fuse", metavar="A+B[+...]", action="append", default=[],
                   help="late fusion: also evaluate these layers concatenated (each part L2-normalised); repeatable")
    _add_cv_args(sp)
    sp.add_argument("--plot", metavar="OUT.png", help="write accuracy against layer depth (per pooling) and against PCA dimension (matplotlib)")
    _add_common(sp)
    sp.set_defaults(func=cmd_factors)


# ----------------------------------------------------------------------------- helpers


def _vectors(paths: list[str], config: ExtractorConfig, runtime: RuntimeConfig, args, jitter: int,
             power_norm: bool) -> FeatureTable:
    store = FeatureStore.open(args.store)
    try:
        return image_vectors(paths, make_extractor(config, runtime), store, jitter, power_norm=power_norm,
                             progress=not args.quiet)
    finally:
        store.close()


def _report_skipped(table: FeatureTable) -> list[dict]:
    out = [{"path": s.path, "reason": s.reason} for s in table.skipped]
    for s in out:
        print(f"classify: skipped {s['path']}: {s['reason']}", file=sys.stderr)
    return out


def _check_dim(clf: Classifier, table: FeatureTable) -> None:
    if table.vectors:
        dim = len(next(iter(table.vectors.values())))
        if dim != clf.model_.W.shape[1]:
            raise ModelFileError(f"features have {dim} dimensions, the model expects {clf.model_.W.shape[1]}")


def _emit(args, result: dict, text: str) -> None:
    if args.json:
        print(json.dumps(result))
    elif text:  # nothing to say (every input skipped, named on stderr): no empty line either
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
    # Checked on the listed images before any extraction, so an impossible --cv costs
    # nothing; fit checks again on the readable ones.
    _check_folds(ds, args)
    return config, runtime, ds


def _check_folds(ds, args) -> None:
    """Raise ConfigError when the training part (train + validation) cannot be split --cv ways."""
    labels = ds.train.labels + (ds.val.labels if ds.val else [])
    cv_folds(to_indicator(labels, ds.classes), args.cv, ds.multilabel, args.seed)


def cmd_run(args) -> int:
    t0 = time.perf_counter()
    config, runtime, ds = _prepare_training(args)
    all_paths = ds.train.paths + (ds.val.paths if ds.val else []) + ds.test.paths
    power_norm = args.power_norm == "on"
    table = _vectors(all_paths, config, runtime, args, args.jitter, power_norm)
    skipped = _report_skipped(table)
    clf, result = run_protocol(ds, table, args.method, args.cv, args.seed, args.cv_repeats)
    warn_C_at_edge(clf)
    result.update(seconds=time.perf_counter() - t0, jitter=args.jitter, power_norm=power_norm, skipped=skipped,
                  extracted=table.extracted, extractor_key=config.key())
    _emit(args, result, _summary(result))
    return 3 if skipped else 0


def cmd_train(args) -> int:
    t0 = time.perf_counter()
    config, runtime, ds = _prepare_training(args)
    power_norm = args.power_norm == "on"
    table = _vectors(ds.train.paths + (ds.val.paths if ds.val else []), config, runtime, args, args.jitter, power_norm)
    skipped = _report_skipped(table)
    clf, n_train, n_val = fit_training_part(ds, table, args.method, args.cv, args.seed, args.cv_repeats)
    warn_C_at_edge(clf)
    clf.save(args.out, extractor=config.to_dict(), extractor_key=config.key(), jitter=args.jitter,
             power_norm=power_norm, feature_dim=int(clf.model_.W.shape[1]), trained_on=ds.root,
             train=n_train, validation=n_val)
    result = {
        "model": str(args.out), "classes": len(clf.classes_), "train": n_train, "validation": n_val,
        "method": args.method, "C": clf.C_, "C_at_edge": clf.C_at_edge_, "jitter": args.jitter,
        "power_norm": power_norm, "selection": clf.selection_["mode"],
        "cv": clf.selection_["folds"], "cv_repeats": clf.selection_["repeats"], "sweep_seconds": clf.selection_["sweep_seconds"], "skipped": skipped,
        "extracted": table.extracted, "seconds": time.perf_counter() - t0,
    }
    _emit(args, result, f"wrote {args.out}: {len(clf.classes_)} classes, {n_train} images, {args.method} C={clf.C_:.3g}")
    return 3 if skipped else 0


def _load(args) -> tuple[Classifier, ExtractorConfig, int, bool]:
    if not Path(args.model).is_file():
        raise DataError(f"{args.model}: model file not found")
    clf = load_model(args.model)
    meta = clf.meta_
    try:
        config = ExtractorConfig.from_dict(meta["extractor"])
        jitter = int(meta["jitter"])
        # Models written before --power-norm existed used the signed square root.
        power_norm = bool(meta.get("power_norm", True))
    except (KeyError, TypeError, ValueError) as err:
        raise ModelFileError(f"{args.model}: no usable extractor configuration ({err})") from None
    if meta.get("extractor_key") and config.key() != meta["extractor_key"]:
        print("classify: warning: the extractor's weights differ from those the model was trained with "
              f"(key {config.key()} != {meta['extractor_key']})", file=sys.stderr)
    return clf, config, jitter, power_norm


def cmd_eval(args) -> int:
    t0 = time.perf_counter()
    clf, config, jitter, power_norm = _load(args)
    split = load_split(args.split, "test")
    table = _vectors(split.paths, config, runtime_config_from_args(args), args, jitter, power_norm)
    skipped = _report_skipped(table)
    _check_dim(clf, table)
    res = evaluate_split(clf, split, table)
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
    clf, config, jitter, power_norm = _load(args)
    paths = expand_inputs(args.images)
    table = _vectors(paths, config, runtime_config_from_args(args), args, jitter, power_norm)
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


def _grid_list(text: str | None, flag: str, parse=str, allowed: tuple = ()) -> tuple:
    """A comma list of one factor; a value that does not parse or is not allowed is a usage error."""
    values = []
    for token in (t.strip() for t in (text or "").split(",")):
        if not token:
            continue
        try:
            value = parse(token)
        except ValueError:
            raise ConfigError(f"{flag}: {token!r} is not valid (expected a comma list)") from None
        if allowed and value not in allowed:
            raise ConfigError(f"{flag} takes {', '.join(map(str, allowed))} (got {token!r})")
        values.append(value)
    return tuple(dict.fromkeys(values))


def _factor_grid(args, base: ExtractorConfig) -> FactorGrid:
    if args.onnx_output and not args.onnx:
        raise ConfigError("--onnx-output needs --onnx FILE (use --layer for a torch backbone)")
    if args.layer and args.onnx:
        raise ConfigError("--layer names torch layers; with --onnx use --onnx-output")
    layers = _grid_list(args.onnx_output if args.onnx else args.layer, "--onnx-output" if args.onnx else "--layer")
    pca_dims = _grid_list(args.pca_dim, "--pca-dim", int)
    if any(d < 0 for d in pca_dims):
        raise ConfigError("--pca-dim values must be >= 0 (0 = no PCA)")
    fuse = []
    for text in args.fuse:
        parts = tuple(p.strip() for p in text.split("+") if p.strip())
        if len(parts) < 2:
            raise ConfigError(f"--fuse {text!r}: name two or more layers joined by '+', e.g. A+B")
        fuse.append(parts)
    grid = FactorGrid(
        layers=layers or (Extractor(base).load().summary()["backbone_info"]["output" if base.onnx else "layer"],),
        pools=_grid_list(args.pool, "--pool", allowed=POOLS),
        pca_dims=pca_dims or (0,),
        jitters=_grid_list(args.jitter, "--jitter", int, JITTERS),
        power_norms=tuple(v == "on" for v in _grid_list(args.power_norm, "--power-norm", allowed=("on", "off"))),
        methods=_grid_list(args.method, "--method", allowed=METHODS),
        fuse=tuple(fuse),
    )
    for name, values in (("--pool", grid.pools), ("--jitter", grid.jitters), ("--power-norm", grid.power_norms),
                         ("--method", grid.methods)):
        if not values:
            raise ConfigError(f"{name} needs at least one value")
    return grid


def _factors_table(rows: list[dict]) -> str:
    head = ("layer", "pool", "jit", "pow", "pca", "dim", "method", "acc", "mpc", "mAP", "C", "s", "extracted", "stored")
    cells = [head]
    for r in rows:
        edge = {"lowest": "<", "highest": ">"}.get(r["C_at_edge"], "")
        cells.append((r["layer"], r["pool"], str(r["jitter"]), "on" if r["power_norm"] else "off", str(r["pca_dim"]),
                      str(r["dim"]), r["method"], f"{r['accuracy']:.4f}", f"{r['mean_per_class']:.4f}",
                      "-" if r["map"] is None else f"{r['map']:.4f}", f"{edge}{r['C']:.3g}", f"{r['seconds']:.1f}",
                      str(r["extracted"]), str(r["from_store"])))
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def cmd_factors(args) -> int:
    from retrieval.evaluation.plots import check_plotting, plot_factors
    from retrieval.extraction.layers import layer_depths

    t0 = time.perf_counter()
    if args.plot:
        try:
            check_plotting(args.plot)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    ds = load_dataset(args.data_dir)
    _check_folds(ds, args)
    single = argparse.Namespace(**{**vars(args), "layer": None, "onnx_output": None, "pool": "avg"})
    base = extractor_config_from_args(single)
    runtime = runtime_config_from_args(args)
    grid = _factor_grid(args, base)
    depths = layer_depths(base, list(dict.fromkeys(grid.layers + tuple(p for parts in grid.fuse for p in parts))))
    with FeatureStore.open(args.store) as store:
        rows = list(study(ds, base, runtime, store, grid, depths, cv=args.cv, seed=args.seed,
                          repeats=args.cv_repeats, progress=not args.quiet))
    skipped = sorted({p for r in rows for p in r.pop("skipped")})
    for path in skipped:
        print(f"classify: skipped {path}", file=sys.stderr)
    if args.plot:
        plot_factors(rows, args.plot, score="map" if ds.multilabel else "accuracy",
                     score_label="mAP" if ds.multilabel else "top-1 accuracy",
                     title=f"{Path(ds.root).name}: {Path(base.onnx).name if base.onnx else base.backbone}")
    result = {
        "dataset": ds.root, "rows": rows, "extractor": base.to_dict(),
        "grid": {"layers": list(grid.layers), "pools": list(grid.pools), "pca_dims": list(grid.pca_dims),
                 "jitters": list(grid.jitters), "power_norms": list(grid.power_norms),
                 "methods": list(grid.methods), "fuse": ["+".join(f) for f in grid.fuse]},
        "extracted": sum(r["extracted"] for r in rows), "skipped": skipped, "plot": args.plot,
        "seconds": time.perf_counter() - t0,
    }
    _emit(args, result, _factors_table(rows) + f"\n{len(rows)} configurations, {result['extracted']} images extracted, "
          f"{result['seconds']:.1f}s" + (f"; plot: {args.plot}" if args.plot else ""))
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
        print(f"classify: error: {storage_message(err) or f'{type(err).__name__}: {err}'}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
