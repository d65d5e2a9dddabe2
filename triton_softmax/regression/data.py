"""Tabular data for softmax regression: the embedded Iris set, user CSVs and a stratified split.

A CSV has a header row, numeric feature columns and one label column. Rows end only at ``\n``,
``\r`` or ``\r\n`` outside quotes (the csv module's rule: U+2028, NEL or a form feed are part of a
cell); a quote left open at the end of the file is refused, naming the row where it opens, and so
is a quoted cell with more characters after its closing quote (``"5"1``) and a NUL character
anywhere. Row numbers in error messages count the header as row 1, as a spreadsheet does, and name
the line where a row opens, so "row 5" is the fifth line of a file without quoted line breaks. A
byte order mark before the header is dropped. This module needs numpy only.

Numbers (feature cells, numeric labels) are ASCII decimals: an optional sign, digits with an
optional decimal point, an optional exponent (``3``, ``-0.5``, ``.5``, ``1e-3``). Anything else is
not a number: no ``5_1``, no full-width or other non-ASCII digits, no ``nan`` or ``inf``.

Labels, one rule for the whole column: the column is numeric when every label is a number, and then
classes are compared by value (``1``, ``01``, ``+1``, ``1.0`` and ``1e0`` are one class, named
``1``) and sorted by value; otherwise every label is a string, compared as written after stripping
surrounding whitespace (``1`` and ``01`` are two classes), and sorted as strings. An empty label, a
``nan``/``inf`` label, or one longer than ``MAX_LABEL_CHARS`` characters (written out in full, for
a number) is refused with its row.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from importlib import resources
from pathlib import Path

import numpy as np

#: An ASCII decimal number: sign, integer part, fraction, exponent (groups 1-4).
_NUMBER = re.compile(r"([+-]?)(\d*)(?:\.(\d*))?(?:[eE]([+-]?\d+))?", re.ASCII)
#: What ``float`` reads as a NaN or an infinity.
_NOT_FINITE = re.compile(r"[+-]?(?:nan|inf|infinity)", re.IGNORECASE)
_FLOAT32_MAX = float(np.finfo(np.float32).max)
#: Halfway between float32's largest value and 2**128: numbers below it in magnitude round to a
#: finite float32 (``3.4028235e38``, numpy's print of the largest, is one), the rest to infinity.
_FLOAT32_LIMIT = Decimal(2**128 - 2**103)
#: The longest label accepted, in characters (a number's as written out in full): class names end
#: up in the model's metadata and in the column names of `predict`'s output.
MAX_LABEL_CHARS = 1000


class DataError(ValueError):
    """Unusable input data; the message names the file and, where known, the row and column."""


@dataclass(frozen=True)
class Dataset:
    """Features and integer labels with the names that give them meaning.

    Attributes:
        features: float32 array of shape (n_samples, n_features).
        labels: int64 array of shape (n_samples,), indices into ``class_names``.
        feature_names: one name per feature column, in column order.
        class_names: the distinct labels, sorted (by value when every label is a number; see
            the module's docstring for the rule).
        source: where the data came from, for messages and metadata.
    """

    features: np.ndarray
    labels: np.ndarray
    feature_names: tuple[str, ...]
    class_names: tuple[str, ...]
    source: str

    @property
    def n_samples(self) -> int:
        """Number of rows."""
        return int(self.features.shape[0])

    @property
    def n_features(self) -> int:
        """Number of feature columns."""
        return int(self.features.shape[1])

    @property
    def n_classes(self) -> int:
        """Number of distinct classes."""
        return len(self.class_names)

    def subset(self, indices: np.ndarray) -> Dataset:
        """Rows ``indices`` of this dataset, with the same names.

        Args:
            indices: integer row indices.

        Returns:
            A new ``Dataset`` sharing feature and class names with this one.
        """
        return Dataset(
            self.features[indices],
            self.labels[indices],
            self.feature_names,
            self.class_names,
            self.source,
        )


def load_iris() -> Dataset:
    """Load Fisher's Iris data embedded in the package (150 rows, 4 features, 3 species).

    The file is the public-domain copy that scikit-learn ships (the same as R's, not UCI's, which
    has two wrong data points), with a header and species names instead of codes.

    Returns:
        The dataset; ``source`` is ``"iris (embedded)"``.
    """
    text = resources.files("triton_softmax.regression").joinpath("data/iris.csv").read_text("utf-8")
    header, rows = _parse(text, "iris.csv")
    return _to_dataset(header, rows, "species", "iris.csv", "iris (embedded)")


def load_csv(
    path: str | Path, label_column: str | None = None, ignore_columns: Sequence[str] = ()
) -> Dataset:
    """Load a labelled CSV: a header, numeric feature columns and one label column.

    Args:
        path: the CSV file (UTF-8, comma-separated, header row first).
        label_column: name of the label column; when ``None``, the last column not in
            ``ignore_columns``. Every other column is a feature and must hold finite numbers.
        ignore_columns: columns that are neither feature nor label (ids, notes); not read.

    Returns:
        The dataset, classes sorted (by value when every label is a number; see the module's
        docstring for the rule).

    Raises:
        DataError: the file is missing, empty or not UTF-8; a quote is never closed, or a cell
            has characters after its closing quote or a NUL character; the label
            column or an ignored column is absent, or the label column is ignored; a cell is
            missing or not a finite number (the message names file, row and column); a label is
            empty, NaN, infinite or too long; a row has the wrong number of fields; fewer than two
            classes.
    """
    name = str(path)
    header, rows = _parse(_read_text(path), name)
    _require_columns(header, ignore_columns, name, "column(s) to ignore")
    if label_column is None:
        label_column = next((c for c in reversed(header) if c not in ignore_columns), header[-1])
    if label_column in ignore_columns:
        raise DataError(f"{name}: the label column {label_column!r} cannot also be ignored")
    return _to_dataset(header, rows, label_column, name, name, ignore_columns)


def read_features(path: str | Path, feature_names: Sequence[str]) -> np.ndarray:
    """Read the named feature columns of a CSV, in the order given; other columns are ignored.

    Args:
        path: the CSV file (UTF-8, comma-separated, header row first).
        feature_names: the columns to read.

    Returns:
        float32 array of shape (n_rows, len(feature_names)); zero rows for a header-only file.

    Raises:
        DataError: the file is missing, empty or not UTF-8; a quote is never closed, or a cell
            has characters after its closing quote or a NUL character; a named
            column is absent; a cell is missing or not a finite number; a row has the wrong number
            of fields.
    """
    return read_columns(path, feature_names)[0]


def read_columns(
    path: str | Path, feature_names: Sequence[str], keep_columns: Sequence[str] = ()
) -> tuple[np.ndarray, list[list[str]]]:
    """Read the named feature columns of a CSV as numbers and other named columns as text.

    Args:
        path: the CSV file (UTF-8, comma-separated, header row first).
        feature_names: the numeric columns to read, in this order.
        keep_columns: columns to read as they are (stripped of surrounding spaces), e.g. ids.

    Returns:
        ``(features, kept)``: float32 array of shape (n_rows, len(feature_names)), and one list of
        ``len(keep_columns)`` strings per row.

    Raises:
        DataError: as ``read_features``, and when a column to keep is absent.
    """
    name = str(path)
    header, rows = _parse(_read_text(path), name, allow_no_rows=True)
    _require_columns(header, feature_names, name, "feature column(s)")
    _require_columns(header, keep_columns, name, "column(s) to keep")
    positions = [header.index(f) for f in feature_names]
    kept = [header.index(c) for c in keep_columns]
    features = _numeric_block(rows, header, positions, name)
    return features, [[cells[i] for i in kept] for _, cells in rows]


def _require_columns(header: list[str], columns: Sequence[str], name: str, what: str) -> None:
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(
            f"{name}: missing {what} {', '.join(map(repr, missing))}; "
            f"the file has {', '.join(map(repr, header))}{_separator_hint(header)}"
        )


def stratified_split(
    labels: np.ndarray, test_size: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split row indices into train and test sets with the class proportions kept in both.

    Each class sends ``round(test_size * count)`` rows to the test set, but always keeps at least
    one row for training. The same ``seed`` gives the same split.

    Args:
        labels: int64 class indices, shape (n_samples,).
        test_size: fraction of each class held out, strictly between 0 and 1.
        seed: seed of the shuffle.

    Returns:
        ``(train_indices, test_indices)``, each sorted ascending.

    Raises:
        DataError: ``test_size`` is outside (0, 1) or the test set would be empty.
    """
    if not 0.0 < test_size < 1.0:
        raise DataError(f"test size must be strictly between 0 and 1, got {test_size}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        n_test = min(int(math.floor(test_size * idx.size + 0.5)), idx.size - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    test_idx = np.sort(np.concatenate(test))
    if test_idx.size == 0:
        raise DataError(
            f"a test size of {test_size} holds out no rows of {labels.size}; "
            "raise the test size or add rows"
        )
    return np.sort(np.concatenate(train)), test_idx


def _read_text(path: str | Path) -> str:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a CSV file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None


def _parse(
    text: str, name: str, allow_no_rows: bool = False
) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and ``(row_number, cells)`` pairs; blank lines are skipped."""
    header: list[str] = []
    rows = []
    try:
        for row_number, cells in _records(text.lstrip("\ufeff"), name):
            if not header:
                header = _header(cells, name)
                continue
            if len(cells) != len(header):
                raise DataError(
                    f"{name}, row {row_number}: {len(cells)} fields, but the header has "
                    f"{len(header)}{_separator_hint(header)}"
                )
            rows.append((row_number, cells))
    except _CellError as e:
        column = repr(header[e.column - 1]) if e.column <= len(header) else str(e.column)
        raise DataError(f"{name}, row {e.row}, column {column}: {e.problem}") from None
    if not header:
        raise DataError(f"{name}: the file is empty")
    if not rows and not allow_no_rows:
        raise DataError(f"{name}: no data rows after the header")
    return header, rows


def _header(cells: list[str], name: str) -> list[str]:
    """The header's column names, checked: each named, none twice."""
    for i, column in enumerate(cells, start=1):
        if not column:
            raise DataError(f"{name}: column {i} of the header has no name")
    seen = set()
    for column in cells:
        if column in seen:
            raise DataError(f"{name}: column {column!r} appears twice in the header")
        seen.add(column)
    return cells


def _separator_hint(header: list[str]) -> str:
    """A hint for a header read as one column that holds another separator, else ``""``."""
    if len(header) != 1:
        return ""
    found = [repr(s) for s in (";", "\t", "|") if s in header[0]]
    if not found:
        return ""
    return (
        f" (the header is one column holding {' and '.join(found)}: is the file comma-separated?)"
    )


class _CellError(Exception):
    """A cell that cannot be read, at ``row`` (where its record opens) and ``column`` (1-based)."""

    def __init__(self, row: int, column: int, problem: str) -> None:
        super().__init__(problem)
        self.row, self.column, self.problem = row, column, problem


def _records(text: str, name: str) -> Iterator[tuple[int, list[str]]]:
    """``(row_number, stripped cells)`` of each non-blank record of ``text``.

    The csv module splits rows itself (``newline=""``), so only ``\n``, ``\r`` and ``\r\n``
    end a row. Its strict mode refuses a quote still open at the end of the text and characters
    after a closing quote (``"5"1``, which the lenient mode reads as ``51``). ``row_number`` is
    the line where the record opens, also for a quoted cell spanning lines.

    Raises:
        DataError: a quote never closed, or another malformed record.
        _CellError: a closing quote followed by more characters, or a NUL character in a cell.
    """
    consumed: list[str] = []

    def lines() -> Iterator[str]:
        for line in io.StringIO(text, newline=""):
            consumed.append(line)
            yield line

    reader = csv.reader(lines(), strict=True)
    has_nul = "\x00" in text  # one scan of the text, so that most files skip the per-cell test
    start = 1
    while True:
        consumed.clear()
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            after = _after_quote("".join(consumed))
            if after is not None:
                column, cell = after
                raise _CellError(
                    start,
                    column,
                    f"{_shown(cell)} has characters after its closing quote; quote the whole "
                    "cell or none of it",
                ) from None
            if "end of data" in str(e):  # strict mode, at the end of the text inside quotes
                raise DataError(
                    f"{name}, row {start}: a quoted cell that opens on this row is never closed "
                    "(a missing '\"' takes in the rest of the file)"
                ) from None
            raise DataError(f"{name}, row {start}: {e}") from None
        for column, cell in enumerate(cells if has_nul else (), start=1):
            if "\x00" in cell:
                raise _CellError(start, column, f"{_shown(cell)} holds a NUL character")
        if cells:
            yield start, [c.strip() for c in cells]
        start = reader.line_num + 1


def _after_quote(record: str) -> tuple[int, str] | None:
    """The first cell of ``record`` (the lines of one record) whose closing quote is followed by
    more characters, as ``(column, cell as written)``; ``None`` when there is none."""
    column, cell_start, i = 1, 0, 0
    at_start, closed = True, False
    while i < len(record):
        ch = record[i]
        if ch in "\r\n":  # outside quotes: the record ends
            return None
        if ch == ",":
            column, cell_start, at_start, closed = column + 1, i + 1, True, False
        elif closed:
            end = len(record)
            for stop in ",\r\n":
                found = record.find(stop, i)
                if found >= 0:
                    end = min(end, found)
            return column, record[cell_start:end]
        elif ch == '"' and at_start:
            close = i + 1
            while True:  # a doubled quote inside quotes is a quote character
                close = record.find('"', close)
                if close < 0:
                    return None
                if record[close + 1 : close + 2] != '"':
                    break
                close += 2
            i, closed, at_start = close, True, False
        else:
            at_start = False
        i += 1
    return None


def _numeric_block(
    rows: list[tuple[int, list[str]]], header: list[str], positions: list[int], name: str
) -> np.ndarray:
    out = np.empty((len(rows), len(positions)), dtype=np.float32)
    for i, (row_number, cells) in enumerate(rows):
        for j, pos in enumerate(positions):
            out[i, j] = _number(cells[pos], name, row_number, header[pos])
    return out


def _number(cell: str, name: str, row_number: int, column: str) -> float:
    where = f"{name}, row {row_number}, column {column!r}"
    if not cell:
        raise DataError(f"{where}: missing value")
    if _NOT_FINITE.fullmatch(cell):
        raise DataError(f"{where}: {cell!r} is not a finite float32 number")
    if not _is_number(cell):
        raise DataError(f"{where}: {_shown(cell)} is not a number")
    value = float(cell)
    if abs(value) <= _FLOAT32_MAX:
        return value
    # Compared exactly: float() rounds once already, and a second rounding to float32 could
    # take a number just below the limit to infinity.
    if not math.isfinite(value) or Decimal(cell).copy_abs() >= _FLOAT32_LIMIT:
        raise DataError(f"{where}: {_shown(cell)} is not a finite float32 number")
    return math.copysign(_FLOAT32_MAX, value)


def _to_dataset(
    header: list[str],
    rows: list[tuple[int, list[str]]],
    label_column: str,
    name: str,
    source: str,
    ignore_columns: Sequence[str] = (),
) -> Dataset:
    if label_column not in header:
        raise DataError(
            f"{name}: no label column {label_column!r}; the columns are "
            f"{', '.join(map(repr, header))}"
        )
    label_pos = header.index(label_column)
    feature_pos = [i for i, c in enumerate(header) if i != label_pos and c not in ignore_columns]
    if not feature_pos:
        raise DataError(
            f"{name}: no feature columns besides the label column {label_column!r}"
            + (" and the ignored ones" if ignore_columns else "")
            + _separator_hint(header)
        )
    raw_labels, class_names = _labels(rows, label_pos, name, label_column)
    if len(class_names) < 2:
        raise DataError(
            f"{name}: label column {label_column!r} has {len(class_names)} class "
            f"({', '.join(map(repr, class_names))}); need at least two"
        )
    index = {c: i for i, c in enumerate(class_names)}
    features = _numeric_block(rows, header, feature_pos, name)
    labels = np.array([index[v] for v in raw_labels], dtype=np.int64)
    return Dataset(
        features,
        labels,
        tuple(header[i] for i in feature_pos),
        tuple(class_names),
        source,
    )


def _is_number(text: str) -> bool:
    """Whether ``text`` is an ASCII decimal number (see the module's docstring)."""
    m = _NUMBER.fullmatch(text)
    return m is not None and bool(m.group(2) or m.group(3))


def _shown(text: str, limit: int = 40) -> str:
    """``repr(text)``, shortened in the middle when longer than ``limit`` characters."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[: limit // 2]!r}...{text[-limit // 4 :]!r} ({len(text)} characters)"


def _canonical(text: str) -> str | None:
    """The plain decimal form of the number ``text`` (``+01.50e1`` -> ``15``; ``-0`` -> ``0``).

    Exact (no rounding, whatever the digits); equal values give equal strings. ``text`` must be a
    number per ``_is_number`` and at most ``MAX_LABEL_CHARS`` long, so its exponent is short.
    ``None`` when the plain form would be longer than ``MAX_LABEL_CHARS`` (``1e999``).
    """
    m = _NUMBER.fullmatch(text)
    assert m is not None
    sign, whole, fraction, exponent = m.group(1), m.group(2), m.group(3) or "", m.group(4)
    digits = (whole + fraction).lstrip("0")
    if not digits:
        return "0"
    shift = int(exponent or 0) - len(fraction)
    stripped = digits.rstrip("0")
    shift += len(digits) - len(stripped)
    # value = digits x 10**shift; written out in full, it needs about this many characters.
    if max(len(stripped) + shift, -shift + 2) > MAX_LABEL_CHARS:
        return None
    if shift >= 0:
        plain = stripped + "0" * shift
    elif len(stripped) > -shift:
        plain = f"{stripped[:shift]}.{stripped[shift:]}"
    else:
        plain = "0." + "0" * (-shift - len(stripped)) + stripped
    return ("-" if sign == "-" else "") + plain


def _labels(
    rows: list[tuple[int, list[str]]], label_pos: int, name: str, column: str
) -> tuple[list[str], list[str]]:
    """The class name of each row and the sorted class names, by the module docstring's rule."""
    texts = []
    for row_number, cells in rows:
        text = cells[label_pos]
        where = f"{name}, row {row_number}, column {column!r}"
        if not text:
            raise DataError(f"{where}: missing label")
        if _NOT_FINITE.fullmatch(text):
            raise DataError(f"{where}: label {text!r} is not a finite number; give a class name")
        if len(text) > MAX_LABEL_CHARS:
            raise DataError(
                f"{where}: label {_shown(text)} is longer than {MAX_LABEL_CHARS} characters"
            )
        texts.append((where, text))
    if not all(_is_number(text) for _, text in texts):
        labels = [text for _, text in texts]
        return labels, sorted(set(labels))
    labels = []
    for where, text in texts:
        value = _canonical(text)
        if value is None:
            raise DataError(
                f"{where}: label {_shown(text)} written out in full is longer than "
                f"{MAX_LABEL_CHARS} characters"
            )
        labels.append(value)
    return labels, sorted(set(labels), key=Decimal)
