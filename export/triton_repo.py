"""A Triton Inference Server model repository for an exported classifier.

    models/
      iris/
        config.pbtxt      # what this module writes
        1/model.onnx      # the export

Triton loads the folder as it is (``tritonserver --model-repository models``) with its onnxruntime
backend, and ``triton-softmax serve models`` serves the same folder. The configuration, in
Triton's protobuf text format (``ModelConfig``):

- ``platform: "onnxruntime_onnx"``; ``max_batch_size`` (the rows one request or one dynamic batch
  may hold), so each tensor's ``dims`` leave the batch dimension out;
- input ``features`` ``TYPE_FP32`` ``dims: [n_features]``;
- output ``probabilities`` ``TYPE_FP32`` ``dims: [k]``; output ``label`` ``TYPE_INT64``, one index
  per row: the model gives ``[N]``, which Triton requires to be declared ``dims: [1]`` with
  ``reshape: { shape: [] }``, so its clients see ``[N, 1]`` (and so do ``serve``'s);
- ``dynamic_batching``: Triton merges concurrent requests into one run;
- ``instance_group``: one instance on the CPU, or on each GPU (``KIND_GPU``);
- ``parameters``: ``class_names`` and ``feature_names`` as JSON lists, as in the model's metadata.

Needs numpy and onnxruntime only (the dimensions and names are read from the model).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from triton_softmax._atomic import atomic_path
from triton_softmax.export.runtime import ModelError, OnnxClassifier

CONFIG_NAME = "config.pbtxt"
MODEL_FILE = "model.onnx"
DEFAULT_MAX_BATCH_SIZE = 1024
#: How long Triton's dynamic batcher holds a request for others to join it.
MAX_QUEUE_DELAY_US = 100
#: Model names: a folder name that any file system and URL path takes as it is.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
#: Version folders: positive integers, as Triton numbers them.
_VERSION = re.compile(r"[1-9][0-9]*")


def check_name(name: str) -> str:
    """``name`` if it can be a model's folder and URL name, else ``ValueError`` saying why."""
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"model name {name!r}: use letters, digits, '_', '-' and '.', not first '.' or '-'"
        )
    return name


def model_path(repository: str | os.PathLike[str], name: str, version: int = 1) -> Path:
    """Where the model file of ``name`` goes: ``repository/name/version/model.onnx``."""
    return Path(repository) / check_name(name) / str(version) / MODEL_FILE


def config_pbtxt(
    name: str,
    classifier: OnnxClassifier,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    gpu: bool = False,
) -> str:
    """The ``config.pbtxt`` text of a classifier, in Triton's ``ModelConfig`` text format.

    Args:
        name: the model's name (its folder's name in the repository).
        classifier: the model, for its dimensions and names.
        max_batch_size: the most rows in one request or one dynamic batch (>= 1).
        gpu: ``KIND_GPU`` instances (one per GPU) instead of one ``KIND_CPU`` instance.
    """
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
    names = {
        "class_names": list(map(str, classifier.classes_)),
        "feature_names": classifier.feature_names,
    }
    parameters = "".join(
        f"parameters {{\n  key: {_quote(k)}\n"
        f"  value: {{ string_value: {_quote(json.dumps(v))} }}\n}}\n"
        for k, v in names.items()
    )
    return f"""# Triton Inference Server's configuration, by `triton-softmax export --triton-repo`.
name: {_quote(check_name(name))}
platform: "onnxruntime_onnx"
max_batch_size: {max_batch_size}
input [
  {{
    name: "features"
    data_type: TYPE_FP32
    dims: [ {classifier.n_features} ]
  }}
]
output [
  {{
    name: "label"
    data_type: TYPE_INT64
    dims: [ 1 ]
    reshape: {{ shape: [ ] }}
  }},
  {{
    name: "probabilities"
    data_type: TYPE_FP32
    dims: [ {classifier.n_classes} ]
  }}
]
dynamic_batching {{
  max_queue_delay_microseconds: {MAX_QUEUE_DELAY_US}
}}
instance_group [
  {{
    count: 1
    kind: {"KIND_GPU" if gpu else "KIND_CPU"}
  }}
]
{parameters}"""


def write_config(
    repository: str | os.PathLike[str],
    name: str,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    gpu: bool = False,
    version: int = 1,
) -> Path:
    """Write ``repository/name/config.pbtxt`` for the model already at ``model_path(...)``.

    Returns:
        The path of ``config.pbtxt`` (written through a temporary file, then renamed).
    """
    classifier = OnnxClassifier(model_path(repository, name, version))
    path = Path(repository) / name / CONFIG_NAME
    text = config_pbtxt(name, classifier, max_batch_size=max_batch_size, gpu=gpu)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return path


def find_models(path: str | os.PathLike[str], name: str | None = None) -> dict[str, Path]:
    """The models to serve: one ``.onnx`` file, or every model of a Triton model repository.

    Args:
        path: a ``.onnx`` file, or a folder laid out as Triton Inference Server's model
            repository (``NAME/config.pbtxt`` and ``NAME/<version>/model.onnx``; the highest
            version is served).
        name: the model's name for a single file (default: the file's stem); refused for a
            repository, whose folder names are the model names.

    Returns:
        ``{model name: .onnx path}``, sorted by name.

    Raises:
        ModelError: nothing to serve at ``path``.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix != ".onnx":
            raise ModelError(f"{path}: expected a .onnx model or a model repository folder")
        return {name or path.stem: path}
    if not path.is_dir():
        raise ModelError(f"{path}: no such model file or repository folder")
    if name is not None:
        raise ModelError(
            f"{path}: --name is for one .onnx file; a repository's names are its folders"
        )
    models = {}
    for folder in sorted(p for p in path.iterdir() if p.is_dir()):
        versions = [
            int(v.name)
            for v in folder.iterdir()
            if _VERSION.fullmatch(v.name) and (v / MODEL_FILE).is_file()
        ]
        if versions:
            models[folder.name] = folder / str(max(versions)) / MODEL_FILE
    if not models:
        raise ModelError(f"{path}: no model in this repository (expected NAME/1/model.onnx)")
    return models


def _quote(text: str) -> str:
    """A protobuf text-format string literal (UTF-8 kept as it is)."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t") + '"'
