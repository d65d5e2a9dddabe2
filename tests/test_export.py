"""ONNX export: standard ops only, signature, metadata, parity with torch and the ONNX reference."""

import copy
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx.reference import ReferenceEvaluator
from torch import nn

import triton_softmax as ts
from triton_softmax._atomic import WriteError
from triton_softmax.export import onnx_export
from triton_softmax.export.onnx_export import (
    ExportError,
    ParityReport,
    check_parity,
    export_and_verify,
    fold_standardisation,
    to_onnx,
    translation_table,
)
from triton_softmax.regression import TrainConfig, load_iris, train


@pytest.fixture(scope="module")
def iris():
    return load_iris()


@pytest.fixture(scope="module")
def model(iris):
    # A short run is enough: parity does not depend on how well the model is trained.
    return train(iris, TrainConfig(epochs=30), reference=False).model


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory, model, iris):
    path = tmp_path_factory.mktemp("export") / "model.onnx"
    report = export_and_verify(
        model,
        path,
        iris.features,
        feature_names=iris.feature_names,
        class_names=iris.class_names,
        metadata={"note": "test"},
    )
    assert report.ok and report.n_rows == 150
    return path


def _rows(iris, n: int, seed: int) -> np.ndarray:
    """n rows around the Iris data: resampled rows plus noise, float32."""
    rng = np.random.default_rng(seed)
    picked = iris.features[rng.integers(0, iris.n_samples, n)]
    return (picked + rng.normal(scale=0.3, size=picked.shape)).astype(np.float32)


def _device(model: torch.nn.Module) -> torch.device:
    """Where training put the model (CUDA when there is one)."""
    return next(model.parameters()).device


def test_graph_uses_standard_ops_only_and_passes_the_full_check(onnx_path):
    proto = onnx.load(str(onnx_path))
    onnx.checker.check_model(proto, full_check=True)
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", 18)]
    assert {n.domain for n in proto.graph.node} == {""}
    ops = [n.op_type for n in proto.graph.node]
    assert "Softmax" in ops and "ArgMax" in ops and "Gemm" in ops
    assert "Sub" not in ops and "Div" not in ops  # standardisation folded into the Gemm
    assert not any("triton" in op.lower() for op in ops)
    # One self-contained file: every weight inside, nothing written next to it.
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert sorted(p.name for p in onnx_path.parent.iterdir()) == ["model.onnx"]


def test_folded_linear_layer_is_the_model(model, iris):
    weight, bias = fold_standardisation(model)
    assert weight.dtype == bias.dtype == torch.float32
    x = _rows(iris, 64, seed=5)
    z = x.astype(np.float64) @ weight.double().numpy().T + bias.double().numpy()
    folded = np.exp(z - z.max(axis=1, keepdims=True))
    folded /= folded.sum(axis=1, keepdims=True)
    with torch.no_grad():
        expected = model(torch.from_numpy(x).to(_device(model))).double().cpu().numpy()
    np.testing.assert_allclose(folded, expected, rtol=0, atol=1e-6)


def test_signature_and_metadata(onnx_path, iris):
    proto = onnx.load(str(onnx_path))
    (inp,) = proto.graph.input
    label, proba = proto.graph.output

    def dims(value_info):
        return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]

    assert inp.name == "features" and inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert label.name == "label" and label.type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert proba.name == "probabilities"
    assert proba.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    batch = dims(inp)[0]
    assert isinstance(batch, str)  # symbolic: any batch size
    assert dims(inp) == [batch, 4] and dims(label) == [batch] and dims(proba) == [batch, 3]
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["class_names"]) == list(iris.class_names)
    assert json.loads(props["feature_names"]) == list(iris.feature_names)
    assert props["note"] == "test"


@pytest.mark.parametrize("batch", [1, 7, 1000])
def test_onnxruntime_matches_torch(onnx_path, model, iris, batch):
    x = _rows(iris, batch, seed=batch)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    label, proba = session.run(["label", "probabilities"], {"features": x})
    with torch.no_grad():
        expected = model(torch.from_numpy(x).to(_device(model))).cpu().numpy()
    assert label.dtype == np.int64 and label.shape == (batch,)
    assert proba.dtype == np.float32 and proba.shape == (batch, 3)
    np.testing.assert_allclose(proba, expected, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(label, expected.argmax(axis=1))
    report = check_parity(onnx_path, model, x)
    assert report.ok and report.n_rows == batch and report.max_abs_diff <= 1e-5


@pytest.mark.parametrize("batch", [7, 1000])
def test_onnxruntime_matches_the_onnx_reference_evaluator(onnx_path, iris, batch):
    x = _rows(iris, batch, seed=100 + batch)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    label, proba = session.run(["label", "probabilities"], {"features": x})
    ref_label, ref_proba = ReferenceEvaluator(str(onnx_path)).run(
        ["label", "probabilities"], {"features": x}
    )
    np.testing.assert_allclose(proba, ref_proba, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(label, ref_label)


def test_log_softmax_op_is_translated_to_standard_log_softmax(tmp_path):
    class LogProbs(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return ts.log_softmax(x, dim=-1)

    x = torch.randn(5, 6)
    program = torch.onnx.export(
        LogProbs(),
        (x,),
        dynamo=True,
        opset_version=18,
        custom_translation_table=translation_table(18),
        verbose=False,
    )
    proto = program.model_proto
    assert [n.op_type for n in proto.graph.node] == ["LogSoftmax"]
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {proto.graph.input[0].name: x.numpy()})
    np.testing.assert_allclose(out, torch.log_softmax(x, dim=-1).numpy(), rtol=0, atol=1e-5)


def test_bad_arguments_are_rejected(model, iris):
    with pytest.raises(ValueError, match="opset must be at least 18"):
        to_onnx(
            model, feature_names=iris.feature_names, class_names=iris.class_names, opset_version=17
        )
    with pytest.raises(ValueError, match="2 class names for a model with 4 features and 3"):
        to_onnx(model, feature_names=iris.feature_names, class_names=["a", "b"])


def test_failed_parity_raises_and_leaves_no_file(tmp_path, model, iris, monkeypatch):
    failing = ParityReport(n_rows=3, max_abs_diff=0.5, labels_identical=False, n_label_mismatches=2)
    monkeypatch.setattr(onnx_export, "check_parity", lambda *args: failing)
    path = tmp_path / "model.onnx"
    with pytest.raises(ExportError, match=r"max abs difference 0\.5 .* 2 different labels"):
        export_and_verify(
            model,
            path,
            iris.features[:3],
            feature_names=iris.feature_names,
            class_names=iris.class_names,
        )
    assert list(tmp_path.iterdir()) == []


def _export(model, path, iris, **kwargs):
    return export_and_verify(
        model,
        path,
        iris.features[:20],
        feature_names=iris.feature_names,
        class_names=iris.class_names,
        **kwargs,
    )


def test_checks_read_a_temporary_file_and_a_failure_keeps_the_old_model(
    tmp_path, model, iris, monkeypatch
):
    # The model was written over the destination before its parity check: a failure deleted
    # the previous good.onnx.
    good = tmp_path / "good.onnx"
    good.write_bytes(b"previous model")
    good.chmod(0o640)
    checked = []

    def failing(path, *args):
        checked.append((os.path.basename(path), good.read_bytes()))
        onnx.checker.check_model(os.fspath(path), full_check=True)  # the new model, complete
        return ParityReport(
            n_rows=3, max_abs_diff=0.5, labels_identical=False, n_label_mismatches=2
        )

    monkeypatch.setattr(onnx_export, "check_parity", failing)
    with pytest.raises(ExportError, match=r"2 different labels; nothing written to .*good\.onnx"):
        _export(model, good, iris)
    [(name, seen)] = checked
    assert name.startswith(".good.onnx.") and name.endswith(".tmp")
    assert seen == b"previous model"
    assert sorted(os.listdir(tmp_path)) == ["good.onnx"]
    assert good.read_bytes() == b"previous model" and good.stat().st_mode & 0o777 == 0o640
    monkeypatch.undo()
    report = _export(model, good, iris)  # a good model replaces it, keeping the mode
    assert report.ok and sorted(os.listdir(tmp_path)) == ["good.onnx"]
    assert onnx.load(good).graph.input[0].name == "features"
    assert good.stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize(
    ("tensor", "index", "value", "message"),
    [
        ("linear.weight", (0, 1), float("nan"), "linear.weight has 1 NaN or infinite"),
        ("linear.bias", (2,), float("inf"), "linear.bias has 1 NaN or infinite"),
        ("feature_std", (0,), float("inf"), "feature_std has 1 NaN, infinite or not positive"),
        ("feature_std", (3,), 0.0, "feature_std has 1 NaN, infinite or not positive"),
        ("feature_std", (1,), 1e-40, "weights divided by feature_std overflow float32"),
    ],
)
def test_a_bad_checkpoint_is_named_and_the_old_model_kept(
    tmp_path, model, iris, tensor, index, value, message
):
    # A NaN weight failed parity and deleted good.onnx; an infinite std passed parity (both
    # sides computed zeros for that feature) and silently replaced it.
    bad = copy.deepcopy(model).cpu()
    with torch.no_grad():
        {**dict(bad.named_parameters()), **dict(bad.named_buffers())}[tensor][index] = value
    good = tmp_path / "good.onnx"
    good.write_bytes(b"previous model")
    with pytest.raises(ExportError, match=rf"^ck\.safetensors: the model's {message}"):
        _export(bad, good, iris, source="ck.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["good.onnx"]
    assert good.read_bytes() == b"previous model"


def test_the_checkpoint_is_not_overwritten(tmp_path, model, iris, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checkpoint = tmp_path / "m.safetensors"
    checkpoint.write_bytes(b"checkpoint")
    os.symlink("m.safetensors", "link.onnx")
    for out in ("m.safetensors", "link.onnx"):
        with pytest.raises(WriteError, match=rf"^{out}: is an input file of this command"):
            _export(model, out, iris, source="m.safetensors")
    assert checkpoint.read_bytes() == b"checkpoint"
    assert sorted(os.listdir(tmp_path)) == ["link.onnx", "m.safetensors"]
