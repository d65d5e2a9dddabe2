"""Checkpoints of ``SoftmaxRegression``: safetensors files whose metadata describes the model.

The weights and the normalisation are tensors; the feature and class names, the training
configuration, the metrics and the library versions are JSON strings in the file's metadata, so a
checkpoint rebuilds and describes its model without pickle.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file

from triton_softmax._atomic import atomic_path

from .model import SoftmaxRegression
from .train import TrainConfig

CHECKPOINT_FORMAT = "triton-softmax/softmax-regression/1"


def library_versions() -> dict[str, str]:
    """Versions of the libraries a model depends on, for checkpoint and ONNX metadata.

    Returns:
        Package name -> version string (``"unknown"`` where it cannot be read).
    """
    versions = {"python": platform.python_version()}
    for package in ("triton-softmax", "torch", "triton", "numpy", "onnx", "onnxscript"):
        try:
            versions[package] = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return versions


@dataclass
class Checkpoint:
    """A model loaded from a checkpoint, with its metadata.

    Attributes:
        model: the model, on the CPU, in eval mode.
        feature_names: feature columns, in order.
        class_names: class names, in label-index order.
        config: the training configuration as saved.
        metrics: the metrics as saved.
        versions: library versions at save time.
    """

    model: SoftmaxRegression
    feature_names: list[str]
    class_names: list[str]
    config: dict[str, Any]
    metrics: dict[str, Any]
    versions: dict[str, str]


def save_checkpoint(
    path: str | os.PathLike[str],
    model: SoftmaxRegression,
    *,
    feature_names: list[str] | tuple[str, ...],
    class_names: list[str] | tuple[str, ...],
    config: TrainConfig | dict[str, Any],
    metrics: dict[str, Any],
) -> Path:
    """Write the weights and normalisation as safetensors, with JSON metadata; atomically.

    Args:
        path: destination file (conventionally ``*.safetensors``).
        model: the trained model.
        feature_names: one per feature.
        class_names: one per class.
        config: the training configuration.
        metrics: JSON-serialisable metrics.

    Returns:
        The path written.

    Raises:
        ValueError: the names do not match the model's shape.
    """
    if len(feature_names) != model.n_features or len(class_names) != model.n_classes:
        raise ValueError(
            f"{len(feature_names)} feature names and {len(class_names)} class names for a model "
            f"with {model.n_features} features and {model.n_classes} classes"
        )
    config_dict = asdict(config) if isinstance(config, TrainConfig) else dict(config)
    meta = {
        "format": CHECKPOINT_FORMAT,
        "feature_names": json.dumps(list(feature_names)),
        "class_names": json.dumps(list(class_names)),
        "config": json.dumps(config_dict),
        "metrics": json.dumps(metrics),
        "versions": json.dumps(library_versions()),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)
    return Path(path)


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Rebuild a model saved by ``save_checkpoint`` (no pickle is involved).

    Args:
        path: the ``.safetensors`` file.

    Returns:
        The model (CPU, eval mode) and its metadata.

    Raises:
        ValueError: the file is missing, not safetensors, or not a checkpoint of this format.
    """
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise ValueError(f"{name}: no such checkpoint file")
    try:
        with safe_open(name, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type for malformed headers
        raise ValueError(f"{name}: not a safetensors file ({e})") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{name}: not a triton-softmax checkpoint (format {meta.get('format')!r}, "
            f"expected {CHECKPOINT_FORMAT!r})"
        )
    weight = tensors.get("linear.weight")
    if weight is None or weight.dim() != 2:
        raise ValueError(f"{name}: missing or malformed tensor 'linear.weight'")
    try:
        info = {k: json.loads(meta[k]) for k in ("feature_names", "class_names", "config")}
        info["metrics"] = json.loads(meta.get("metrics", "{}"))
        info["versions"] = json.loads(meta.get("versions", "{}"))
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{name}: checkpoint metadata is incomplete or not JSON ({e})") from None
    n_classes, n_features = weight.shape
    model = SoftmaxRegression(n_features, n_classes)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ValueError(f"{name}: tensors do not fit the model ({first})") from None
    if len(info["feature_names"]) != n_features or len(info["class_names"]) != n_classes:
        raise ValueError(f"{name}: metadata names do not match the tensor shapes")
    model.eval()
    return Checkpoint(model, **info)
