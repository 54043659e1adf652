"""Model files that cannot run code: an .npz of plain numeric arrays plus a JSON header.

Layout (a zip written by ``numpy.savez``):

* ``header``: uint8 array, UTF-8 JSON: ``{"format": "classify-model", "version": 1,
  "method", "kind", "multilabel", "classes", "C", "selection", ...meta}``; `meta`
  carries the extractor configuration (``extractor``: ExtractorConfig.to_dict(),
  ``extractor_key``) and the ``jitter`` so `predict` extracts the same way;
* ``W`` float64 [P, D], ``b`` float64 [P], and ``pairs`` int64 [P, 2] for one-vs-one SVMs.

Loading uses ``numpy.load(allow_pickle=False)``: a file holding a pickle (a raw pickle,
or an object array inside the zip) is refused with ModelFileError, never unpickled.
Unknown members, wrong dtypes, inconsistent shapes and non-finite weights are refused too.
"""
from __future__ import annotations

import json
import os
import zipfile

import numpy as np

__all__ = ["ModelFileError", "write_model_file", "read_model_file", "FORMAT", "VERSION"]

FORMAT = "classify-model"
VERSION = 1
_KINDS = ("softmax", "sigmoid", "ova", "ovo")
_MEMBERS = {"header", "W", "b", "pairs"}


class ModelFileError(ValueError):
    """The model file is missing, malformed, or not safe to load."""


def write_model_file(path: str | os.PathLike, header: dict, W: np.ndarray, b: np.ndarray,
                     pairs: np.ndarray | None) -> None:
    """Write a linear model's `header` (JSON-serialisable; format and version are added)
    and arrays to `path` (.npz), atomically."""
    header = {**header, "format": FORMAT, "version": VERSION}
    arrays = {
        "header": np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8),
        "W": np.asarray(W, dtype=np.float64),
        "b": np.asarray(b, dtype=np.float64),
    }
    if pairs is not None:
        arrays["pairs"] = np.asarray(pairs, dtype=np.int64)
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "wb") as fh:  # a file object: savez would otherwise append ".npz"
        np.savez(fh, **arrays)
    os.replace(tmp, path)  # never leave a half-written model under the final name


def read_model_file(path: str | os.PathLike) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray | None]:
    """(header, W, b, pairs) of a file written by `write_model_file`, every part checked;
    ModelFileError naming the file and the fault otherwise."""
    if not os.path.isfile(path):
        raise ModelFileError(f"{path}: model file not found")
    if not zipfile.is_zipfile(path):
        raise ModelFileError(f"{path}: not a classify model file (expected an .npz archive)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = set(npz.files)
            if not names <= _MEMBERS or not {"header", "W", "b"} <= names:
                raise ModelFileError(f"{path}: unexpected members {sorted(names)}")
            arrays = {name: npz[name] for name in names}
    except ModelFileError:
        raise
    except ValueError as err:  # numpy: "Object arrays cannot be loaded when allow_pickle=False"
        raise ModelFileError(f"{path}: refused ({err})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise ModelFileError(f"{path}: unreadable model file ({err})") from None
    try:
        if arrays["header"].dtype != np.uint8:
            raise ValueError("header is not bytes")
        header = json.loads(arrays["header"].tobytes().decode("utf-8"))
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ValueError("not a classify model header")
        if header.get("version") != VERSION:
            raise ValueError(f"model file version {header.get('version')}, this version reads {VERSION}")
        kind, classes = header["kind"], header["classes"]
        if kind not in _KINDS or not all(isinstance(c, str) for c in classes):
            raise ValueError("bad kind or classes")
        W, b = arrays["W"], arrays["b"]
        if W.dtype.kind != "f" or b.dtype.kind != "f" or W.ndim != 2 or b.shape != (W.shape[0],):
            raise ValueError("W / b have the wrong type or shape")
        # A NaN weight makes every score NaN: predictions are arbitrary and `--json`
        # would print NaN, which is not JSON.
        if not (np.isfinite(W).all() and np.isfinite(b).all()):
            raise ValueError("W / b hold NaN or infinite values; retrain the model")
        K = len(classes)
        pairs = arrays.get("pairs")
        if kind == "ovo":
            if pairs is None or pairs.dtype.kind != "i" or pairs.shape != (W.shape[0], 2):
                raise ValueError("one-vs-one model without valid pairs")
            if pairs.size and (pairs.min() < 0 or pairs.max() >= K):
                raise ValueError("pairs index outside the classes")
        elif W.shape[0] != K:
            raise ValueError(f"{W.shape[0]} weight rows for {K} classes")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise ModelFileError(f"{path}: malformed model file ({err})") from None
    return header, W.astype(np.float64), b.astype(np.float64), pairs
