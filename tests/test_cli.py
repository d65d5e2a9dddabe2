"""The `triton-softmax` command end to end in temporary folders, and its one-line errors."""

import contextlib
import csv
import fcntl
import io
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import fields
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch

from triton_softmax import cli
from triton_softmax._atomic import WriteError, atomic_path
from triton_softmax.export.runtime import OnnxClassifier
from triton_softmax.regression import TrainConfig, load_checkpoint, load_iris

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

    monkeypatch.setattr(cli.predict.csv, "writer", FailingWriter)
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


def test_version_is_the_installed_distribution(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    captured = capsys.readouterr()
    assert captured.out == f"triton-softmax {metadata.version('triton-softmax')}\n"
    assert not captured.err


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
        "junk.safetensors": "not a checkpoint\n",
        "a_file": "a regular file where a folder is wanted\n",
    }
    for name, text in files.items():
        (folder / name).write_text(text)
    f = folder
    good = f / "good.csv"
    good.write_text(f"{names}\n1,2,3,4\n")
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
        (["train", "--ignore-columns", "id"], "--ignore-columns needs --data"),
        (["train", "--data", f / "text.csv", "--ignore-columns", "c"], "to ignore 'c'"),
        (["train", "--out", f / "a_file"], "a_file: exists and is not a folder"),
        (["train", "--out", f / "a_file" / "run"], "a_file is a file, not a folder"),
        (["predict", model, good, "-o", f], f"{f}: is a folder; give a file name"),
        (["predict", model, good, "-o", "."], ".: is a folder; give a file name"),
        (["predict", model, good, "-o", f / "a_file" / "p.csv"], "is a file, not a folder"),
        (["predict", model, good, "--keep-columns", "id"], "missing column(s) to keep 'id'"),
        (["predict", model, good, "--keep-columns", "label"], "has a column of that name"),
        (["export", ckpt, "-o", f], "is a folder; give a file name"),
        (["predict", model, f / "nan.csv"], "row 3, column 'sepal_width': 'nan' is not a finite"),
        (["predict", model, f / "cols.csv"], "missing feature column(s) 'sepal_width'"),
        (["predict", model, f / "empty.csv"], "the file is empty"),
        (["predict", f / "text.csv", f / "cols.csv"], "onnxruntime cannot load it"),
        (["predict", f / "nope.onnx", f / "cols.csv"], "no such model file"),
        (["predict", model, f / "cols.csv", "--provider", "NopeProvider"], "not available"),
        (["info", f / "text.csv"], "expected a .onnx model or a .safetensors checkpoint"),
        (["info", f / "nope.onnx"], "no such model file"),
        (["export", f / "nope.safetensors"], "no such checkpoint file"),
        (["export", model], "export wants the .safetensors checkpoint written by train"),
        (["export", f / "junk.safetensors"], "not a safetensors file"),
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
        assert "Traceback" not in stderr and ".tmp" not in stderr
        assert not stdout  # refused before any work (training prints as it goes)
    assert not (tmp_path / "runs").exists()  # nothing written by the failed commands
    assert sorted(p.name for p in tmp_path.iterdir() if not p.suffix) == ["a_file"]


def test_predict_keeps_named_input_columns_first(flowers, tmp_path):
    names = list(flowers["iris"].feature_names)
    rows = [["a1", 5.1, 3.5, 1.4, 0.2, "x"], ["b2", 6.7, 3.0, 5.2, 2.3, "y"]]
    new = _write_csv(tmp_path / "new.csv", ["id", *names, "note"], rows)
    code, stdout, stderr = _main(
        "predict", flowers["out"] / "model.onnx", new, "--keep-columns", "id,note"
    )
    assert code == 0, stderr
    table = list(csv.reader(io.StringIO(stdout)))
    assert table[0][:4] == ["id", "note", "label", "class"]
    assert [r[:2] for r in table[1:]] == [["a1", "x"], ["b2", "y"]]
    assert [r[3] for r in table[1:]] == ["setosa", "virginica"]


def test_train_ignores_id_and_note_columns(flowers, tmp_path):
    iris = flowers["iris"]
    rows = [
        [f"r{i}", *map(float, x), iris.class_names[y], "some note"]
        for i, (x, y) in enumerate(zip(iris.features, iris.labels, strict=True))
    ]
    data = _write_csv(tmp_path / "noted.csv", ["id", *iris.feature_names, "kind", "note"], rows)
    out = tmp_path / "run"
    argv = ["train", "--data", data, "--ignore-columns", "id,note", "--out", out]
    code, stdout, stderr = _main(*argv, "--epochs", 5, "--no-reference", "-q")
    assert code == 0, stderr
    assert "data: " in stdout and ", 4 features, 3 classes" in stdout
    ckpt = load_checkpoint(out / "model.safetensors")
    assert ckpt.feature_names == list(iris.feature_names)
    assert ckpt.class_names == list(iris.class_names)


def test_train_never_overwrites_a_previous_model_unless_forced(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fast = ["--epochs", "3", "--no-reference", "-q"]
    previous = tmp_path / "runs" / "iris"
    previous.mkdir(parents=True)
    (previous / "model.onnx").write_text("a previous model\n")
    # Without --out: the next free runs/iris-N.
    code, stdout, stderr = _main("train", *fast)
    assert code == 0, stderr
    assert stdout.rstrip().endswith(f"model: {Path('runs', 'iris-2', 'model.onnx')}")
    assert (previous / "model.onnx").read_text() == "a previous model\n"
    # An explicit --out holding a model: refused before training, unless --force.
    code, stdout, stderr = _main("train", "--out", previous, *fast)
    assert code == 1 and not stdout
    assert f"{previous} already holds a model (model.onnx)" in stderr and "--force" in stderr
    assert (previous / "model.onnx").read_text() == "a previous model\n"
    code, _, stderr = _main("train", "--out", previous, "--force", *fast)
    assert code == 0, stderr
    assert OnnxClassifier(previous / "model.onnx").n_classes == 3


def test_training_options_come_from_the_config_fields(capsys):
    parser = cli._parser()
    argv = ["train", "--epochs", "7", "--lr", "0.5", "--optimizer", "sgd", "--min-delta", "0.01"]
    expected = TrainConfig(epochs=7, lr=0.5, optimizer="sgd", min_delta=0.01)
    assert cli.train.train_config(parser.parse_args(argv)) == expected
    assert cli.train.train_config(parser.parse_args(["train"])) == TrainConfig()
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    usage = capsys.readouterr().out
    for f in fields(TrainConfig):
        assert f"--{f.name.replace('_', '-')} " in usage, f.name


def test_missing_onnx_extra_is_one_line_with_the_install_command(flowers, monkeypatch):
    # As if `pip install triton-softmax` had run without the [onnx] extra.
    for name in ("triton_softmax.export.runtime", "triton_softmax.export.onnx_export"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    for name in ("onnx", "onnxruntime"):
        monkeypatch.setitem(sys.modules, name, None)
    model, data = flowers["out"] / "model.onnx", flowers["data"]
    for argv in (["train", "--epochs", "3"], ["predict", model, data]):
        code, stdout, stderr = _main(*argv)
        assert code == 1 and not stdout
        assert stderr.count("\n") == 1, stderr
        assert stderr.startswith(f"triton-softmax {argv[0]}: error: onnx")
        assert "the [onnx] extra has it: pip install " in stderr
        assert '"onnxruntime>=' in stderr and "triton-softmax[" not in stderr


def test_write_errors_name_the_destination_never_the_temporary_file(tmp_path, monkeypatch):
    with pytest.raises(WriteError, match=r"is a folder; give a file name") as e:
        with atomic_path(tmp_path) as tmp:
            tmp.write_text("x")
    assert str(e.value).startswith(str(tmp_path)) and ".tmp" not in str(e.value)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(WriteError, match=r"a_file/out.csv: cannot write there") as e:
        with atomic_path(tmp_path / "a_file" / "out.csv") as tmp:
            tmp.write_text("x")

    def replace(src, dst):
        raise IsADirectoryError(21, "Is a directory", str(src), str(dst))

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(WriteError, match=r"out.csv: Is a directory") as e:
        with atomic_path(tmp_path / "out.csv") as tmp:
            tmp.write_text("x")
    assert ".tmp" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.parametrize("moment", ["during-imports", "during-training"])
def test_ctrl_c_exits_130_with_one_line(tmp_path, moment):
    out = tmp_path / "run"
    argv = ["train", "--out", str(out), "--epochs", "100000", "--patience", "0", "-q"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "triton_softmax.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        # A shell without job control starts background jobs with SIGINT ignored; undo that.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    if moment == "during-imports":
        time.sleep(0.5)  # importing torch alone takes longer; onnxruntime comes after it
    else:
        for line in proc.stdout:  # the last line before training starts
            if line.startswith("data: "):
                break
        time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert stderr == "triton-softmax: interrupted\n"
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow  # the installed command's whole default run in a subprocess: 20-50 s
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


def _one_line_error(code: int, stdout: str, stderr: str, command: str, message: str) -> None:
    assert code == 1 and not stdout, stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    assert stderr.startswith(f"triton-softmax {command}: error: ") and message in stderr, stderr


def test_predict_output_links_fifos_and_modes(flowers, tmp_path):
    model, data = flowers["out"] / "model.onnx", flowers["data"]
    code, expected, _ = _main("predict", model, data)
    assert code == 0
    # A symlink is kept; the file it points to gets the predictions and keeps its mode.
    target = tmp_path / "kept.csv"
    target.write_text("old\n")
    target.chmod(0o600)
    link = tmp_path / "link.csv"
    link.symlink_to(target.name)
    code, _, stderr = _main("predict", model, data, "-o", link)
    assert code == 0, stderr
    assert link.is_symlink() and target.read_text() == expected
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    # A FIFO is written through (it was replaced by a regular file).
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()
    code, _, stderr = _main("predict", model, data, "-o", fifo)
    reader.join(timeout=30)
    assert code == 0, stderr
    assert got == [expected] and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    # A read-only file: refused with one line, unless --force; it stays read-only.
    frozen = tmp_path / "frozen.csv"
    frozen.write_text("old\n")
    frozen.chmod(0o444)
    code, stdout, stderr = _main("predict", model, data, "-o", frozen)
    _one_line_error(code, stdout, stderr, "predict", "frozen.csv: is read-only (mode 0444)")
    assert "--force" in stderr and frozen.read_text() == "old\n"
    code, _, stderr = _main("predict", model, data, "-o", frozen, "--force")
    assert code == 0, stderr
    assert frozen.read_text() == expected and stat.S_IMODE(frozen.stat().st_mode) == 0o444
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "fifo",
        "frozen.csv",
        "kept.csv",
        "link.csv",
    ]


def test_output_with_a_trailing_slash_is_refused_not_written_as_a_file(flowers, tmp_path):
    model, data = flowers["out"] / "model.onnx", flowers["data"]
    for argv in (
        ["predict", model, data, "-o", f"{tmp_path / 'newdir'}/"],
        ["export", flowers["out"] / "model.safetensors", "-o", f"{tmp_path / 'newdir'}/"],
    ):
        code, stdout, stderr = _main(*argv)
        _one_line_error(code, stdout, stderr, argv[0], "newdir/: names a folder")
    assert not (tmp_path / "newdir").exists()


def test_export_keeps_a_link_and_refuses_a_fifo(flowers, tmp_path):
    ckpt = flowers["out"] / "model.safetensors"
    fifo = tmp_path / "fifo.onnx"
    os.mkfifo(fifo)
    code, stdout, stderr = _main("export", ckpt, "-o", fifo)
    _one_line_error(code, stdout, stderr, "export", "fifo.onnx: is not a regular file")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    target = tmp_path / "real.onnx"
    link = tmp_path / "link.onnx"
    link.symlink_to(target.name)
    code, stdout, stderr = _main("export", ckpt, "-o", link)
    assert code == 0, stderr
    assert stdout.rstrip().endswith(f"model: {link}")
    assert link.is_symlink() and OnnxClassifier(target).n_classes == 3


def test_a_second_train_into_a_locked_folder_fails_with_one_line(tmp_path, monkeypatch):
    # Two concurrent `train -o X` both reported success and only one model was left. The test
    # process holds the lock a running train would hold.
    monkeypatch.chdir(tmp_path)
    busy = tmp_path / "busy"
    busy.mkdir()
    fast = ["--epochs", "1", "--no-reference", "-q"]
    fd = os.open(busy, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, stdout, stderr = _main("train", "--out", busy, *fast)
        _one_line_error(code, stdout, stderr, "train", "another `triton-softmax train` is writing")
        assert not any(busy.iterdir())
        # Without --out a locked runs/iris is passed over like one holding a model.
        (tmp_path / "runs").mkdir()
        os.rename(busy, tmp_path / "runs" / "iris")
        code, stdout, stderr = _main("train", *fast)
        assert code == 0, stderr
        assert stdout.rstrip().endswith(f"model: {Path('runs', 'iris-2', 'model.onnx')}")
        assert not any((tmp_path / "runs" / "iris").iterdir())
    finally:
        os.close(fd)
    # Released when a run ends: the same folder can be trained into again (with --force).
    code, _, stderr = _main("train", "--out", Path("runs", "iris-2"), "--force", *fast)
    assert code == 0, stderr


def test_a_failed_train_leaves_no_folder_it_created(tmp_path, monkeypatch):
    out = tmp_path / "new" / "run"

    def fail(*args, **kwargs):
        raise ValueError("stopped for the test")

    monkeypatch.setattr("triton_softmax.regression.train", fail)
    code, _, stderr = _main("train", "--out", out, "--epochs", "1", "--no-reference", "-q")
    assert code == 1 and "stopped for the test" in stderr
    assert not out.exists()


@pytest.mark.parametrize(
    ("field", "text"),
    [("versions", "[1]"), ("config", "null"), ("metrics", "5"), ("class_names", '"abc"')],
)
def test_corrupt_checkpoint_metadata_is_one_line_naming_file_and_field(
    flowers, tmp_path, field, text
):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(flowers["out"] / "model.safetensors"), framework="pt") as f:
        meta = {**f.metadata(), field: text}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata=meta)
    message = f"{path}: checkpoint metadata field {field!r}"
    _one_line_error(*_main("info", path), "info", message)
    _one_line_error(*_main("export", path, "-o", tmp_path / "m.onnx"), "export", message)
    assert not (tmp_path / "m.onnx").exists()


def test_predict_refuses_a_model_that_repeats_a_class_name(flowers, tmp_path):
    import onnx

    proto = onnx.load(str(flowers["out"] / "model.onnx"))
    for prop in proto.metadata_props:
        if prop.key == "class_names":
            prop.value = json.dumps(["setosa", "setosa", "virginica"])
    model = tmp_path / "model.onnx"
    onnx.save(proto, str(model))
    _one_line_error(
        *_main("predict", model, flowers["data"]), "predict", "names class 'setosa' more than once"
    )


def test_an_output_that_is_an_input_is_refused_with_one_line(flowers, tmp_path):
    # predict x.csv -o x.csv (also through a link), export m.safetensors -o m.safetensors:
    # refused before anything is written, the input left as it was.
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes((flowers["out"] / "model.safetensors").read_bytes())
    data = tmp_path / "flowers.csv"
    data.write_bytes(Path(flowers["data"]).read_bytes())
    (tmp_path / "link.csv").symlink_to(data)
    before = {p: p.read_bytes() for p in (ckpt, data)}
    for argv in (
        ["predict", flowers["out"] / "model.onnx", data, "-o", data],
        ["predict", flowers["out"] / "model.onnx", data, "-o", tmp_path / "link.csv", "--force"],
        ["export", ckpt, "-o", ckpt, "--force"],
    ):
        code, stdout, stderr = _main(*map(str, argv))
        assert code == 1 and stderr.count("\n") == 1, stderr
        assert "input" in stderr, stderr
    assert {p: p.read_bytes() for p in (ckpt, data)} == before
