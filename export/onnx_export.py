"""Export a ``SoftmaxRegression`` to one self-contained ONNX file and verify it.

The graph is ``features -> Gemm -> Softmax -> probabilities`` plus ``ArgMax -> label``, all in
the default ONNX domain; the standardisation is folded into the Gemm's weights (W / std and
b - (W / std) mean, in float64), which halves onnxruntime's time at 1e5 rows against a separate
Sub and Div. The library's ``torch.ops.triton_softmax`` ops are translated to the standard
``Softmax`` / ``LogSoftmax`` through ``custom_translation_table``, so any ONNX runtime can serve the
file. Signature (the skl2onnx layout with zipmap off): input ``features`` float32 [N, n_features],
outputs ``label`` int64 [N] and ``probabilities`` float32 [N, k]; class and feature names are JSON
lists in ``metadata_props``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxscript
import torch
from torch import nn

import triton_softmax as ts
import triton_softmax.functional  # noqa: F401  (registers torch.ops.triton_softmax.*)
from triton_softmax._atomic import atomic_path, check_not_input
from triton_softmax.regression.model import SoftmaxRegression

from .runtime import CPU_PROVIDER, OnnxClassifier
from .signature import CLASS_NAMES, DEFAULT_OPSET, FEATURE_NAMES, INPUT, MIN_OPSET, OUTPUTS

PARITY_ATOL = 1e-5


class ExportError(RuntimeError):
    """The exported model failed a check; the message gives the numbers."""


@dataclass(frozen=True)
class ParityReport:
    """onnxruntime against torch on the same rows.

    Attributes:
        n_rows: rows compared.
        max_abs_diff: largest absolute difference of any probability.
        labels_identical: whether every predicted label index agrees.
        n_label_mismatches: rows whose label differs.
    """

    n_rows: int
    max_abs_diff: float
    labels_identical: bool
    n_label_mismatches: int

    @property
    def ok(self) -> bool:
        """Within ``PARITY_ATOL`` and identical labels."""
        return self.labels_identical and self.max_abs_diff <= PARITY_ATOL


@torch.no_grad()
def fold_standardisation(model: SoftmaxRegression) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's linear layer with its standardisation folded in.

    ``W ((x - mean) / std) + b = (W / std) x + (b - (W / std) mean)``, computed in float64.

    Args:
        model: a model (any device).

    Returns:
        ``(weight, bias)``: float32 CPU tensors of shapes (k, n_features) and (k,), so that
        ``softmax(x @ weight.T + bias)`` is the model's output.
    """
    weight = model.linear.weight.detach().cpu().double()
    bias = model.linear.bias.detach().cpu().double()
    mean = model.feature_mean.detach().cpu().double()
    std = model.feature_std.detach().cpu().double()
    scaled = weight / std
    return scaled.float(), (bias - scaled @ mean).float()


class _Classifier(nn.Module):
    """The exported graph: ``(label, probabilities)`` from ``features``, with the model's
    standardisation folded into its linear layer."""

    def __init__(self, model: SoftmaxRegression) -> None:
        super().__init__()
        weight, bias = fold_standardisation(model)
        self.linear = nn.Linear(model.n_features, model.n_classes)
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probabilities = ts.softmax(self.linear(features), dim=-1)
        return probabilities.argmax(dim=-1), probabilities


def translation_table(opset_version: int = DEFAULT_OPSET) -> dict[Callable, Callable]:
    """Map the library's registered ops to standard ONNX ops, for ``torch.onnx.export``.

    Args:
        opset_version: the default-domain opset of the exported model (>= 13 for these ops).

    Returns:
        ``{torch.ops.triton_softmax.softmax.default: ..., ...log_softmax.default: ...}``; each value
        emits one ``Softmax`` / ``LogSoftmax`` over the last axis, as the ops compute.
    """
    op = onnxscript.values.Opset("", opset_version)

    def softmax(x):
        return op.Softmax(x, axis=-1)

    def log_softmax(x):
        return op.LogSoftmax(x, axis=-1)

    return {
        torch.ops.triton_softmax.softmax.default: softmax,
        torch.ops.triton_softmax.log_softmax.default: log_softmax,
    }


def to_onnx(
    model: SoftmaxRegression,
    *,
    feature_names: Sequence[str],
    class_names: Sequence[str],
    metadata: dict[str, str] | None = None,
    opset_version: int = DEFAULT_OPSET,
) -> onnx.ModelProto:
    """Export ``model`` with ``torch.onnx.export(dynamo=True)`` and a dynamic batch dimension.

    The export traces a CPU copy on fake tensors; no kernel runs and the model is not changed.

    Args:
        model: a trained model (any device).
        feature_names: one per feature, stored as JSON in ``metadata_props["feature_names"]``.
        class_names: one per class, stored as JSON in ``metadata_props["class_names"]``.
        metadata: more ``metadata_props`` entries.
        opset_version: default-domain opset, at least 18.

    Returns:
        The model proto, with every initializer embedded.

    Raises:
        ValueError: the names do not match the model or the opset is below 18.
    """
    if opset_version < MIN_OPSET:
        raise ValueError(f"opset must be at least {MIN_OPSET}, got {opset_version}")
    if len(feature_names) != model.n_features or len(class_names) != model.n_classes:
        raise ValueError(
            f"{len(feature_names)} feature names and {len(class_names)} class names for a model "
            f"with {model.n_features} features and {model.n_classes} classes"
        )
    wrapper = _Classifier(model).eval()
    example = torch.zeros(2, model.n_features)
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper,
            (example,),
            dynamo=True,
            opset_version=opset_version,
            input_names=[INPUT],
            output_names=list(OUTPUTS),
            dynamic_shapes={INPUT: {0: torch.export.Dim("batch")}},
            custom_translation_table=translation_table(opset_version),
            verbose=False,
        )
    proto = program.model_proto
    props = {
        FEATURE_NAMES: json.dumps(list(feature_names)),
        CLASS_NAMES: json.dumps(list(class_names)),
        **(metadata or {}),
    }
    onnx.helper.set_model_props(proto, props)
    proto.doc_string = "Softmax regression exported by triton-softmax"
    return proto


def save_onnx(proto: onnx.ModelProto, path: str | os.PathLike[str]) -> Path:
    """Write the model as one self-contained file, atomically, and check it (``full_check``).

    The checks read the written file before it replaces ``path``; a model that fails them leaves
    ``path`` as it was.

    Args:
        proto: the model.
        path: destination ``.onnx`` file.

    Returns:
        The path written.

    Raises:
        onnx.checker.ValidationError: the checker rejects the model.
        ExportError: a tensor refers to external data.
    """
    with atomic_path(path) as tmp:
        _save_checked(proto, tmp)
    return Path(path)


def _save_checked(proto: onnx.ModelProto, path: Path) -> None:
    """Write ``proto`` to ``path`` and run the ONNX checker on the file written."""
    external = [
        t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
    ]
    if external:
        raise ExportError(f"initializers stored outside the model: {external}")
    onnx.save_model(proto, path, save_as_external_data=False)
    onnx.checker.check_model(os.fspath(path), full_check=True)


@torch.no_grad()
def check_model(model: SoftmaxRegression, source: str | os.PathLike[str] | None = None) -> None:
    """Refuse a model whose numbers cannot give probabilities: NaN or infinite weights, a
    standard deviation that is not positive, or folded weights that overflow float32.

    Args:
        model: the model to export.
        source: where it was loaded from (a checkpoint), named in the message.

    Raises:
        ExportError: naming the tensor, how many of its values are bad, and ``source``.
    """
    where = f"{os.fspath(source)}: " if source is not None else ""
    tensors = {
        "linear.weight": model.linear.weight,
        "linear.bias": model.linear.bias,
        "feature_mean": model.feature_mean,
        "feature_std": model.feature_std,
    }
    for name, tensor in tensors.items():
        values = tensor.detach().cpu().double()
        bad = int((~torch.isfinite(values)).sum())
        if name == "feature_std":
            bad += int((values <= 0).sum())
        if bad:
            what = "NaN or infinite" if name != "feature_std" else "NaN, infinite or not positive"
            raise ExportError(
                f"{where}the model's {name} has {bad} {what} value(s) of {values.numel()}; "
                "it cannot be exported (retrain it)"
            )
    weight, bias = fold_standardisation(model)
    if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
        raise ExportError(
            f"{where}the model's weights divided by feature_std overflow float32; "
            "it cannot be exported (retrain it)"
        )


@torch.no_grad()
def check_parity(
    path: str | os.PathLike[str], model: SoftmaxRegression, features: np.ndarray
) -> ParityReport:
    """Compare onnxruntime (CPU) with the torch model on the same rows.

    Args:
        path: the exported ``.onnx`` file.
        model: the torch model it came from.
        features: float32 array (N, n_features), N >= 1.

    Returns:
        The comparison; ``ok`` tells whether it is within ``PARITY_ATOL`` with identical labels.
    """
    x = np.ascontiguousarray(features, dtype=np.float32)
    label, proba = OnnxClassifier(path, providers=[CPU_PROVIDER]).run(x)
    device = next(model.parameters()).device
    expected = model.eval()(torch.from_numpy(x).to(device)).cpu().numpy()
    expected_label = expected.argmax(axis=-1)
    mismatches = int((label != expected_label).sum())
    return ParityReport(
        n_rows=int(x.shape[0]),
        max_abs_diff=float(np.abs(proba - expected).max()) if x.shape[0] else 0.0,
        labels_identical=mismatches == 0,
        n_label_mismatches=mismatches,
    )


def export_and_verify(
    model: SoftmaxRegression,
    path: str | os.PathLike[str],
    features: np.ndarray,
    *,
    feature_names: Sequence[str],
    class_names: Sequence[str],
    metadata: dict[str, str] | None = None,
    opset_version: int = DEFAULT_OPSET,
    source: str | os.PathLike[str] | None = None,
) -> ParityReport:
    """Export, check, save and compare with torch; the whole ``train``/``export`` pipeline step.

    The model is written to a temporary file beside ``path``, checked there (ONNX checker, then
    onnxruntime against torch) and only then renamed over ``path`` (``atomic_path``: a link is
    kept, a file keeps its mode). Any failure leaves ``path`` as it was and no temporary file.

    Args:
        model: a trained model.
        path: destination ``.onnx`` file.
        features: float32 rows (N, n_features) for the parity check, e.g. the held-out set.
        feature_names: one per feature.
        class_names: one per class.
        metadata: more ``metadata_props`` entries.
        opset_version: default-domain opset, at least 18.
        source: the checkpoint the model was loaded from, if any: named in the messages about
            the model, and refused as ``path``.

    Returns:
        The parity report (already known to be ``ok``).

    Raises:
        ExportError: the model has NaN or infinite numbers (``check_model``), parity fails, or the
            file is not self-contained.
        WriteError: ``path`` is ``source``, or cannot be written.
    """
    check_model(model, source)
    if source is not None:
        check_not_input(path, [source])
    proto = to_onnx(
        model,
        feature_names=feature_names,
        class_names=class_names,
        metadata=metadata,
        opset_version=opset_version,
    )
    with atomic_path(path) as tmp:
        _save_checked(proto, tmp)
        report = check_parity(tmp, model, features)
        if not report.ok:
            raise ExportError(
                f"onnxruntime disagrees with torch on {report.n_rows} rows: max abs difference "
                f"{report.max_abs_diff:.3g} (limit {PARITY_ATOL:g}), "
                f"{report.n_label_mismatches} different labels; nothing written to "
                f"{os.fspath(path)}"
            )
    return report


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's log lines (e.g. 'torchvision is not installed') for the duration."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
