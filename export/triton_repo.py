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
- output ``probabilities`` ``TYPE_FP32`` ``dims: [k]``, with ``label_filename: "labels.txt"``
  (the class names, one per line, in ``NAME/labels.txt``): Triton's classification extension
  answers ``"score:index:label"`` strings from it, as ``serve`` does from the model's metadata;
- output ``label`` ``TYPE_INT64``, one index per row: the model gives ``[N]``, which Triton
  requires to be declared ``dims: [1]`` with ``reshape: { shape: [] }``, so its clients see
  ``[N, 1]`` (and so do ``serve``'s);
- ``dynamic_batching``: Triton merges concurrent requests into one run;
- ``instance_group``: one instance on the CPU, or on each GPU (``KIND_GPU``);
- ``parameters``: ``class_names`` and ``feature_names`` as JSON lists, as in the model's metadata.

Needs numpy and onnxruntime only (the dimensions and names are read from the model).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from triton_softmax._atomic import atomic_path
from triton_softmax.export.runtime import ModelError, OnnxClassifier
from triton_softmax.export.signature import (
    CLASS_NAMES,
    CONFIG_FILE,
    DEFAULT_MAX_BATCH_SIZE,
    FEATURE_NAMES,
    INPUT,
    LABEL,
    ONNX_FILE,
    PLATFORM,
    PROBABILITIES,
)

LABELS_NAME = "labels.txt"
#: How long Triton's dynamic batcher holds a request for others to join it.
MAX_QUEUE_DELAY_US = 100
#: Model names: a folder name that any file system and URL path takes as it is.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
#: Version folders: positive integers, as Triton numbers them.
_VERSION = re.compile(r"[1-9][0-9]*")
#: The top-level ``max_batch_size`` of a config.pbtxt (nested messages never have that field).
_MAX_BATCH_SIZE = re.compile(r"^\s*max_batch_size\s*:\s*(-?[0-9]+)\s*(?:#.*)?$", re.MULTILINE)


@dataclass(frozen=True)
class ModelSpec:
    """One model to serve: its file, the version it is served as and its row limit.

    Attributes:
        path: the ``.onnx`` file.
        version: the version folder it came from (1 for a single file).
        max_batch_size: the most rows one request may hold (config.pbtxt's ``max_batch_size``).
    """

    path: Path
    version: int = 1
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE


def check_name(name: str) -> str:
    """``name`` if it can be a model's folder and URL name, else ``ValueError`` saying why."""
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"model name {name!r}: use letters, digits, '_', '-' and '.', not first '.' or '-'"
        )
    return name


def model_path(repository: str | os.PathLike[str], name: str, version: int = 1) -> Path:
    """Where the model file of ``name`` goes: ``repository/name/version/model.onnx``."""
    return Path(repository) / check_name(name) / str(version) / ONNX_FILE


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
        CLASS_NAMES: list(map(str, classifier.classes_)),
        FEATURE_NAMES: classifier.feature_names,
    }
    parameters = "".join(
        f"parameters {{\n  key: {_quote(k)}\n"
        f"  value: {{ string_value: {_quote(json.dumps(v))} }}\n}}\n"
        for k, v in names.items()
    )
    return f"""# Triton Inference Server's configuration, by `triton-softmax export --triton-repo`.
name: {_quote(check_name(name))}
platform: {_quote(PLATFORM)}
max_batch_size: {max_batch_size}
input [
  {{
    name: {_quote(INPUT)}
    data_type: TYPE_FP32
    dims: [ {classifier.n_features} ]
  }}
]
output [
  {{
    name: {_quote(LABEL)}
    data_type: TYPE_INT64
    dims: [ 1 ]
    reshape: {{ shape: [ ] }}
  }},
  {{
    name: {_quote(PROBABILITIES)}
    data_type: TYPE_FP32
    dims: [ {classifier.n_classes} ]
    label_filename: {_quote(LABELS_NAME)}
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
    """Write ``repository/name/config.pbtxt`` and ``labels.txt`` for the model at ``model_path``.

    Returns:
        The path of ``config.pbtxt`` (each file written through a temporary file, then renamed).

    Raises:
        ValueError: a class name holds a line break, which Triton's one-label-per-line file
            cannot carry.
    """
    classifier = OnnxClassifier(model_path(repository, name, version))
    folder = Path(repository) / name
    text = config_pbtxt(name, classifier, max_batch_size=max_batch_size, gpu=gpu)
    labels = labels_txt(classifier.classes_)
    with atomic_path(folder / LABELS_NAME) as tmp:
        Path(tmp).write_text(labels, encoding="utf-8")
    with atomic_path(folder / CONFIG_FILE) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return folder / CONFIG_FILE


def labels_txt(class_names: Sequence[str]) -> str:
    """Triton's label file: line i is the name of class i.

    Raises:
        ValueError: a name holds a line break (it would shift every label after it).
    """
    names = [str(c) for c in class_names]
    broken = [n for n in names if len(n.splitlines()) > 1 or "\n" in n or "\r" in n]
    if broken:
        raise ValueError(
            f"class name {broken[0]!r} holds a line break; Triton's {LABELS_NAME} has one "
            "label per line"
        )
    return "".join(f"{n}\n" for n in names)


def find_models(
    path: str | os.PathLike[str], name: str | None = None, max_batch_size: int | None = None
) -> dict[str, ModelSpec]:
    """The models to serve: one ``.onnx`` file, or every model of a Triton model repository.

    Args:
        path: a ``.onnx`` file, or a folder laid out as Triton Inference Server's model
            repository (``NAME/config.pbtxt`` and ``NAME/<version>/model.onnx``; the highest
            version is served, under that version number).
        name: the model's name for a single file (default: the file's stem); refused for a
            repository, whose folder names are the model names.
        max_batch_size: the most rows per request for a single file (default
            ``DEFAULT_MAX_BATCH_SIZE``); refused for a repository, whose ``config.pbtxt`` says
            it (a model without a config.pbtxt gets the default).

    Returns:
        ``{model name: ModelSpec}``, sorted by name.

    Raises:
        ModelError: nothing to serve at ``path``, a bad name, or a config.pbtxt without a
            positive ``max_batch_size``.
    """
    path = Path(path)
    if max_batch_size is not None and max_batch_size < 1:
        raise ModelError(f"--max-batch-size must be at least 1, got {max_batch_size}")
    if path.is_file():
        if path.suffix != ".onnx":
            raise ModelError(f"{path}: expected a .onnx model or a model repository folder")
        try:
            chosen = check_name(name or path.stem)
        except ValueError as e:
            raise ModelError(f"--name: {e}" if name else f"{path}: {e}; give --name") from None
        limit = max_batch_size or DEFAULT_MAX_BATCH_SIZE
        return {chosen: ModelSpec(path, 1, limit)}
    if not path.is_dir():
        raise ModelError(f"{path}: no such model file or repository folder")
    for option, value in (("--name", name), ("--max-batch-size", max_batch_size)):
        if value is not None:
            raise ModelError(
                f"{path}: {option} is for one .onnx file; a repository's models take theirs "
                "from their folder names and config.pbtxt"
            )
    models = {}
    for folder in sorted(p for p in path.iterdir() if p.is_dir()):
        versions = [
            int(v.name)
            for v in folder.iterdir()
            if _VERSION.fullmatch(v.name) and (v / ONNX_FILE).is_file()
        ]
        if not versions:
            continue
        try:
            check_name(folder.name)
        except ValueError as e:
            raise ModelError(f"{folder}: {e}") from None
        version = max(versions)
        limit = _config_max_batch_size(folder / CONFIG_FILE)
        models[folder.name] = ModelSpec(folder / str(version) / ONNX_FILE, version, limit)
    if not models:
        raise ModelError(f"{path}: no model in this repository (expected NAME/1/model.onnx)")
    return models


def _config_max_batch_size(config: Path) -> int:
    """``max_batch_size`` of a model's config.pbtxt; the default when there is no config."""
    if not config.is_file():
        return DEFAULT_MAX_BATCH_SIZE
    found = _MAX_BATCH_SIZE.findall(config.read_text(encoding="utf-8"))
    if len(found) != 1 or int(found[0]) < 1:
        raise ModelError(
            f"{config}: serve needs one max_batch_size of at least 1 (the most rows a request "
            f"may hold), found {', '.join(found) or 'none'}"
        )
    return int(found[0])


def _quote(text: str) -> str:
    """A protobuf text-format string literal (UTF-8 kept as it is)."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t") + '"'
