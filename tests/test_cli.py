"""The `triton-softmax` command end to end in temporary folders, and its one-line errors."""

import contextlib
import csv
import io
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch

from triton_softmax import cli
from triton_softmax.export.runtime import OnnxClassifier
from triton_softmax.regression import load_checkpoint, load_iris

REPO = Path(__file__).resolve().parents[1]


def _main(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def flowers(tmp_path_factory):
    """Iris as a user CSV: label first and renamed, trained with `train --data`."""
    folder = tmp_path_factory.mktemp("cli")
    iris = load_iris()
    rows = [
        [iris.class_names[y], *map(float, x)]
        for x, y in zip(iris.features, iris.labels, strict=True)
    ]
    data = _write_csv(folder / "flowers.csv", ["kind", *iris.feature_names], rows)
    out = folder / "runs" / "flowers"
    code, stdout, stderr = _main(
        "train", "--data", data, "--label-column", "kind", "--out", out, "--epochs", 40, "-q"
    )
    assert code == 0, stderr
    return {"folder": folder, "data": data, "out": out, "stdout": stdout, "iris": iris}


def test_train_writes_model_metrics_and_checkpoint(flowers):
    out, stdout = flowers["out"], flowers["stdout"]
    assert sorted(p.name for p in out.iterdir()) == [
        "metrics.json",
        "model.onnx",
        "model.safetensors",
    ]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["onnx_max_abs_diff"] <= 1e-5 and metrics["onnx_labels_identical"]
    assert metrics["train_accuracy"] >= 0.8 and metrics["test_accuracy"] >= 0.8
    assert metrics["epochs_run"] <= 40 and metrics["config"]["epochs"] == 40
    assert f"kernel path: {metrics['kernel_path']}" in stdout
    assert f"test {metrics['test_accuracy']:.4f}" in stdout
    assert "plain-torch reference" in stdout
    assert stdout.rstrip().endswith(f"model: {out / 'model.onnx'}")
    ckpt = load_checkpoint(out / "model.safetensors")
    assert ckpt.class_names == ["setosa", "versicolor", "virginica"]
    assert ckpt.metrics["onnx_max_abs_diff"] == metrics["onnx_max_abs_diff"]


def test_predict_by_column_name_to_file_and_stdout(flowers, tmp_path):
    iris = flowers["iris"]
    x = iris.features[::15]
    order = [3, 1, 0, 2]  # columns shuffled, plus an extra column
    header = ["id", *(iris.feature_names[i] for i in order)]
    rows = [[f"r{i}", *(float(v) for v in row[order])] for i, row in enumerate(x)]
    new = _write_csv(tmp_path / "new.csv", header, rows)
    target = tmp_path / "out" / "predictions.csv"
    model = flowers["out"] / "model.onnx"
    code, _, stderr = _main("predict", model, new, "-o", target)
    assert code == 0, stderr
    with open(target, newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == [
        "label",
        "class",
        "probability_setosa",
        "probability_versicolor",
        "probability_virginica",
    ]
    clf = OnnxClassifier(model)
    expected = clf.predict_proba(x)
    labels = [int(r[0]) for r in table[1:]]
    assert labels == expected.argmax(1).tolist()
    assert [r[1] for r in table[1:]] == clf.predict(x).tolist()
    proba = np.array([[float(v) for v in r[2:]] for r in table[1:]])
    np.testing.assert_allclose(proba, expected, rtol=1e-7, atol=0)
    assert [p.name for p in target.parent.iterdir()] == ["predictions.csv"]
    code, stdout, _ = _main("predict", model, new)
    assert code == 0
    with open(target, newline="") as f:
        assert stdout == f.read()


def test_predict_failure_leaves_no_partial_output(flowers, tmp_path, monkeypatch):
    model = flowers["out"] / "model.onnx"
    names = list(flowers["iris"].feature_names)
    good = _write_csv(tmp_path / "good.csv", names, [[5.1, 3.5, 1.4, 0.2]] * 3)
    target = tmp_path / "predictions.csv"
    target.write_text("previous content\n")

    real_writer = csv.writer

    class FailingWriter:
        """Writes the header, then fails as a full disk would."""

        def __init__(self, f, **kwargs):
            self.writer = real_writer(f, **kwargs)

        def writerow(self, row):
            if row[0] != "label":
                raise OSError(28, "No space left on device")
            self.writer.writerow(row)

    monkeypatch.setattr(cli.csv, "writer", FailingWriter)
    code, _, stderr = _main("predict", model, good, "-o", target)
    assert code == 1 and "No space left on device" in stderr
    assert target.read_text() == "previous content\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.csv", "predictions.csv"]


def test_info_describes_model_and_checkpoint(flowers):
    code, stdout, _ = _main("info", flowers["out"] / "model.onnx")
    assert code == 0
    assert "input: features float32 [N, 4]" in stdout
    assert "outputs: label int64 [N]; probabilities float32 [N, 3]" in stdout
    assert "classes: setosa, versicolor, virginica" in stdout
    assert "features: sepal_length, sepal_width, petal_length, petal_width" in stdout
    assert "opset: ai.onnx 18" in stdout and "Softmax" in stdout
    code, stdout, _ = _main("info", flowers["out"] / "model.safetensors")
    assert code == 0
    assert "SoftmaxRegression(4 features, 3 classes)" in stdout
    assert "epochs=40" in stdout and "test_accuracy=" in stdout and "torch=" in stdout


def test_export_from_checkpoint(flowers, tmp_path):
    target = tmp_path / "again.onnx"
    code, stdout, stderr = _main(
        "export", flowers["out"] / "model.safetensors", "-o", target, "--opset", 20
    )
    assert code == 0, stderr
    assert "256 synthetic rows" in stdout and "labels identical" in stdout
    x = flowers["iris"].features
    np.testing.assert_allclose(
        OnnxClassifier(target).predict_proba(x),
        OnnxClassifier(flowers["out"] / "model.onnx").predict_proba(x),
        rtol=0,
        atol=1e-6,
    )
    code, stdout, _ = _main("info", target)
    assert "opset: ai.onnx 20" in stdout


@pytest.mark.parametrize("command", ["train", "export", "predict", "info"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main([command, "--help"])
    assert done.value.code == 0
    assert f"usage: triton-softmax {command}" in capsys.readouterr().out


def _bad_inputs(folder: Path, model: Path, ckpt: Path) -> list[tuple[list[object], str]]:
    names = "sepal_length,sepal_width,petal_length,petal_width"
    files = {
        "empty.csv": "",
        "header.csv": "a,b,label\n",
        "missing.csv": "a,b,label\n1,,x\n2,3,y\n",
        "text.csv": "a,b,label\n1,2,x\n2,abc,y\n",
        "one_class.csv": "a,b,label\n1,2,x\n2,3,x\n",
        "nan.csv": f"{names}\n1,2,3,4\n1,nan,3,4\n",
        "cols.csv": "sepal_length,petal_width\n1,2\n",
    }
    for name, text in files.items():
        (folder / name).write_text(text)
    f = folder
    return [
        (["train", "--data", f / "nope.csv"], "nope.csv: no such file"),
        (["train", "--data", f / "empty.csv"], "empty.csv: the file is empty"),
        (["train", "--data", f / "header.csv"], "header.csv: no data rows"),
        (["train", "--data", f / "missing.csv"], "row 2, column 'b': missing value"),
        (["train", "--data", f / "text.csv"], "row 3, column 'b': 'abc' is not a number"),
        (["train", "--data", f / "text.csv", "--label-column", "y"], "no label column 'y'"),
        (["train", "--data", f / "one_class.csv"], "need at least two"),
        (["train", "--epochs", "0"], "epochs must be at least 1"),
        (["train", "--test-size", "1.5"], "test size must be strictly between 0 and 1"),
        (["train", "--opset", "17"], "--opset must be at least 18"),
        (["train", "--label-column", "kind"], "--label-column needs --data"),
        (["predict", model, f / "nan.csv"], "row 3, column 'sepal_width': 'nan' is not a finite"),
        (["predict", model, f / "cols.csv"], "missing feature column(s) 'sepal_width'"),
        (["predict", model, f / "empty.csv"], "the file is empty"),
        (["predict", f / "text.csv", f / "cols.csv"], "onnxruntime cannot load it"),
        (["predict", f / "nope.onnx", f / "cols.csv"], "no such model file"),
        (["predict", model, f / "cols.csv", "--provider", "NopeProvider"], "not available"),
        (["info", f / "text.csv"], "expected a .onnx model or a .safetensors checkpoint"),
        (["info", f / "nope.onnx"], "no such model file"),
        (["export", f / "nope.safetensors"], "no such checkpoint file"),
        (["export", model], "not a safetensors file"),
        (["export", ckpt, "--data", f / "cols.csv"], "missing feature column(s)"),
    ]


def test_bad_input_exits_non_zero_with_one_line(flowers, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a train command that wrongly ran would write runs/ here
    cases = _bad_inputs(
        tmp_path, flowers["out"] / "model.onnx", flowers["out"] / "model.safetensors"
    )
    for argv, message in cases:
        code, stdout, stderr = _main(*argv)
        assert code == 1, argv
        assert stderr.count("\n") == 1, (argv, stderr)
        assert stderr.startswith(f"triton-softmax {argv[0]}: error: "), (argv, stderr)
        assert message in stderr, (argv, stderr)
        assert "Traceback" not in stderr
    assert not (tmp_path / "runs").exists()  # nothing written by the failed commands


def test_console_script_default_run(tmp_path):
    """`triton-softmax train` with no arguments, as the README's first command runs it."""
    (entry,) = [
        e for e in metadata.entry_points(group="console_scripts") if e.name == "triton-softmax"
    ]
    assert entry.value == "triton_softmax.cli:main"
    script = Path(sys.executable).parent / "triton-softmax"
    if not script.exists():
        pytest.skip("the console script is not installed (pip install -e .)")
    # Without TRITON_INTERPRET a CPU-only machine takes the plain-torch path, as users see it.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [str(script), "train"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    expected_path = "triton" if torch.cuda.is_available() else "torch"
    assert f"kernel path: {expected_path} " in done.stdout
    assert done.stdout.rstrip().endswith(f"model: {Path('runs', 'iris', 'model.onnx')}")
    metrics = json.loads((tmp_path / "runs" / "iris" / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.95
    assert metrics["onnx_max_abs_diff"] <= 1e-5
    assert f"test {metrics['test_accuracy']:.4f}" in done.stdout
