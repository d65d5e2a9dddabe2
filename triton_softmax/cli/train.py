"""``triton-softmax train``: train on a CSV (or the embedded Iris data), export, verify, report."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING

from triton_softmax.export.signature import ONNX_FILE

from ._common import PROG, CommandError, add_opset_option, checked_opset, column_names, write_atomic

if TYPE_CHECKING:
    from triton_softmax.regression.train import TrainConfig

DEFAULT_OUT = Path("runs")
CHECKPOINT_NAME = "model.safetensors"
METRICS_NAME = "metrics.json"
#: The files of a run, in the order a commit moves them into the folder: model.onnx last, so a
#: new model.onnx in the folder means the whole set is new.
RUN_FILES = (CHECKPOINT_NAME, METRICS_NAME, ONNX_FILE)
#: Inside the output folder: where a run writes its files (one per run, removed when it fails),
#: and what that folder is renamed to once all are written and read back (the commit point).
STAGE_PREFIX = ".triton-softmax-train.new."
COMMIT_NAME = ".triton-softmax-train.commit"


def slow_imports(args: argparse.Namespace) -> tuple[str, ...]:
    """The slow imports of this command, done with Ctrl-C deferred (see ``main``)."""
    return ("triton_softmax.functional", "triton_softmax.export.onnx_export")


def add_parser(subparsers: argparse._SubParsersAction, training_options: bool = True) -> None:
    """Add ``train`` to the command line.

    Args:
        subparsers: the command line's sub-parsers.
        training_options: add the options generated from ``TrainConfig`` (whose module imports
            torch); without them the other commands parse where torch is not installed.
    """
    train = subparsers.add_parser(
        "train",
        help="train on a CSV (or the embedded Iris data), export to ONNX, verify, report",
        description=(
            "Train softmax regression, save a safetensors checkpoint, export model.onnx, check it "
            "and compare onnxruntime with torch on the held-out rows. With no arguments: the "
            "embedded Iris data into runs/iris."
        ),
    )
    train.add_argument(
        "--data", type=Path, metavar="CSV", help="CSV with a header (default: embedded Iris)"
    )
    train.add_argument(
        "--label-column",
        metavar="NAME",
        help="name of the label column (default: the last column not ignored)",
    )
    train.add_argument(
        "--ignore-columns",
        type=column_names,
        action="extend",
        default=[],
        metavar="A,B",
        help="columns that are neither features nor the label, e.g. id,note",
    )
    train.add_argument(
        "-o",
        "--out",
        type=Path,
        metavar="DIR",
        help=(
            "output folder; refused if it holds a model, unless --force (default: runs/iris or "
            "runs/<CSV name>, or the first of runs/<name>-2, -3, ... that holds none)"
        ),
    )
    train.add_argument(
        "--force",
        action="store_true",
        help=(
            "replace the model files in an existing --out; the three are written and checked "
            "beside it first, then moved in together, so an interrupted run leaves the old set"
        ),
    )
    if training_options:
        add_training_options(train)
    train.add_argument(
        "--device",
        metavar="DEVICE",
        help="torch device to train on (default: cuda when available, else cpu)",
    )
    add_opset_option(train)
    train.add_argument(
        "--no-reference", action="store_true", help="skip the plain-torch reference model"
    )
    train.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    train.set_defaults(run=run)


def add_training_options(parser: argparse.ArgumentParser) -> None:
    """One option per ``TrainConfig`` field, described by the field's metadata."""
    from triton_softmax.regression.train import TrainConfig

    group = parser.add_argument_group("training")
    for f in fields(TrainConfig):
        options = dict(f.metadata)
        help_text = options.pop("help")
        if "choices" not in options:
            options["type"] = type(f.default)
        group.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=f.default,
            help=f"{help_text} (%(default)s)",
            **options,
        )


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` of the options added by ``add_training_options``."""
    from triton_softmax.regression.train import TrainConfig

    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})


def run(args: argparse.Namespace) -> int:
    """Train, export, verify and report; the exit status."""
    import triton_softmax as ts
    from triton_softmax._atomic import sigterm_unwinds
    from triton_softmax.export.onnx_export import export_and_verify
    from triton_softmax.regression import (
        load_checkpoint,
        load_csv,
        load_iris,
        save_checkpoint,
        train,
    )
    from triton_softmax.regression.checkpoint import library_versions
    from triton_softmax.regression.train import KERNEL_PATHS, resolve_device

    start = time.perf_counter()
    config = train_config(args)
    config.validate()
    opset = checked_opset(args.opset)
    if args.data is None:
        for option, value in (
            ("--label-column", args.label_column),
            ("--ignore-columns", args.ignore_columns),
        ):
            if value:
                raise CommandError(f"{option} needs --data")
        data = load_iris()
        name = "iris"
    else:
        data = load_csv(args.data, args.label_column, args.ignore_columns)
        name = args.data.stem
    with sigterm_unwinds(), _run_folder(args.out, DEFAULT_OUT / name, args.force) as out:
        device = resolve_device(args.device)
        kernel = ts.kernel_path(device)
        print(f"kernel path: {kernel} - {KERNEL_PATHS.get(kernel, kernel)}")
        print(
            f"data: {data.source}: {data.n_samples} rows, {data.n_features} features, "
            f"{data.n_classes} classes ({', '.join(data.class_names)})"
        )
        trained = train(
            data, config, device=device, progress=not args.quiet, reference=not args.no_reference
        )
        m = trained.metrics
        stop = "early stop: loss plateau" if m["stopped_early"] else "epoch limit"
        print(
            f"trained {m['epochs_run']} epochs ({stop}) on {m['n_train']} rows in "
            f"{m['train_seconds']:.1f} s; held-out rows: {m['n_test']} "
            f"(stratified, seed {config.seed})"
        )
        print(f"accuracy: train {m['train_accuracy']:.4f}, test {m['test_accuracy']:.4f}")
        if trained.reference is not None:
            print(
                f"plain-torch reference, same split: train {m['reference_train_accuracy']:.4f}, "
                f"test {m['reference_test_accuracy']:.4f}"
            )
        with _staged(out) as stage:
            report = export_and_verify(
                trained.model,
                stage / ONNX_FILE,
                trained.test.features,
                feature_names=data.feature_names,
                class_names=data.class_names,
                metadata={
                    "triton_softmax_version": library_versions()["triton-softmax"],
                    "test_accuracy": f"{m['test_accuracy']:.6f}",
                },
                opset_version=opset,
            )
            m.update(
                onnx_max_abs_diff=report.max_abs_diff,
                onnx_labels_identical=report.labels_identical,
                onnx_parity_rows=report.n_rows,
                onnx_opset=opset,
                total_seconds=round(time.perf_counter() - start, 3),
            )
            print(
                f"ONNX: opset {opset}, onnx.checker full_check passed; onnxruntime vs torch on "
                f"the {report.n_rows} held-out rows: max abs diff {report.max_abs_diff:.2e}, "
                "labels identical"
            )
            save_checkpoint(
                stage / CHECKPOINT_NAME,
                trained.model,
                feature_names=data.feature_names,
                class_names=data.class_names,
                config=config,
                metrics=m,
            )
            write_atomic(
                stage / METRICS_NAME,
                lambda f: f.write(json.dumps({**m, "config": asdict(config)}, indent=2) + "\n"),
            )
            load_checkpoint(stage / CHECKPOINT_NAME)  # read back before it replaces anything
            json.loads((stage / METRICS_NAME).read_text(encoding="utf-8"))
            _commit(stage, out)
        print(f"checkpoint: {out / CHECKPOINT_NAME}; metrics: {out / METRICS_NAME}")
        print(f"model: {out / ONNX_FILE}")
        return 0


@contextlib.contextmanager
def _run_folder(out: Path | None, default: Path, force: bool) -> Iterator[Path]:
    """The folder ``train`` writes into: checked, created and locked before training starts.

    An explicit ``--out`` that already holds a model is refused unless ``force``; without
    ``--out``, the first of ``default``, ``default-2``, ``default-3``, ... that holds no model and
    that no other ``train`` is writing into is used, so running the same command twice never
    overwrites the first run. The folder stays locked (``flock`` on the folder itself) until the
    block ends, so a second ``train`` into it fails at once with one line instead of both
    reporting success with one model left; the holds-a-model check runs under the lock, so a run
    that finished a moment before counts. A folder created here is removed again if the block
    fails before anything is written into it.
    """
    from triton_softmax._atomic import check_writable

    folder, n = (default, 1) if out is None else (out, 0)
    while True:
        check_writable(folder, folder=True)
        created = not folder.is_dir()
        folder.mkdir(parents=True, exist_ok=True)
        lock = _lock_folder(folder)
        if lock is None and out is not None:
            raise CommandError(
                f"{folder}: another `{PROG} train` is writing there; wait for it to finish or "
                "choose another --out"
            )
        if lock is not None:
            _recover(folder)
            models = [
                m for m in (ONNX_FILE, CHECKPOINT_NAME, METRICS_NAME) if (folder / m).exists()
            ]
            if not models or (out is not None and force):
                break
            os.close(lock)
            if out is not None:
                raise CommandError(
                    f"{out} already holds a model ({', '.join(models)}); "
                    "choose another --out or pass --force to overwrite it"
                )
        n += 1
        folder = default.with_name(f"{default.name}-{n}")
    try:
        yield folder
    except BaseException:
        if created:
            with contextlib.suppress(OSError):  # only when empty; the lock keeps others out
                folder.rmdir()
        raise
    finally:
        os.close(lock)


def _lock_folder(folder: Path) -> int | None:
    """Take an exclusive ``flock`` on ``folder`` without waiting.

    Returns:
        The descriptor that holds the lock (closing it releases the lock), or ``None`` when
        another process holds it. Where the file system cannot lock, a note on stderr says so
        and the unlocked descriptor is returned.

    Raises:
        CommandError: the folder was removed or replaced while being locked (by a run that had
            created it and failed).
    """
    import fcntl

    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError as e:
        print(
            f"{PROG} train: note: cannot lock {folder} ({e.strerror}); another train writing "
            "there at the same time would go unnoticed",
            file=sys.stderr,
        )
        return fd
    held, now = os.fstat(fd), os.stat(folder)
    if (held.st_dev, held.st_ino) != (now.st_dev, now.st_ino):
        os.close(fd)
        raise CommandError(f"{folder}: removed or replaced while being locked; run again")
    return fd


@contextlib.contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """A new empty folder inside ``out`` to write a run's files into; removed if the block fails.

    The files reach ``out`` only through ``_commit``, so until then ``out`` keeps its previous
    model, metrics and checkpoint untouched, whatever happens to the process.
    """
    stage = Path(tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=out))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # already gone once committed


def _commit(stage: Path, out: Path) -> None:
    """Replace the run files in ``out`` with the complete, checked set in ``stage``.

    The files and ``stage`` are flushed to disk, then ``stage`` is renamed to ``COMMIT_NAME``:
    one atomic rename that is the commit point. Before it, ``out`` holds the old set; after it,
    the new set is decided and its files are moved over the old ones (``RUN_FILES`` order, each
    keeping the mode of the file it replaces). Ctrl-C and SIGTERM are held back from the rename
    to the end, so they act after the commit. Only a SIGKILL (or a crash) within the few renames
    that follow the commit point can stop it halfway: the rest of the new set then waits in
    ``COMMIT_NAME``, and the next ``train`` into ``out`` moves it in before anything else.
    """
    for name in RUN_FILES:
        with contextlib.suppress(OSError):
            (stage / name).chmod(stat.S_IMODE(os.stat(out / name).st_mode))
        _fsync(stage / name)
    _fsync(stage)
    with _signals_deferred(signal.SIGINT, signal.SIGTERM):
        os.rename(stage, out / COMMIT_NAME)
        _fsync(out)
        _move_committed(out)


@contextlib.contextmanager
def _signals_deferred(*signums: int) -> Iterator[None]:
    """Hold the given signals back until the block ends, then raise them again.

    Python runs signal handlers in the main thread whichever thread the kernel picked (a signal
    mask would not do: torch's and onnxruntime's threads would take the signal instead), so a
    handler that only takes note defers them; the previous handlers are restored and act on the
    signals noted, in order. Outside the main thread nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {n: signal.signal(n, lambda signum, frame: caught.append(signum)) for n in signums}
    try:
        yield
    finally:
        for n, handler in previous.items():
            signal.signal(n, handler)
        for n in caught:
            signal.raise_signal(n)


def _move_committed(out: Path) -> int:
    """Move the files of ``out``'s commit folder over the run files, then remove that folder.

    Returns:
        How many files were moved.
    """
    commit = out / COMMIT_NAME
    moved = 0
    for name in RUN_FILES:
        if (commit / name).exists():
            os.replace(commit / name, out / name)
            moved += 1
    _fsync(out)
    shutil.rmtree(commit)
    return moved


def _recover(out: Path) -> None:
    """Settle what a run killed while writing into ``out`` left there (called under the lock).

    A commit folder holds a complete set that was committed: its files are moved in, finishing
    that run's commit (a SIGKILL after the last move leaves it empty). A staging folder holds an
    uncommitted set: it is removed.
    """
    if (out / COMMIT_NAME).is_dir() and _move_committed(out):
        print(
            f"{PROG} train: note: {out}: finished moving in the model of a run that was killed "
            "after writing it",
            file=sys.stderr,
        )
    for stage in out.glob(STAGE_PREFIX + "*"):
        shutil.rmtree(stage, ignore_errors=True)


def _fsync(path: Path) -> None:
    """Flush a file or a folder's entries to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
