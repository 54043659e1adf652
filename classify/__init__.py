"""Transfer-learning classification on the CNN descriptors of the shared feature store.

Public API:

* `Classifier` - linear SVM (one-vs-one / one-vs-all) or warm-started multinomial
  logistic regression, C chosen on training data only; fit / predict /
  decision_function / score / save / load.
* `load_dataset`, `load_split` - the folder and CSV layouts (see `classify.data`).
* `image_vectors` - store-backed image vectors (jitter average, L2, signed sqrt).
* `evaluate` - top-1, mean per-class accuracy, 11-point VOC mAP, confusion matrix.
* `load_model` - read a model file safely (never unpickles).
"""
from .data import DataError, Dataset, Split, load_dataset, load_split
from .features import encode, image_vectors
from .metrics import evaluate
from .modelfile import ModelFileError
from .models import Classifier, load_model

__all__ = [
    "Classifier", "DataError", "Dataset", "ModelFileError", "Split", "encode", "evaluate",
    "image_vectors", "load_dataset", "load_model", "load_split",
]
