"""``triton-softmax export``: a checkpoint to ONNX, or to a Triton model repository."""

from __future__ import annotations

import argparse
from pathlib import Path

from triton_softmax.export.signature import DEFAULT_MAX_BATCH_SIZE

from ._common import FORCE_HELP, CommandError, add_opset_option, checked_opset

SYNTHETIC_PARITY_ROWS = 256


def slow_imports(args: argparse.Namespace) -> tuple[str, ...]:
    """The slow imports of this command, done with Ctrl-C deferred (see ``main``)."""
    return ("triton_softmax.export.onnx_export",)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``export`` to the command line."""
    export = subparsers.add_parser(
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
        help=f"most rows in one request or dynamic batch (default {DEFAULT_MAX_BATCH_SIZE})",
    )
    triton.add_argument(
        "--gpu", action="store_true", help="run on the GPUs (KIND_GPU; default: one CPU instance)"
    )
    export.add_argument(
        "--data", type=Path, metavar="CSV", help="CSV whose feature columns the parity check uses"
    )
    add_opset_option(export)
    export.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Export and verify a checkpoint; the exit status."""
    import numpy as np

    from triton_softmax.export.onnx_export import export_and_verify
    from triton_softmax.regression import load_checkpoint, read_features

    opset = checked_opset(args.opset)
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
    target = _onnx_target(out, args.force, inputs=[args.checkpoint, args.data])
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
        source=args.checkpoint,
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
            max_batch_size=args.max_batch_size or DEFAULT_MAX_BATCH_SIZE,
            gpu=args.gpu,
        )
        print(f"Triton model repository: {args.triton_repo} (model {name!r}: {config})")
    return 0


def _onnx_target(out: str | Path, force: bool, inputs: list) -> Path:
    """The file ``export`` writes for ``-o out``: ``out``, or the file its symbolic links reach
    (the link is kept). The exporter checks the model in a temporary file and only then renames
    it over this one, so a model that fails its checks leaves the old file as it was.

    Raises:
        WriteError: as ``check_writable`` (an output that is one of ``inputs`` included); also
            for a FIFO or device, which the parity check could not read back.
    """
    from triton_softmax._atomic import WriteError, check_writable, destination

    dest = destination(out)
    if dest.kind == "stream":
        raise WriteError(
            f"{out}: is not a regular file; export reads the model back for its parity check, "
            "so give a file"
        )
    check_writable(out, force=force, inputs=inputs)
    return dest.target
