"""``triton-softmax serve``: models over the Open Inference Protocol (no torch, no triton)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from triton_softmax.export.signature import (
    DEFAULT_HOST,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_PORT,
    DEFAULT_READ_TIMEOUT,
)

from ._common import CommandError


def slow_imports(args: argparse.Namespace) -> tuple[str, ...]:
    """The slow imports of this command, done with Ctrl-C deferred (see ``main``)."""
    return ("triton_softmax.export.serve",)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``serve`` to the command line."""
    serve = subparsers.add_parser(
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
        "--host", default=DEFAULT_HOST, help="address to listen on (%(default)s; 0.0.0.0: all)"
    )
    serve.add_argument("--port", type=_port, default=DEFAULT_PORT, help="HTTP port (%(default)s)")
    serve.add_argument(
        "--grpc-port", type=_port, metavar="PORT", help="serve gRPC on this port too (default: off)"
    )
    serve.add_argument(
        "--max-body-bytes",
        type=_positive_int,
        default=DEFAULT_MAX_BODY_BYTES,
        metavar="N",
        help="larger request bodies get 413, larger gRPC messages are refused (%(default)s)",
    )
    serve.add_argument(
        "--max-batch-size",
        type=_positive_int,
        metavar="N",
        help="most rows per request for a .onnx file, 400 above "
        f"(default {DEFAULT_MAX_BATCH_SIZE}; a repository's models take config.pbtxt's)",
    )
    serve.add_argument(
        "--read-timeout",
        type=_positive_float,
        default=DEFAULT_READ_TIMEOUT,
        metavar="S",
        help="seconds a request may take to arrive, 408 after (%(default)s)",
    )
    serve.add_argument(
        "--model-control",
        action="store_true",
        help="allow POST /v2/repository/models/NAME/load and unload (off: 403)",
    )
    serve.add_argument("--access-log", action="store_true", help="log one line per request")
    serve.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or Ctrl-C; the exit status."""
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
