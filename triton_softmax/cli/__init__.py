"""The ``triton-softmax`` command: train, export, predict, info, serve.

``triton-softmax train`` with no arguments trains softmax regression on the embedded Iris data,
exports it to ONNX, verifies the export against torch and prints the accuracy and the model's path.
Bad input ends with one line on stderr and a non-zero exit status, never a traceback.
``predict``, ``info`` on a ``.onnx`` file and ``serve`` import neither torch nor triton.

Each command is a module of this package with its parser (``add_parser``), its handler (``run``)
and the modules it imports before it starts (``slow_imports``); ``main`` holds what they share:
the parser, Ctrl-C and the one-line errors.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence

from . import export, info, predict, serve, train
from ._common import PROG, CommandError

#: The commands, in the order ``--help`` lists them.
COMMANDS = {"train": train, "export": export, "predict": predict, "info": info, "serve": serve}
#: The extra that has each missing top-level package, for the one-line error naming it.
EXTRAS = {
    **dict.fromkeys(("onnx", "onnxscript", "onnxruntime"), "onnx"),
    **dict.fromkeys(("kserve", "fastapi", "starlette", "uvicorn", "pydantic"), "serve"),
}
#: The package's own dependencies that a serving-only install (``pip install --no-deps``) lacks.
CORE_PACKAGES = ("torch", "triton", "safetensors", "tqdm")


def _install_command(extra: str) -> str:
    """The pip command that installs an extra's packages, read from the installed package's
    metadata (triton-softmax is not on PyPI, so ``pip install "triton-softmax[extra]"`` would not
    resolve, and from a clone it would also reinstall torch)."""
    from importlib import metadata

    try:
        requirements = metadata.requires("triton-softmax") or []
    except metadata.PackageNotFoundError:
        requirements = []
    marker = f'extra == "{extra}"'
    packages = [r.split(";")[0].strip() for r in requirements if r.endswith(marker)]
    if not packages:
        return f'pip install -e ".[{extra}]" (from a clone)'
    return "pip install " + " ".join(f'"{p}"' for p in packages)


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
            if command in COMMANDS:  # train's parser imports torch
                prefix = f"{PROG} {command}"
            args = _parser(training_options=command == "train").parse_args(argv)
            prefix = f"{PROG} {args.command}"
            for module in COMMANDS[args.command].slow_imports(args):
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
            f"{prefix}: error: {e.name} is not installed; the [{extra}] extra has it: "
            f"{_install_command(extra)}",
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
    parser.add_argument("--version", action=_Version, help="print the installed version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train.add_parser(sub, training_options)
    for command in (export, predict, info, serve):
        command.add_parser(sub)
    return parser


class _Version(argparse.Action):
    """``--version``: print ``triton-softmax <version>`` (the installed distribution's) and exit 0.

    The version is read only when the option is given, so other commands pay nothing for it.
    """

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from importlib import metadata

        try:
            version = metadata.version(PROG)
        except metadata.PackageNotFoundError:
            version = "unknown (not installed: pip install -e .)"
        print(f"{PROG} {version}")
        parser.exit()
