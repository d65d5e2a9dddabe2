"""`train --force` replaces model.onnx, model.safetensors and metrics.json together.

A run writes its three files into a staging folder inside --out, reads them back, renames that
folder to the commit folder (the commit point), then moves the files in, model.onnx last. These
tests stop a real `train` subprocess at the moments the adversarial tests found: while staging
(Ctrl-C, SIGTERM, SIGKILL) and the moment the new model.onnx appears (SIGKILL). The old code
wrote model.onnx straight into --out first, so a kill there left it beside the old checkpoint.
"""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
from safetensors import safe_open

from triton_softmax import cli
from triton_softmax.cli.train import COMMIT_NAME, RUN_FILES, STAGE_PREFIX

FAST = ["--epochs", "1", "--no-reference", "-q"]
OLD_SEED, NEW_SEED = 100, 7


def _main(*argv: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def old_run(tmp_path_factory) -> dict[str, bytes]:
    """The bytes of a finished run's three files (seed ``OLD_SEED``)."""
    out = tmp_path_factory.mktemp("old") / "run"
    code, _, stderr = _main("train", "-o", out, "--seed", OLD_SEED, *FAST)
    assert code == 0, stderr
    return {name: (out / name).read_bytes() for name in RUN_FILES}


def _folder_with(tmp_path: Path, files: dict[str, bytes]) -> Path:
    out = tmp_path / "run"
    out.mkdir()
    for name, data in files.items():
        (out / name).write_bytes(data)
    return out


def _seeds(out: Path) -> tuple[int, int, str, str]:
    """The run each file comes from: checkpoint seed, metrics.json seed, and the test accuracy
    the ONNX metadata and the checkpoint's metrics record."""
    with safe_open(str(out / "model.safetensors"), framework="np") as f:
        meta = f.metadata()
    onnx_meta = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    metrics = json.loads((out / "metrics.json").read_text())
    return (
        json.loads(meta["config"])["seed"],
        metrics["config"]["seed"],
        onnx_meta["test_accuracy"],
        f"{json.loads(meta['metrics'])['test_accuracy']:.6f}",
    )


def _start_force_run(out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "triton_softmax.cli", "train", "-o", str(out), "--force"]
        + ["--seed", str(NEW_SEED), *FAST],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        # A shell without job control starts background jobs with SIGINT ignored; undo that.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_for(proc: subprocess.Popen, ready) -> bool:
    """Poll every millisecond until ``ready()`` or the process ends; whether ``ready()``."""
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if ready():
            return True
        time.sleep(0.001)
    return False


def _staged_onnx(out: Path) -> bool:
    return any((stage / "model.onnx").exists() for stage in out.glob(STAGE_PREFIX + "*"))


@pytest.mark.parametrize(
    ("signum", "status"),
    [
        pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow),
        pytest.param(signal.SIGTERM, 143, marks=pytest.mark.slow),
        (signal.SIGKILL, -9),
    ],
)
def test_a_run_stopped_while_writing_leaves_the_old_set(tmp_path, old_run, signum, status):
    out = _folder_with(tmp_path, old_run)
    proc = _start_force_run(out)
    caught = _wait_for(proc, lambda: _staged_onnx(out))
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert caught, f"no staged model.onnx seen; rc {proc.returncode}: {stderr}"
    assert proc.returncode == status, stderr
    assert {name: (out / name).read_bytes() for name in RUN_FILES} == old_run
    assert _seeds(out)[:2] == (OLD_SEED, OLD_SEED)
    left = sorted(p.name for p in out.iterdir() if p.name not in RUN_FILES)
    if signum == signal.SIGKILL:
        # Only the staging folder is left, and the next run into the folder removes it.
        assert len(left) == 1 and left[0].startswith(STAGE_PREFIX)
        code, _, stderr = _main("train", "-o", out, *FAST)
        assert code == 1 and "already holds a model" in stderr
        assert sorted(p.name for p in out.iterdir()) == sorted(RUN_FILES)
    else:
        assert left == []


def test_a_kill_when_the_new_model_appears_leaves_the_new_set(tmp_path, old_run):
    out = _folder_with(tmp_path, old_run)
    old_inode = os.stat(out / "model.onnx").st_ino
    proc = _start_force_run(out)
    caught = _wait_for(proc, lambda: os.stat(out / "model.onnx").st_ino != old_inode)
    proc.kill()
    _, stderr = proc.communicate(timeout=60)
    assert caught, f"model.onnx never replaced; rc {proc.returncode}: {stderr}"
    seed, metrics_seed, onnx_accuracy, checkpoint_accuracy = _seeds(out)
    assert (seed, metrics_seed) == (NEW_SEED, NEW_SEED)
    assert onnx_accuracy == checkpoint_accuracy
    # At most the emptied commit folder is left; the next run removes it.
    assert {p.name for p in out.iterdir()} - set(RUN_FILES) <= {COMMIT_NAME}
    code, _, stderr = _main("train", "-o", out, *FAST)
    assert code == 1 and "already holds a model" in stderr and "note" not in stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(RUN_FILES)


def test_the_next_run_finishes_a_commit_cut_short(tmp_path, old_run):
    # A SIGKILL after the commit point and the first move: the new checkpoint is in place, the
    # rest of the new set waits in the commit folder.
    new = tmp_path / "new"
    code, _, stderr = _main("train", "-o", new, "--seed", NEW_SEED, *FAST)
    assert code == 0, stderr
    out = _folder_with(tmp_path, old_run)
    commit = out / COMMIT_NAME
    commit.mkdir()
    os.replace(new / RUN_FILES[0], out / RUN_FILES[0])
    for name in RUN_FILES[1:]:
        os.replace(new / name, commit / name)
    code, _, stderr = _main("train", "-o", out, *FAST)  # refused, after settling the folder
    assert code == 1 and "finished moving in the model of a run that was killed" in stderr
    assert "already holds a model" in stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(RUN_FILES)
    seed, metrics_seed, onnx_accuracy, checkpoint_accuracy = _seeds(out)
    assert (seed, metrics_seed, onnx_accuracy) == (NEW_SEED, NEW_SEED, checkpoint_accuracy)
