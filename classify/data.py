"""Dataset layouts: which image files form the train / validation / test splits.

Two layouts are read; neither opens an image (unreadable files are found, and reported,
at extraction time).

Folder layout (single-label)
    ``DATA_DIR/train/<class>/*`` and a test split, one of:

    * ``DATA_DIR/test/<class>/*``; then ``DATA_DIR/val/`` or ``DATA_DIR/validation/``, if
      present, is the *validation* split (part of the training part that C is cross-validated on);
    * no ``test/``: ``DATA_DIR/val/`` or ``DATA_DIR/validation/`` is the *test* split
      (the hymenoptera layout).

    Files with an image suffix (``retrieval.extraction.images.IMAGE_SUFFIXES``) are listed
    recursively under each class folder; other files are ignored. A class folder with no
    image file is an error that names it, and so is a training part (train + validation)
    with fewer than two classes.

CSV layout (multi-label, or single-label)
    ``DATA_DIR/train.csv`` and ``DATA_DIR/test.csv`` (optionally ``DATA_DIR/val.csv`` or
    ``DATA_DIR/validation.csv``, the validation split). Each row is
    ``path,label[,label...]``; paths are relative to the CSV's folder (or absolute). An
    optional header row whose first cell is ``path`` is skipped, as are blank lines and
    lines starting with ``#``. The task is multi-label when any row of the training CSV
    has a number of labels other than one; otherwise it is single-label.

A single split (for ``classify eval``) is a class folder tree (``DIR/<class>/*``) or one
CSV file.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

from retrieval.extraction.images import IMAGE_SUFFIXES

__all__ = ["DataError", "Split", "Dataset", "load_dataset", "load_split"]


class DataError(ValueError):
    """The dataset layout is unusable; the message names the offending folder or file."""


@dataclass
class Split:
    """Image paths (absolute) and their labels (a tuple of class names per image)."""

    name: str
    paths: list[str] = field(default_factory=list)
    labels: list[tuple[str, ...]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def classes(self) -> list[str]:
        """Sorted class names that occur in this split."""
        return sorted({c for labs in self.labels for c in labs})

    @property
    def multilabel(self) -> bool:
        return any(len(labs) != 1 for labs in self.labels)


@dataclass
class Dataset:
    """The splits of DATA_DIR; `val` is None when there is no validation split."""

    root: str
    train: Split
    test: Split
    val: Split | None = None
    multilabel: bool = False

    @property
    def classes(self) -> list[str]:
        """The classes a model can predict: those of the training part (train + val)."""
        names = set(self.train.classes)
        if self.val is not None:
            names.update(self.val.classes)
        return sorted(names)


def _folder_split(folder: Path, name: str) -> Split:
    """Read ``folder/<class>/**`` into a Split; error on a class folder without images."""
    if not folder.is_dir():
        raise DataError(f"{name} split: {folder} is not a folder")
    split = Split(name)
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{name} split: {folder} has no class folders (expected {folder}/<class>/<images>)")
    for cdir in class_dirs:
        files: list[str] = []
        for root, dirs, names in os.walk(cdir):
            dirs.sort()
            files.extend(
                str(Path(root, n).resolve()) for n in sorted(names) if Path(n).suffix.lower() in IMAGE_SUFFIXES
            )
        if not files:
            raise DataError(f"class folder {cdir} has no images")
        split.paths.extend(files)
        split.labels.extend([(cdir.name,)] * len(files))
    return split


def _csv_split(path: Path, name: str) -> Split:
    """Read ``path,label[,label...]`` rows; relative paths are relative to the CSV's folder."""
    if not path.is_file():
        raise DataError(f"{name} split: {path} is not a file")
    base = path.resolve().parent
    split = Split(name)
    with open(path, newline="", encoding="utf-8") as fh:
        for lineno, row in enumerate(csv.reader(fh), 1):
            row = [c.strip() for c in row]
            if not row or not row[0] or row[0].startswith("#"):
                continue
            if lineno == 1 and row[0].lower() == "path":
                continue
            p = Path(row[0])
            split.paths.append(str(p if p.is_absolute() else (base / p).resolve()))
            split.labels.append(tuple(dict.fromkeys(c for c in row[1:] if c)))
    if not split.paths:
        raise DataError(f"{name} split: {path} lists no images")
    return split


def load_split(path: str | os.PathLike, name: str = "test") -> Split:
    """One split: a folder of class folders, or a CSV file of ``path,label[,label...]``."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".csv":
        return _csv_split(p, name)
    if p.is_dir():
        return _folder_split(p, name)
    raise DataError(f"{path}: not a folder of class folders nor a .csv file")


def _first(root: Path, names: tuple[str, ...]) -> Path | None:
    return next((root / n for n in names if (root / n).exists()), None)


def load_dataset(data_dir: str | os.PathLike) -> Dataset:
    """List the splits of DATA_DIR (see the module docstring for the two layouts)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"{data_dir}: not a folder")
    if (root / "train.csv").is_file():
        train = _csv_split(root / "train.csv", "train")
        test_csv = root / "test.csv"
        if not test_csv.is_file():
            raise DataError(f"{root}: train.csv found but no test.csv")
        test = _csv_split(test_csv, "test")
        val_csv = _first(root, ("val.csv", "validation.csv"))
        val = _csv_split(val_csv, "validation") if val_csv else None
    elif (root / "train").is_dir():
        train = _folder_split(root / "train", "train")
        val_dir = _first(root, ("val", "validation"))
        if (root / "test").is_dir():
            test = _folder_split(root / "test", "test")
            val = _folder_split(val_dir, "validation") if val_dir else None
        elif val_dir is not None:
            # No test/: the only held-out folder is the test split (hymenoptera's val/).
            test, val = _folder_split(val_dir, "test"), None
        else:
            raise DataError(f"{root}: no test split (expected test/, val/ or validation/ next to train/)")
    else:
        raise DataError(f"{root}: expected train/<class>/ folders or train.csv + test.csv")
    multilabel = train.multilabel or (val is not None and val.multilabel)
    dataset = Dataset(str(root.resolve()), train, test, val, multilabel)
    if len(dataset.classes) < 2:
        found = ", ".join(repr(c) for c in dataset.classes) or "none"
        raise DataError(f"{root}: the training part has {len(dataset.classes)} class ({found}); "
                        "a classifier needs at least 2 (add a folder or label of another class)")
    return dataset
