"""``triton-softmax predict``: the classes of a CSV's rows, with onnxruntime (no torch)."""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import TextIO

from ._common import FORCE_HELP, CommandError, column_names, write_atomic

#: How ``predict -o`` and ``export -o`` treat what is already at the output path.
OUTPUT_FILES = (
    "The output file is written to a temporary file, then renamed over it: a failure never leaves "
    "a partial file. An existing file keeps its permissions (a 0600 file stays 0600); a read-only "
    "one is refused unless --force; a symbolic link is kept and the file it points to replaced. A "
    "FIFO or a character device (/dev/stdout, /dev/null) is written through, never replaced; "
    "block devices and sockets are refused."
)


def slow_imports(args: argparse.Namespace) -> tuple[str, ...]:
    """The slow imports of this command, done with Ctrl-C deferred (see ``main``)."""
    return ("triton_softmax.export.runtime",)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``predict`` to the command line."""
    predict = subparsers.add_parser(
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
        type=column_names,
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
    predict.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Write the predictions of a CSV's rows; the exit status."""
    from triton_softmax._atomic import check_writable
    from triton_softmax.export.runtime import OnnxClassifier
    from triton_softmax.regression.data import read_columns

    if args.output is not None:
        check_writable(args.output, force=args.force, inputs=[args.csv, args.model])
    clf = OnnxClassifier(args.model, providers=args.provider)
    repeated = sorted({str(c) for c in clf.classes_ if (clf.classes_ == c).sum() > 1})
    if repeated:
        raise CommandError(
            f"{args.model}: the model names class {', '.join(map(repr, repeated))} more than "
            "once; its probability columns could not be told apart"
        )
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
        write_atomic(args.output, write)
        print(f"{label.shape[0]} predictions written to {args.output}", file=sys.stderr)
    return 0
