"""Softmax regression on tabular data, trained with the library's kernels.

``SoftmaxRegression`` is the model, ``load_iris`` / ``load_csv`` the data, ``train`` the training
run (ours and a plain-torch reference), ``save_checkpoint`` / ``load_checkpoint`` the safetensors
format.
"""

from .data import DataError, Dataset, load_csv, load_iris, read_features, stratified_split
from .model import SoftmaxRegression
from .train import (
    Checkpoint,
    FitResult,
    TrainConfig,
    TrainingError,
    TrainRun,
    fit,
    load_checkpoint,
    save_checkpoint,
    train,
)

__all__ = [
    "Checkpoint",
    "DataError",
    "Dataset",
    "FitResult",
    "SoftmaxRegression",
    "TrainConfig",
    "TrainRun",
    "TrainingError",
    "fit",
    "load_checkpoint",
    "load_csv",
    "load_iris",
    "read_features",
    "save_checkpoint",
    "stratified_split",
    "train",
]
