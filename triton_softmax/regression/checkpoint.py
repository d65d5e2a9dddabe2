"""Checkpoints of ``SoftmaxRegression``: safetensors files whose metadata describes the model.

The weights and the normalisation are tensors; the feature and class names, the training
configuration, the metrics and the library versions are JSON strings in the file's metadata, so a
checkpoint rebuilds and describes its model without pickle.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, fields
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
        ValueError: the names do not match the model's shape, or are empty or repeated (as
            ``load_checkpoint`` would refuse them).
    """
    for field, names, expected, what in (
        ("feature_names", feature_names, model.n_features, "features"),
        ("class_names", class_names, model.n_classes, "classes"),
    ):
        problem = _name_list_problem(list(names), expected, what)
        if problem:
            raise ValueError(f"{field} {problem}")
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
        ValueError: the file is missing, not safetensors, not a checkpoint of this format, or a
            metadata field is missing, not JSON or not of its type (the message names the file
            and the field).
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
    n_classes, n_features = weight.shape
    info = _checked_metadata(name, meta, n_features, n_classes)
    model = SoftmaxRegression(n_features, n_classes)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ValueError(f"{name}: tensors do not fit the model ({first})") from None
    model.eval()
    return Checkpoint(model, **info)


#: JSON scalars: what the values of ``config``, ``metrics`` and ``versions`` may be.
_SCALARS = (str, int, float, bool, type(None))


def _checked_metadata(
    name: str, meta: dict[str, str], n_features: int, n_classes: int
) -> dict[str, Any]:
    """Decode and check the JSON metadata fields of a checkpoint.

    ``feature_names`` and ``class_names`` must be lists of unique non-empty strings, one per
    weight column and row; ``config`` an object of scalars whose ``TrainConfig`` fields have their
    types; ``metrics`` an object of scalars; ``versions`` an object of strings. ``metrics`` and
    ``versions`` may be absent (empty).

    Raises:
        ValueError: naming the file and the first field that is missing or wrong.
    """
    info: dict[str, Any] = {}
    for field, default in (
        ("feature_names", None),
        ("class_names", None),
        ("config", None),
        ("metrics", "{}"),
        ("versions", "{}"),
    ):
        text = meta.get(field, default)
        if text is None:
            raise ValueError(f"{name}: checkpoint metadata field {field!r} is missing")
        try:
            info[field] = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{name}: checkpoint metadata field {field!r} is not JSON ({e})"
            ) from None
    for field, expected, what in (
        ("feature_names", n_features, "features"),
        ("class_names", n_classes, "classes"),
    ):
        problem = _name_list_problem(info[field], expected, what)
        if problem:
            raise ValueError(f"{name}: checkpoint metadata field {field!r} {problem}")
    types = {f.name: type(f.default) for f in fields(TrainConfig)}
    for field, values, kinds in (
        ("config", "scalars", _SCALARS),
        ("metrics", "scalars", _SCALARS),
        ("versions", "strings", (str,)),
    ):
        value = info[field]
        if not isinstance(value, dict) or not all(isinstance(v, kinds) for v in value.values()):
            raise ValueError(
                f"{name}: checkpoint metadata field {field!r} is not a JSON object of {values} "
                f"(got {_short(value)})"
            )
    for key, kind in types.items():
        if key not in info["config"]:
            continue
        value = info["config"][key]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            raise ValueError(
                f"{name}: checkpoint metadata field 'config' has {key}={value!r}, "
                f"expected {kind.__name__}"
            )
    return info


def _name_list_problem(names: object, expected: int, what: str) -> str | None:
    """What is wrong with a feature or class name list, or ``None`` when it is right."""
    if not isinstance(names, list):
        return f"is not a JSON list of names (got {_short(names)})"
    if not all(isinstance(n, str) and n for n in names):
        return f"holds a name that is not a non-empty string (got {_short(names)})"
    if len(names) != expected:
        return f"has {len(names)} names; the weights have {expected} {what}"
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        return f"repeats {', '.join(map(repr, repeated))}; names must be unique"
    return None


def _short(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
