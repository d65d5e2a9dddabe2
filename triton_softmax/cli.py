"""The ``triton-softmax`` command: train, export, predict, info, serve.

``triton-softmax train`` with no arguments trains softmax regression on the embedded Iris data,
exports it to ONNX, verifies the export against torch and prints the accuracy and the model's path.
Bad input ends with one line on stderr and a non-zero exit status, never a traceback.
``predict``, ``info`` on a ``.onnx`` file and ``serve`` import neither torch nor triton.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import json
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from triton_softmax.regression.train import TrainConfig

PROG = "triton-softmax"
DEFAULT_OUT = Path("runs")
ONNX_NAME = "model.onnx"
CHECKPOINT_NAME = "model.safetensors"
METRICS_NAME = "metrics.json"
SYNTHETIC_PARITY_ROWS = 256
#: The extra that has each missing top-level package, for the one-line error naming it.
EXTRAS = {
    **dict.fromkeys(("onnx", "onnxscript", "onnxruntime"), "onnx"),
    **dict.fromkeys(("kserve", "fastapi", "starlette", "uvicorn", "pydantic"), "serve"),
}
#: The package's own dependencies that a serving-only install (``pip install --no-deps``) lacks.
CORE_PACKAGES = ("torch", "triton", "safetensors", "tqdm")
#: The slow imports of each command, done before it starts with Ctrl-C deferred (see ``main``).
SLOW_IMPORTS = {
    "train": ("triton_softmax.functional", "triton_softmax.export.onnx_export"),
    "export": ("triton_softmax.export.onnx_export",),
    "predict": ("triton_softmax.export.runtime",),
    "info": ("onnx", "triton_softmax.export.runtime"),
    "serve": ("triton_softmax.export.serve",),
}


#: How ``predict -o`` and ``export -o`` treat what is already at the output path.
OUTPUT_FILES = (
    "The output file is written to a temporary file, then renamed over it: a failure never leaves "
    "a partial file. An existing file keeps its permissions (a 0600 file stays 0600); a read-only "
    "one is refused unless --force; a symbolic link is kept and the file it points to replaced. A "
    "FIFO or a character device (/dev/stdout, /dev/null) is written through, never replaced; "
    "block devices and sockets are refused."
)
FORCE_HELP = "replace a read-only output file (it stays read-only)"


class CommandError(Exception):
    """A failure to report as one line; raised by the commands, printed by ``main``."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: arguments without the program name; ``sys.argv[1:]`` when ``None``.

    Returns:
        The exit status: 0 on success, 1 on bad input or a failed check, 2 on a usage error,
        130 when interrupted (at any point, the slow imports included), 141 when stdout is
        closed early.
    """
    prefix = PROG  # "triton-softmax train" once the command is known
    try:
        with _interrupts_deferred():
            argv = sys.argv[1:] if argv is None else list(argv)
            command = _command(argv)
            if command in SLOW_IMPORTS:  # train's parser imports torch
                prefix = f"{PROG} {command}"
            args = _parser(training_options=command == "train").parse_args(argv)
            prefix = f"{PROG} {args.command}"
            slow = SLOW_IMPORTS[args.command]
            if args.command == "info" and args.path.suffix == ".safetensors":
                slow = ("triton_softmax.regression.checkpoint",)
            for module in slow:
                importlib.import_module(module)
        with warnings.catch_warnings():
            # Triton's interpreter also evaluates masked-off lanes, whose -inf arithmetic makes
            # numpy warn; the results are unaffected, so keep the command's output readable.
            warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime")
            return args.run(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`... | head`): stop quietly, as other command-line tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except ModuleNotFoundError as e:
        top = (e.name or "").partition(".")[0]
        if top in CORE_PACKAGES:  # a serving-only install: serve, predict and info work there
            print(
                f"{prefix}: error: {top} is not installed; this command needs the package's own "
                "dependencies (README: Quick start)",
                file=sys.stderr,
            )
            return 1
        extra = EXTRAS.get(top)
        if extra is None:
            raise
        print(
            f"{prefix}: error: {e.name} is not installed; the {extra} extra has it: "
            f'pip install "triton-softmax[{extra}]"',
            file=sys.stderr,
        )
        return 1
    except Exception as e:
        if not _expected(e):
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"{prefix}: error: {message}", file=sys.stderr)
        return 1


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Act on Ctrl-C only when the block ends, by raising ``KeyboardInterrupt`` there.

    Extension modules being imported (torch, onnxruntime) do not pass a ``KeyboardInterrupt`` on:
    onnxruntime turns it into ``ImportError: initialization failed``, and one that passes through
    ``PyRun_String`` makes the interpreter end with SIGINT whatever ``main`` returns. So the
    imports run with a handler that only takes note. Outside the main thread, or when SIGINT is
    ignored (``nohup``), nothing changes.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    caught: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt


def _expected(error: Exception) -> bool:
    """Errors that describe bad input or a failed check, as opposed to a bug.

    ``ExportError`` and ``TrainingError`` can only come from modules already imported, so they are
    looked up in ``sys.modules`` rather than imported here (``predict`` never needs the exporter).
    """
    kinds: list[type[BaseException]] = [CommandError, ValueError, OSError]
    for module, name in (
        ("triton_softmax.export.onnx_export", "ExportError"),
        ("triton_softmax.regression.train", "TrainingError"),
    ):
        if module in sys.modules:
            kinds.append(getattr(sys.modules[module], name))
    return isinstance(error, tuple(kinds))


def _command(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (the first argument that is not an option), if any."""
    return next((a for a in argv if not a.startswith("-")), None)


def _parser(training_options: bool = True) -> argparse.ArgumentParser:
    """The command line's parser.

    Args:
        training_options: add ``train``'s options, generated from ``TrainConfig``, whose module
            imports torch; the other commands are parsed without them, so that ``predict``,
            ``info`` and ``serve`` run where torch is not installed.
    """
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Softmax regression trained with the triton-softmax kernels, served with ONNX.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser(
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
        type=_names,
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
        "--force", action="store_true", help="overwrite the model files in an existing --out"
    )
    if training_options:
        _add_training_options(train)
    train.add_argument(
        "--device",
        metavar="DEVICE",
        help="torch device to train on (default: cuda when available, else cpu)",
    )
    train.add_argument(
        "--opset", type=int, default=None, metavar="N", help="ONNX opset, >= 18 (default 18)"
    )
    train.add_argument(
        "--no-reference", action="store_true", help="skip the plain-torch reference model"
    )
    train.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    train.set_defaults(run=_train)

    export = sub.add_parser(
        "export",
        help="export a checkpoint to ONNX, or to a Triton Inference Server model repository",
        description=(
            "Export a model.safetensors checkpoint to ONNX, check it and compare onnxruntime with "
            "torch: on the rows of --data, or on synthetic rows drawn from the training mean and "
            "standard deviation. With --triton-repo, into a model repository that Triton "
            "Inference Server (and `triton-softmax serve`) loads: DIR/NAME/config.pbtxt and "
            "DIR/NAME/1/model.onnx. An existing .onnx keeps its permissions; a read-only one is "
            "refused unless --force; a symbolic link is kept and the file it points to replaced."
        ),
    )
    export.add_argument("checkpoint", type=Path, help="a checkpoint written by `train`")
    export.add_argument(
        "-o",
        "--output",
        metavar="ONNX",
        help=(
            "the .onnx file (default: next to the checkpoint); it must be a regular file (or a "
            "link to one), since the parity check reads it back"
        ),
    )
    export.add_argument("--force", action="store_true", help=FORCE_HELP)
    triton = export.add_argument_group("Triton Inference Server model repository")
    triton.add_argument(
        "--triton-repo",
        type=Path,
        metavar="DIR",
        help="write DIR/NAME/config.pbtxt and DIR/NAME/1/model.onnx (instead of -o)",
    )
    triton.add_argument(
        "--name",
        metavar="NAME",
        help="the model's name in the repository and the URLs (default: the checkpoint's folder)",
    )
    triton.add_argument(
        "--max-batch-size",
        type=int,
        metavar="N",
        help="most rows in one request or dynamic batch (default 1024)",
    )
    triton.add_argument(
        "--gpu", action="store_true", help="run on the GPUs (KIND_GPU; default: one CPU instance)"
    )
    export.add_argument(
        "--data", type=Path, metavar="CSV", help="CSV whose feature columns the parity check uses"
    )
    export.add_argument(
        "--opset", type=int, default=None, metavar="N", help="ONNX opset, >= 18 (default 18)"
    )
    export.set_defaults(run=_export)

    predict = sub.add_parser(
        "predict",
        help="predict the classes of a CSV's rows with onnxruntime",
        description=(
            "Read the model's feature columns (by name; other columns are ignored) from a CSV and "
            "write label, class and one probability column per class. " + OUTPUT_FILES
        ),
    )
    predict.add_argument("model", type=Path, help="a model.onnx written by `train` or `export`")
    predict.add_argument("csv", type=Path, help="input CSV with a header")
    predict.add_argument("-o", "--output", metavar="CSV", help="output CSV (default: stdout)")
    predict.add_argument("--force", action="store_true", help=FORCE_HELP)
    predict.add_argument(
        "--keep-columns",
        type=_names,
        action="extend",
        default=[],
        metavar="A,B",
        help="input columns to copy into the output, before the predictions, e.g. id",
    )
    predict.add_argument(
        "--provider",
        action="append",
        metavar="NAME",
        help="onnxruntime execution provider, repeatable (default: CUDA when available, then CPU)",
    )
    predict.set_defaults(run=_predict)

    info = sub.add_parser(
        "info",
        help="describe a model.onnx or a checkpoint",
        description="Print the signature, names, metadata and metrics of a model or checkpoint.",
    )
    info.add_argument("path", type=Path, help="a .onnx model or a .safetensors checkpoint")
    info.set_defaults(run=_info)

    serve = sub.add_parser(
        "serve",
        help="serve models over the Open Inference Protocol (KServe v2 REST, gRPC)",
        description=(
            "Serve a Triton model repository (every DIR/NAME/<version>/model.onnx, the highest "
            "version, with config.pbtxt's max_batch_size) or one .onnx file (as version 1) over "
            "REST, and gRPC with --grpc-port, with KServe's model server: the protocol that "
            "Triton Inference Server, KServe and MLServer speak, so the same clients (curl, "
            "tritonclient) work with each. Prometheus metrics on /metrics. Model control "
            "(repository load/unload) is off unless --model-control. SIGTERM or Ctrl-C finish "
            "the requests in flight, then exit 0. Imports neither torch nor triton."
        ),
    )
    serve.add_argument("path", type=Path, help="a model repository folder or a .onnx file")
    serve.add_argument(
        "--name", metavar="NAME", help="the model's name for a .onnx file (default: its stem)"
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (%(default)s; 0.0.0.0: all)"
    )
    serve.add_argument("--port", type=_port, default=8000, help="HTTP port (%(default)s)")
    serve.add_argument(
        "--grpc-port", type=_port, metavar="PORT", help="serve gRPC on this port too (default: off)"
    )
    serve.add_argument(
        "--max-body-bytes",
        type=_positive_int,
        default=16 * 2**20,
        metavar="N",
        help="larger request bodies get 413, larger gRPC messages are refused (%(default)s)",
    )
    serve.add_argument(
        "--max-batch-size",
        type=_positive_int,
        metavar="N",
        help="most rows per request for a .onnx file, 400 above (default 1024; a repository's "
        "models take config.pbtxt's)",
    )
    serve.add_argument(
        "--read-timeout",
        type=_positive_float,
        default=30.0,
        metavar="S",
        help="seconds a request may take to arrive, 408 after (%(default)s)",
    )
    serve.add_argument(
        "--model-control",
        action="store_true",
        help="allow POST /v2/repository/models/NAME/load and unload (off: 403)",
    )
    serve.add_argument("--access-log", action="store_true", help="log one line per request")
    serve.set_defaults(run=_serve)
    return parser


def _add_training_options(parser: argparse.ArgumentParser) -> None:
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


def _train_config(args: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` of the options added by ``_add_training_options``."""
    from triton_softmax.regression.train import TrainConfig

    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})


def _names(text: str) -> list[str]:
    """A comma-separated list of column names (``--ignore-columns id,note``)."""
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"empty column name in {text!r}")
    return names


def _train(args: argparse.Namespace) -> int:
    import triton_softmax as ts
    from triton_softmax.export.onnx_export import export_and_verify
    from triton_softmax.regression import load_csv, load_iris, save_checkpoint, train
    from triton_softmax.regression.checkpoint import library_versions
    from triton_softmax.regression.train import KERNEL_PATHS, resolve_device

    start = time.perf_counter()
    config = _train_config(args)
    config.validate()
    opset = _opset(args.opset)
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
    with _run_folder(args.out, DEFAULT_OUT / name, args.force) as out:
        device = resolve_device(args.device)
        kernel = ts.kernel_path(device)
        print(f"kernel path: {kernel} - {KERNEL_PATHS.get(kernel, kernel)}")
        print(
            f"data: {data.source}: {data.n_samples} rows, {data.n_features} features, "
            f"{data.n_classes} classes ({', '.join(data.class_names)})"
        )
        run = train(
            data, config, device=device, progress=not args.quiet, reference=not args.no_reference
        )
        m = run.metrics
        stop = "early stop: loss plateau" if m["stopped_early"] else "epoch limit"
        print(
            f"trained {m['epochs_run']} epochs ({stop}) on {m['n_train']} rows in "
            f"{m['train_seconds']:.1f} s; held-out rows: {m['n_test']} "
            f"(stratified, seed {config.seed})"
        )
        print(f"accuracy: train {m['train_accuracy']:.4f}, test {m['test_accuracy']:.4f}")
        if run.reference is not None:
            print(
                f"plain-torch reference, same split: train {m['reference_train_accuracy']:.4f}, "
                f"test {m['reference_test_accuracy']:.4f}"
            )
        onnx_path = out / ONNX_NAME
        report = export_and_verify(
            run.model,
            onnx_path,
            run.test.features,
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
            f"ONNX: opset {opset}, onnx.checker full_check passed; onnxruntime vs torch on the "
            f"{report.n_rows} held-out rows: max abs diff {report.max_abs_diff:.2e}, "
            "labels identical"
        )
        save_checkpoint(
            out / CHECKPOINT_NAME,
            run.model,
            feature_names=data.feature_names,
            class_names=data.class_names,
            config=config,
            metrics=m,
        )
        _write_atomic(
            out / METRICS_NAME,
            lambda f: f.write(json.dumps({**m, "config": asdict(config)}, indent=2) + "\n"),
        )
        print(f"checkpoint: {out / CHECKPOINT_NAME}; metrics: {out / METRICS_NAME}")
        print(f"model: {onnx_path}")
        return 0


def _export(args: argparse.Namespace) -> int:
    import numpy as np

    from triton_softmax.export.onnx_export import export_and_verify
    from triton_softmax.regression import load_checkpoint, read_features

    opset = _opset(args.opset)
    repo_options = [
        option
        for option, given in (
            ("--name", args.name is not None),
            ("--max-batch-size", args.max_batch_size is not None),
            ("--gpu", args.gpu),
        )
        if given
    ]
    if args.triton_repo is None and repo_options:
        raise CommandError(f"{', '.join(repo_options)} needs --triton-repo")
    if args.triton_repo is not None and args.output is not None:
        raise CommandError("give either -o/--output or --triton-repo, not both")
    if args.max_batch_size is not None and args.max_batch_size < 1:
        raise CommandError(f"--max-batch-size must be at least 1, got {args.max_batch_size}")
    if args.checkpoint.suffix != ".safetensors":
        hint = (
            f"; for a model trained with `train`, that is "
            f"{args.checkpoint.with_suffix('.safetensors')}"
            if args.checkpoint.suffix == ".onnx"
            else ""
        )
        raise CommandError(
            f"{args.checkpoint}: export wants the .safetensors checkpoint written by train{hint}"
        )
    if args.triton_repo is not None:
        from triton_softmax.export import triton_repo

        name = args.name or args.checkpoint.resolve().parent.name
        try:
            out = triton_repo.model_path(args.triton_repo, name)
        except ValueError as e:
            raise CommandError(f"--name: {e}") from None
    else:
        out = args.output or args.checkpoint.with_suffix(".onnx")
    target = _onnx_target(out, args.force)
    ckpt = load_checkpoint(args.checkpoint)
    if args.data is not None:
        rows = read_features(args.data, ckpt.feature_names)
        if rows.shape[0] == 0:
            raise CommandError(f"{args.data}: no data rows for the parity check")
        source = f"{rows.shape[0]} rows of {args.data}"
    else:
        rng = np.random.default_rng(0)
        mean = ckpt.model.feature_mean.numpy()
        std = ckpt.model.feature_std.numpy()
        rows = (mean + std * rng.standard_normal((SYNTHETIC_PARITY_ROWS, mean.size))).astype(
            np.float32
        )
        source = f"{SYNTHETIC_PARITY_ROWS} synthetic rows (training mean and std)"
    report = export_and_verify(
        ckpt.model,
        target,
        rows,
        feature_names=ckpt.feature_names,
        class_names=ckpt.class_names,
        metadata={"triton_softmax_version": ckpt.versions.get("triton-softmax", "unknown")},
        opset_version=opset,
    )
    print(
        f"ONNX: opset {opset}, onnx.checker full_check passed; onnxruntime vs torch on {source}: "
        f"max abs diff {report.max_abs_diff:.2e}, labels identical"
    )
    print(f"model: {out}")
    if args.triton_repo is not None:
        config = triton_repo.write_config(
            args.triton_repo,
            name,
            max_batch_size=args.max_batch_size or triton_repo.DEFAULT_MAX_BATCH_SIZE,
            gpu=args.gpu,
        )
        print(f"Triton model repository: {args.triton_repo} (model {name!r}: {config})")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from triton_softmax.export import serve
    from triton_softmax.export.triton_repo import find_models

    if args.grpc_port is not None and args.grpc_port == args.port:
        raise CommandError(f"--grpc-port {args.grpc_port} is the HTTP port too; give another")
    models = serve.load_models(find_models(args.path, args.name, args.max_batch_size))
    print(serve.describe(models), file=sys.stderr)
    serve.serve(
        models,
        host=args.host,
        port=args.port,
        max_body_bytes=args.max_body_bytes,
        access_log=args.access_log,
        grpc_port=args.grpc_port,
        read_timeout=args.read_timeout,
        model_control=args.model_control,
    )
    return 0


def _port(text: str) -> int:
    """A TCP port number for argparse: 1 to 65535."""
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is 1 to 65535, got {value}")
    return value


def _positive_int(text: str) -> int:
    """An integer of at least 1 for argparse."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    """A finite number above 0 for argparse."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be above 0 and finite, got {text}")
    return value


def _opset(value: int | None) -> int:
    """The ``--opset`` value, checked before any work is done."""
    from triton_softmax.export.onnx_export import DEFAULT_OPSET, MIN_OPSET

    if value is None:
        return DEFAULT_OPSET
    if value < MIN_OPSET:
        raise CommandError(f"--opset must be at least {MIN_OPSET}, got {value}")
    return value


def _predict(args: argparse.Namespace) -> int:
    from triton_softmax._atomic import check_writable
    from triton_softmax.export.runtime import OnnxClassifier
    from triton_softmax.regression.data import read_columns

    if args.output is not None:
        check_writable(args.output, force=args.force)
    clf = OnnxClassifier(args.model, providers=args.provider)
    header = ["label", "class", *(f"probability_{c}" for c in clf.classes_)]
    clash = [c for c in args.keep_columns if c in header]
    if clash:
        raise CommandError(
            f"--keep-columns {', '.join(clash)}: the output has a column of that name already"
        )
    features, kept = read_columns(args.csv, clf.feature_names, args.keep_columns)
    label, proba = clf.run(features)

    def write(f: TextIO) -> None:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow([*args.keep_columns, *header])
        for i in range(label.shape[0]):
            writer.writerow(
                [
                    *kept[i],
                    int(label[i]),
                    clf.classes_[label[i]],
                    *(f"{p:.8g}" for p in proba[i]),
                ]
            )

    if args.output is None:
        write(sys.stdout)
    else:
        _write_atomic(args.output, write)
        print(f"{label.shape[0]} predictions written to {args.output}", file=sys.stderr)
    return 0


def _info(args: argparse.Namespace) -> int:
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
        f"input: features float32 [N, {clf.n_features}]",
        f"outputs: label int64 [N]; probabilities float32 [N, {clf.n_classes}]",
        f"features: {', '.join(clf.feature_names)}",
        f"classes: {', '.join(clf.classes_)}",
        f"graph: {nodes}",
    ]
    lines += [
        f"metadata {k}: {v}"
        for k, v in sorted(clf.metadata.items())
        if k not in ("feature_names", "class_names")
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
            models = [
                m for m in (ONNX_NAME, CHECKPOINT_NAME, METRICS_NAME) if (folder / m).exists()
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


def _onnx_target(out: str | Path, force: bool) -> Path:
    """The file ``export`` writes for ``-o out``: ``out``, or the file its symbolic links reach.

    Exporting to the link's target (not the link) means the exporter's removal of a model that
    fails its parity check removes that file, never the link.

    Raises:
        WriteError: as ``check_writable``; also for a FIFO or device, which the parity check
            could not read back.
    """
    from triton_softmax._atomic import WriteError, check_writable, destination

    dest = destination(out)
    if dest.kind == "stream":
        raise WriteError(
            f"{out}: is not a regular file; export reads the model back for its parity check, "
            "so give a file"
        )
    check_writable(out, force=force)
    return dest.target


def _write_atomic(path: str | Path, write: Callable[[TextIO], object]) -> None:
    """Write text through a temporary file, then rename it over ``path`` (see ``_atomic``)."""
    from triton_softmax._atomic import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        write(f)


if __name__ == "__main__":
    sys.exit(main())
