"""triton_softmax.export.runtime.OnnxClassifier: signatures, providers, input checks, no torch.

Most tests build small models with onnx.helper (known weights, and malformed signatures on
purpose); one serves a real export in a subprocess where torch and triton cannot be imported.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from triton_softmax.export import runtime
from triton_softmax.export.onnx_export import export_and_verify
from triton_softmax.export.runtime import InputError, ModelError, OnnxClassifier, default_providers
from triton_softmax.regression import TrainConfig, load_iris, train

CLASSES = ["ant", "bee", "cat"]
FEATURES = ["x0", "x1"]
W = np.array([[1.0, -2.0], [0.5, 0.5], [-1.0, 3.0]], dtype=np.float32)  # (k, F)
B = np.array([0.1, 0.0, -0.2], dtype=np.float32)
MEAN = np.array([1.0, 2.0], dtype=np.float32)
STD = np.array([2.0, 0.5], dtype=np.float32)


def _expected(x: np.ndarray) -> np.ndarray:
    z = ((x.astype(np.float64) - MEAN) / STD) @ W.T + B
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _build(
    path: Path,
    *,
    input_name: str = "features",
    input_type: int = TensorProto.FLOAT,
    outputs: tuple[str, str] = ("label", "probabilities"),
    metadata: dict[str, str] | None = None,
) -> Path:
    """Standardise -> Gemm -> Softmax -> ArgMax, the graph the exporter writes, by hand."""
    k, f = W.shape
    x = input_name
    nodes = []
    if input_type != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", [x], ["x_float"], to=TensorProto.FLOAT))
        x = "x_float"
    nodes += [
        helper.make_node("Sub", [x, "mean"], ["centred"]),
        helper.make_node("Div", ["centred", "std"], ["scaled"]),
        helper.make_node("Gemm", ["scaled", "W", "B"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], [outputs[1]], axis=-1),
        helper.make_node("ArgMax", [outputs[1]], [outputs[0]], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info(input_name, input_type, ["N", f])],
        [
            helper.make_tensor_value_info(outputs[0], TensorProto.INT64, ["N"]),
            helper.make_tensor_value_info(outputs[1], TensorProto.FLOAT, ["N", k]),
        ],
        [
            numpy_helper.from_array(a, n)
            for a, n in ((MEAN, "mean"), (STD, "std"), (W, "W"), (B, "B"))
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    props = {"class_names": json.dumps(CLASSES), "feature_names": json.dumps(FEATURES)}
    props.update(metadata or {})
    helper.set_model_props(model, {k: v for k, v in props.items() if v is not None})
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(path))
    return path


@pytest.fixture(scope="module")
def clf(tmp_path_factory):
    return OnnxClassifier(_build(tmp_path_factory.mktemp("rt") / "m.onnx"))


def test_predictions_names_and_dtypes(clf):
    x = np.array([[0.0, 0.0], [3.0, 1.0], [1.0, 4.0], [-5.0, 2.5]], dtype=np.float32)
    proba = clf.predict_proba(x)
    assert proba.dtype == np.float32 and proba.shape == (4, 3)
    np.testing.assert_allclose(proba, _expected(x), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(clf.predict(x), np.array(CLASSES)[_expected(x).argmax(1)])
    assert list(clf.classes_) == CLASSES and clf.feature_names == FEATURES
    assert clf.n_features == 2 and clf.n_classes == 3
    label, _ = clf.run(x)
    assert label.dtype == np.int64


def test_ints_float64_and_lists_are_cast(clf):
    x = np.array([[1, 2], [3, -4]])
    expected = clf.predict_proba(x.astype(np.float32))
    for variant in (x.astype(np.int64), x.astype(np.int32), x.astype(np.float64), x.tolist()):
        np.testing.assert_array_equal(clf.predict_proba(variant), expected)


def test_empty_batch(clf):
    label, proba = clf.run(np.empty((0, 2), dtype=np.float32))
    assert label.shape == (0,) and proba.shape == (0, 3) and proba.dtype == np.float32


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (np.zeros((3, 3), np.float32), r"expected 2 features \(x0, x1\), got 3"),
        (np.zeros(2, np.float32), r"must be 2-D \(N, 2\), got shape \(2,\); .*reshape\(1, -1\)"),
        (np.zeros((1, 2, 1), np.float32), r"must be 2-D"),
        (np.array([["1", "2"]]), r"must be numeric .* got dtype <U1"),
        (np.array([[1.0, None]], dtype=object), r"must be numeric .* got dtype object"),
        (np.array([[True, False]]), r"must be numeric .* got dtype bool"),
        (np.array([[0, 0], [np.nan, 1], [0, 0], [1, np.inf]]), r"NaN or inf .* row\(s\) 1, 3 "),
        (np.array([[0.0, 1e39]]), r"NaN or inf \(after the cast to float32\) in row\(s\) 0 "),
        (np.full((12, 2), np.nan), r"row\(s\) 0, 1, .*, 9 and 2 more"),
    ],
    ids=[
        "features",
        "1d",
        "3d",
        "strings",
        "object",
        "bool",
        "nan-inf",
        "overflow",
        "many-rows",
    ],
)
def test_bad_input_is_named(clf, x, message):
    with pytest.raises(InputError, match=message):
        clf.predict_proba(x)


def test_provider_choice(tmp_path, monkeypatch):
    path = _build(tmp_path / "m.onnx")
    assert OnnxClassifier(path, providers=["CPUExecutionProvider"]).providers == [
        "CPUExecutionProvider"
    ]
    with pytest.raises(ValueError, match="NoSuchExecutionProvider not available; this onnxrun"):
        OnnxClassifier(path, providers=["NoSuchExecutionProvider"])
    with pytest.raises(ValueError, match="no provider; this onnxruntime offers"):
        OnnxClassifier(path, providers=[])
    monkeypatch.setattr(
        runtime.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPU..."]
    )
    assert default_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert default_providers() == ["CPUExecutionProvider"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_name": "x"}, r"expected one input 'features', found x tensor\(float\)"),
        ({"input_type": TensorProto.DOUBLE}, r"input 'features' must be float32"),
        ({"outputs": ("output_label", "probabilities")}, "expected outputs 'label' and"),
        ({"metadata": {"class_names": None}}, "metadata 'class_names' is missing"),
        ({"metadata": {"class_names": "ant,bee,cat"}}, "'class_names' is not a JSON list"),
        ({"metadata": {"class_names": "[1, 2, 3]"}}, "not a JSON list of strings"),
        ({"metadata": {"feature_names": '["a"]'}}, "'feature_names' has 1 names, the graph has 2"),
    ],
    ids=[
        "input-name",
        "input-dtype",
        "output-name",
        "no-classes",
        "not-json",
        "not-strings",
        "count",
    ],
)
def test_signature_is_checked_on_load(tmp_path, kwargs, message):
    path = _build(tmp_path / "m.onnx", **kwargs)
    with pytest.raises(ModelError, match=message):
        OnnxClassifier(path)


def test_missing_and_non_onnx_files(tmp_path):
    with pytest.raises(ModelError, match="no such model file"):
        OnnxClassifier(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_text("not a model\n")
    with pytest.raises(ModelError, match=r"junk\.onnx: onnxruntime cannot load it"):
        OnnxClassifier(junk)


def test_serving_an_export_with_torch_and_triton_blocked(tmp_path):
    iris = load_iris()
    model = train(iris, TrainConfig(epochs=20), reference=False).model
    path = tmp_path / "model.onnx"
    export_and_verify(
        model,
        path,
        iris.features,
        feature_names=iris.feature_names,
        class_names=iris.class_names,
    )
    x = iris.features[::10] + np.float32(0.05)
    np.save(tmp_path / "x.npy", x)
    # A user's own export.py in the working directory (first on sys.path) must not shadow ours.
    (tmp_path / "export.py").write_text("raise SystemExit('the user export.py was imported')\n")
    script = """
import json, sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
sys.modules["triton"] = None
import numpy as np
from triton_softmax.export.runtime import OnnxClassifier
clf = OnnxClassifier(sys.argv[1])
x = np.load(sys.argv[2])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "triton", "triton_softmax")
                and sys.modules[m] is not None)
print(json.dumps({"classes": list(clf.classes_), "features": clf.feature_names,
                  "predict": clf.predict(x).tolist(), "proba": clf.predict_proba(x).tolist(),
                  "providers": clf.providers, "loaded": loaded}))
"""
    # The installed package (editable or not), run from a folder outside the repository.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", script, str(path), str(tmp_path / "x.npy")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    # The lazy package imports neither torch nor triton (nor the kernels) for the serving path.
    assert out["loaded"] == [
        "triton_softmax",
        "triton_softmax.export",
        "triton_softmax.export.runtime",
        "triton_softmax.export.signature",
    ]
    assert out["classes"] == list(iris.class_names)
    assert out["features"] == list(iris.feature_names)
    assert "CPUExecutionProvider" in out["providers"]
    with torch.no_grad():
        device = next(model.parameters()).device  # training picks CUDA when there is one
        expected = model(torch.from_numpy(x).to(device)).cpu().numpy()
    np.testing.assert_allclose(np.array(out["proba"]), expected, rtol=0, atol=1e-5)
    assert out["predict"] == [iris.class_names[i] for i in expected.argmax(1)]
