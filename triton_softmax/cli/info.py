"""``triton-softmax info``: describe a model.onnx (no torch) or a checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from triton_softmax.export.signature import CLASS_NAMES, FEATURE_NAMES, INPUT, LABEL, PROBABILITIES

from ._common import CommandError


def slow_imports(args: argparse.Namespace) -> tuple[str, ...]:
    """The slow imports of this command (a checkpoint's need torch), done with Ctrl-C deferred."""
    if args.path.suffix == ".safetensors":
        return ("triton_softmax.regression.checkpoint",)
    return ("onnx", "triton_softmax.export.runtime")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``info`` to the command line."""
    info = subparsers.add_parser(
        "info",
        help="describe a model.onnx or a checkpoint",
        description="Print the signature, names, metadata and metrics of a model or checkpoint.",
    )
    info.add_argument("path", type=Path, help="a .onnx model or a .safetensors checkpoint")
    info.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Describe a model or checkpoint; the exit status."""
    path: Path = args.path
    if path.suffix == ".safetensors":
        _info_checkpoint(path)
    elif path.suffix == ".onnx":
        _info_onnx(path)
    else:
        raise CommandError(f"{path}: expected a .onnx model or a .safetensors checkpoint")
    return 0


def _info_onnx(path: Path) -> None:
    import onnx

    from triton_softmax.export.runtime import OnnxClassifier

    clf = OnnxClassifier(path)
    proto = onnx.load(str(path))
    opsets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in proto.opset_import)
    nodes = " -> ".join(n.op_type for n in proto.graph.node)
    lines = [
        f"model: {path} ({path.stat().st_size} bytes)",
        f"producer: {proto.producer_name} {proto.producer_version}; opset: {opsets}",
        f"input: {INPUT} float32 [N, {clf.n_features}]",
        f"outputs: {LABEL} int64 [N]; {PROBABILITIES} float32 [N, {clf.n_classes}]",
        f"features: {', '.join(clf.feature_names)}",
        f"classes: {', '.join(clf.classes_)}",
        f"graph: {nodes}",
    ]
    lines += [
        f"metadata {k}: {v}"
        for k, v in sorted(clf.metadata.items())
        if k not in (FEATURE_NAMES, CLASS_NAMES)
    ]
    lines.append(f"onnxruntime providers in use: {', '.join(clf.providers)}")
    print("\n".join(lines))


def _info_checkpoint(path: Path) -> None:
    from triton_softmax.regression import load_checkpoint

    ckpt = load_checkpoint(path)
    lines = [
        f"checkpoint: {path} ({path.stat().st_size} bytes)",
        f"model: SoftmaxRegression({ckpt.model.n_features} features, "
        f"{ckpt.model.n_classes} classes)",
        f"features: {', '.join(ckpt.feature_names)}",
        f"classes: {', '.join(ckpt.class_names)}",
        f"config: {_compact(ckpt.config)}",
        f"metrics: {_compact(ckpt.metrics)}",
        f"versions: {_compact(ckpt.versions)}",
    ]
    print("\n".join(lines))


def _compact(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())
