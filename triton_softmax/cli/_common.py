"""What the commands of ``triton-softmax`` share: the program's name, the one-line error, the
argument types and ``--opset``, the atomic text writer. Imports neither torch nor triton.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from triton_softmax.export.signature import DEFAULT_OPSET, MIN_OPSET

PROG = "triton-softmax"
FORCE_HELP = "replace a read-only output file (it stays read-only)"


class CommandError(Exception):
    """A failure to report as one line; raised by the commands, printed by ``main``."""


def column_names(text: str) -> list[str]:
    """A comma-separated list of column names (``--ignore-columns id,note``)."""
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"empty column name in {text!r}")
    return names


def checked_opset(value: int | None) -> int:
    """The ``--opset`` value, checked before any work is done."""
    if value is None:
        return DEFAULT_OPSET
    if value < MIN_OPSET:
        raise CommandError(f"--opset must be at least {MIN_OPSET}, got {value}")
    return value


def write_atomic(path: str | Path, write: Callable[[TextIO], object]) -> None:
    """Write text through a temporary file, then rename it over ``path`` (see ``_atomic``)."""
    from triton_softmax._atomic import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        write(f)


def add_opset_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--opset`` (checked by ``checked_opset`` when the command runs)."""
    parser.add_argument(
        "--opset",
        type=int,
        default=None,
        metavar="N",
        help=f"ONNX opset, >= {MIN_OPSET} (default {DEFAULT_OPSET})",
    )
