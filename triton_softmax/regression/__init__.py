"""Softmax regression on tabular data, trained with the library's kernels.

``SoftmaxRegression`` is the model, ``load_iris`` / ``load_csv`` the data, ``train`` the training
run (ours and a plain-torch reference), ``save_checkpoint`` / ``load_checkpoint`` the safetensors
format (``checkpoint``).
"""

from .data import DataError, Dataset, load_csv, load_iris, read_features, stratified_split

try:
    from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from .model import SoftmaxRegression
    from .train import FitResult, TrainConfig, TrainingError, TrainRun, fit, train
except ModuleNotFoundError as e:
    # A serving-only install has no torch: the data functions (numpy only) still work there;
    # `triton-softmax predict` reads its CSVs with them.
    if e.name not in ("torch", "triton"):
        raise

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
