"""Data loading: the embedded Iris set, user CSVs (good and bad), the stratified split."""

import re
from pathlib import Path

import numpy as np
import pytest

from triton_softmax.regression.data import (
    MAX_LABEL_CHARS,
    DataError,
    load_csv,
    load_iris,
    read_columns,
    read_features,
    stratified_split,
)


def _write(tmp_path: Path, text: str, name: str = "data.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_iris_shape_classes_and_known_rows():
    data = load_iris()
    assert data.features.shape == (150, 4) and data.features.dtype == np.float32
    assert data.labels.shape == (150,) and data.labels.dtype == np.int64
    assert data.feature_names == ("sepal_length", "sepal_width", "petal_length", "petal_width")
    assert data.class_names == ("setosa", "versicolor", "virginica")
    assert np.bincount(data.labels).tolist() == [50, 50, 50]
    # First and last rows of Fisher's table, and the column means of its summary statistics.
    np.testing.assert_array_equal(data.features[0], np.float32([5.1, 3.5, 1.4, 0.2]))
    np.testing.assert_array_equal(data.features[-1], np.float32([5.9, 3.0, 5.1, 1.8]))
    assert data.labels[0] == 0 and data.labels[-1] == 2
    np.testing.assert_allclose(data.features.mean(0), [5.843, 3.057, 3.758, 1.199], atol=1e-3)


def test_csv_string_labels_default_to_last_column(tmp_path):
    path = _write(tmp_path, "a,b,kind\n1,2,dog\n3,4,cat\n5,6.5,dog\n\n")
    data = load_csv(path)
    assert data.feature_names == ("a", "b")
    assert data.class_names == ("cat", "dog")
    assert data.labels.tolist() == [1, 0, 1]
    np.testing.assert_array_equal(data.features, np.float32([[1, 2], [3, 4], [5, 6.5]]))


def test_csv_label_column_anywhere_integer_labels_sorted_numerically(tmp_path):
    path = _write(tmp_path, "y,x1,x2\n10,0.5,1\n2,1.5,-1\n10,2,3e-1\n")
    data = load_csv(path, label_column="y")
    assert data.feature_names == ("x1", "x2")
    assert data.class_names == ("2", "10")  # numeric order, not string order
    assert data.labels.tolist() == [1, 0, 1]


def test_csv_bom_quotes_and_spaces(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes('\ufeff"x", y ,label\n 1 ,"2", a \n3,4,b\n'.encode())
    data = load_csv(path)
    assert data.feature_names == ("x", "y")
    assert data.class_names == ("a", "b")


@pytest.mark.parametrize(
    ("text", "label", "message"),
    [
        ("", None, r"data\.csv: the file is empty"),
        ("\n\n", None, r"data\.csv: the file is empty"),
        ("a,b,label\n", None, r"data\.csv: no data rows"),
        ("a,b,label\n1,,x\n2,3,y\n", None, r"data\.csv, row 2, column 'b': missing value"),
        (
            "a,b,label\n1,2,x\n2,abc,y\n",
            None,
            r"data\.csv, row 3, column 'b': 'abc' is not a number",
        ),
        ("a,b,label\n1,2,x\nnan,3,y\n", None, r"row 3, column 'a': 'nan' is not a finite"),
        ("a,b,label\n1,2,x\n1e39,3,y\n", None, r"row 3, column 'a': '1e39' is not a finite"),
        ("a,b,label\n1,2,x\n2,3,\n", None, r"row 3, column 'label': missing label"),
        ("a,b,label\n1,2,x\n2,3\n", None, r"row 3: 2 fields, but the header has 3"),
        ("a,b,label\n1,2,x\n2,3,y\n", "species", r"no label column 'species'.*'a', 'b', 'label'"),
        ("a,b,label\n1,2,x\n2,3,x\n", None, r"has 1 class \('x'\); need at least two"),
        ("a,a,label\n1,2,x\n2,3,y\n", None, r"column 'a' appears twice"),
        ("a,,label\n1,2,x\n2,3,y\n", None, r"column 2 of the header has no name"),
        ("label\nx\ny\n", None, r"no feature columns"),
    ],
    ids=[
        "empty",
        "blank-lines",
        "header-only",
        "missing-value",
        "non-numeric",
        "nan",
        "float32-overflow",
        "missing-label",
        "short-row",
        "no-label-column",
        "one-class",
        "duplicate-column",
        "unnamed-column",
        "no-features",
    ],
)
def test_bad_csv_is_named_in_the_error(tmp_path, text, label, message):
    path = _write(tmp_path, text)
    with pytest.raises(DataError, match=message):
        load_csv(path, label_column=label)


def test_missing_file_and_non_utf8(tmp_path):
    with pytest.raises(DataError, match=r"nope\.csv: no such file"):
        load_csv(tmp_path / "nope.csv")
    bad = tmp_path / "latin1.csv"
    bad.write_bytes("a,label\n1,caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_csv(bad)
    with pytest.raises(DataError, match="is a directory"):
        load_csv(tmp_path)


def test_read_features_selects_by_name_and_ignores_other_columns(tmp_path):
    path = _write(tmp_path, "id,b,note,a\n7,2,hello,1\n8,4,,3\n")
    np.testing.assert_array_equal(read_features(path, ["a", "b"]), np.float32([[1, 2], [3, 4]]))
    assert read_features(_write(tmp_path, "a,b\n", "empty.csv"), ["a", "b"]).shape == (0, 2)
    with pytest.raises(DataError, match=r"missing feature column\(s\) 'c'"):
        read_features(path, ["a", "c"])
    with pytest.raises(DataError, match=r"row 3, column 'b': 'x' is not a number"):
        read_features(_write(tmp_path, "a,b\n1,2\n3,x\n", "bad.csv"), ["a", "b"])


def test_csv_ignore_columns_are_neither_features_nor_label(tmp_path):
    # `note` is text and last: ignored, it is not read, and the label defaults to `kind`.
    path = _write(tmp_path, "id,a,b,kind,note\n1,1,2,dog,x y\n2,3,4,cat,\n3,5,6,dog,z\n")
    data = load_csv(path, ignore_columns=["id", "note"])
    assert data.feature_names == ("a", "b")
    assert data.class_names == ("cat", "dog")
    np.testing.assert_array_equal(data.features, np.float32([[1, 2], [3, 4], [5, 6]]))
    with pytest.raises(DataError, match=r"missing column\(s\) to ignore 'nope'"):
        load_csv(path, ignore_columns=["nope", "note"])
    with pytest.raises(DataError, match="label column 'kind' cannot also be ignored"):
        load_csv(path, label_column="kind", ignore_columns=["kind", "note"])
    with pytest.raises(DataError, match="no feature columns besides .* and the ignored ones"):
        load_csv(path, ignore_columns=["id", "a", "b", "note"])


def test_read_columns_keeps_named_columns_as_text(tmp_path):
    path = _write(tmp_path, "id,b,note,a\nr7,2,hello,1\nr8,4,,3\n")
    features, kept = read_columns(path, ["a", "b"], ["note", "id"])
    np.testing.assert_array_equal(features, np.float32([[1, 2], [3, 4]]))
    assert kept == [["hello", "r7"], ["", "r8"]]
    with pytest.raises(DataError, match=r"missing column\(s\) to keep 'key'"):
        read_columns(path, ["a"], ["key"])


def test_stratified_split_keeps_proportions_and_is_deterministic():
    labels = np.repeat(np.arange(3), [50, 30, 20])
    train, test = stratified_split(labels, 0.2, seed=1)
    assert np.bincount(labels[test]).tolist() == [10, 6, 4]
    assert np.intersect1d(train, test).size == 0
    assert np.union1d(train, test).tolist() == list(range(100))
    again_train, again_test = stratified_split(labels, 0.2, seed=1)
    np.testing.assert_array_equal(test, again_test)
    np.testing.assert_array_equal(train, again_train)
    assert not np.array_equal(test, stratified_split(labels, 0.2, seed=2)[1])


def test_stratified_split_keeps_a_training_row_per_class_and_rejects_bad_sizes():
    labels = np.array([0, 0, 1, 1, 1, 1])
    train, test = stratified_split(labels, 0.9, seed=0)
    assert set(labels[train]) == {0, 1}
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(DataError, match="strictly between 0 and 1"):
            stratified_split(labels, bad, seed=0)
    with pytest.raises(DataError, match="holds out no rows"):
        stratified_split(labels, 0.05, seed=0)


def test_unclosed_quote_is_refused_with_its_row(tmp_path):
    # The csv module's lenient mode took every later line into one label: rows lost, a junk class.
    text = 'a,b,label\n1,2,x\n3,4,"y\n5,6,z\n7,8,x\n'
    with pytest.raises(DataError, match=r"data\.csv, row 3: a quoted cell .* never closed"):
        load_csv(_write(tmp_path, text))
    with pytest.raises(DataError, match=r"row 3: a quoted cell"):  # no newline at the end
        load_csv(_write(tmp_path, 'a,label\n1,x\n2,"y'))
    with pytest.raises(DataError, match=r"row 2: a quoted cell"):
        read_features(_write(tmp_path, 'a,b\n"1,2\n3,4\n'), ["a", "b"])
    # A quoted cell may span lines.
    data = load_csv(_write(tmp_path, 'a,label\r\n1,"x\r\ny"\r\n2,z\r\n'))
    assert data.class_names == ("x\r\ny", "z")


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85", "\x0c", "\x0b", "\x1c", "\x1e"])
def test_only_newlines_end_a_row(tmp_path, separator):
    # str.splitlines also splits at these, which cut a row in two ("3 fields, but ...").
    text = f"a,b,label\n1,2,x{separator}y\n3,4,z\n5,{separator}6,x{separator}y\n"
    data = load_csv(_write(tmp_path, text))
    assert data.class_names == (f"x{separator}y", "z")
    assert data.labels.tolist() == [0, 1, 0]
    np.testing.assert_array_equal(data.features, np.float32([[1, 2], [3, 4], [5, 6]]))


def test_numeric_labels_are_one_class_per_value(tmp_path):
    # Before: "1", "01", "+1" merged only while no label had a decimal point.
    path = _write(tmp_path, "a,label\n1,1\n2,01\n3,+1\n4,1.0\n5,1e0\n6,2\n7,-0.50\n8,-.5\n9,1e2\n")
    data = load_csv(path)
    assert data.class_names == ("-0.5", "1", "2", "100")  # by value, written plainly
    assert data.labels.tolist() == [1, 1, 1, 1, 1, 2, 0, 0, 3]
    # Exact: digits beyond float64 (or a 28-digit decimal context) still tell labels apart.
    big = "1" * 40
    data = load_csv(_write(tmp_path, f"a,label\n1,{big}0\n2,{big}1\n3,{big}0.0\n", "big.csv"))
    assert data.class_names == (big + "0", big + "1")
    assert data.labels.tolist() == [0, 1, 0]


def test_one_non_number_makes_every_label_a_string(tmp_path):
    data = load_csv(_write(tmp_path, "a,label\n1,1\n2,01\n3,1.0\n4,dog\n5, 1 \n"))
    assert data.class_names == ("01", "1", "1.0", "dog")
    assert data.labels.tolist() == [1, 0, 2, 3, 1]


@pytest.mark.parametrize("label", ["5_1", "\uff11", "\u0661", "0x1", "1e", "."])
def test_labels_that_are_not_ascii_decimals_are_strings(tmp_path, label):
    # float() reads "5_1" as 51 and full-width or Arabic-Indic digits as numbers.
    data = load_csv(_write(tmp_path, f"a,label\n1,{label}\n2,1\n3,51\n"))
    assert data.class_names == tuple(sorted({label, "1", "51"}))
    assert len(data.class_names) == 3


@pytest.mark.parametrize("cell", ["5_1", "\uff11", "\u0661", "1__0", "0x1"])
def test_feature_cells_that_are_not_ascii_decimals_are_refused(tmp_path, cell):
    path = _write(tmp_path, f"a,label\n1,x\n{cell},y\n")
    message = rf"row 3, column 'a': {re.escape(repr(cell))} is not a number"
    with pytest.raises(DataError, match=message):
        load_csv(path)


@pytest.mark.parametrize("label", ["NaN", "nan", "-inf", "Infinity", "+INF"])
def test_nan_and_infinite_labels_are_refused_with_the_row(tmp_path, label):
    for other in ("1", "dog"):  # numeric column or not
        path = _write(tmp_path, f"a,label\n1,{other}\n2,{label}\n3,2\n")
        message = rf"row 3, column 'label': label {re.escape(repr(label))} is not a finite"
        with pytest.raises(DataError, match=message):
            load_csv(path)


def test_over_long_labels_are_refused_with_the_row(tmp_path):
    # A 5001-digit label used to reach int(), whose own digit limit printed Python's message.
    path = _write(tmp_path, "a,label\n1,1\n2," + "5" * 5001 + "\n")
    with pytest.raises(DataError, match=r"row 3, column 'label': label .*5001 characters.* 1000"):
        load_csv(path)
    path = _write(tmp_path, "a,label\n1,1\n2,1e5000\n")
    with pytest.raises(DataError, match=r"row 3, .* '1e5000' written out in full is longer"):
        load_csv(path)
    # At the limit: accepted, as a number written out in full.
    longest = "1" + "0" * (MAX_LABEL_CHARS - 1)
    data = load_csv(_write(tmp_path, f"a,label\n1,1\n2,1e{MAX_LABEL_CHARS - 1}\n"))
    assert data.class_names == ("1", longest)


def test_a_nul_line_does_not_end_the_file(tmp_path):
    # The reader used to append "\0end of file\0" as a last line and stop at the first such
    # line: one inside the data silently dropped every row after it (predict: 1 prediction
    # for 2 rows). NUL characters are refused, naming the row and column.
    text = "a,b,label\n1,2,x\n\x00end of file\x00\n3,4,y\n"
    with pytest.raises(DataError, match=r"row 3, column 'a': .* holds a NUL character"):
        load_csv(_write(tmp_path, text))
    with pytest.raises(DataError, match=r"row 2, column 'b': '4\\x00' holds a NUL"):
        read_features(_write(tmp_path, "a,b\n3,4\x00\n5,6\n"), ["a", "b"])


@pytest.mark.parametrize("cell", ['"5"1', '"5" ', '"5""x"y', '""1'])
def test_characters_after_a_closing_quote_are_refused(tmp_path, cell):
    # The csv module's lenient mode read "5"1 as 51: not an ASCII-decimal number as written.
    path = _write(tmp_path, f"a,b,label\n1,2,x\n3,{cell},y\n")
    with pytest.raises(DataError, match=r"row 3, column 'b': .* after its closing quote"):
        load_csv(path)
    with pytest.raises(DataError, match=r"row 1, column 2: .* after its closing quote"):
        read_features(_write(tmp_path, 'a,"b"x\n1,2\n', "h.csv"), ["a"])
    # A quote inside a quoted cell, doubled, is fine; so is a quote inside an unquoted cell.
    data = load_csv(_write(tmp_path, 'a,label\n1,"x""y"\n2,z"w\n', "ok.csv"))
    assert data.class_names == ('x"y', 'z"w')


def test_float32_max_as_printed_is_accepted(tmp_path):
    # numpy prints float32's largest value as 3.4028235e38, a little above it: it rounds to it.
    big = float(np.finfo(np.float32).max)
    text = "a,label\n3.4028235e38,x\n-3.40282356e38,y\n340282356779733661637539395458142568447,x\n"
    data = load_csv(_write(tmp_path, text))
    np.testing.assert_array_equal(data.features[:, 0], np.float32([big, -big, big]))
    # From halfway to 2**128 on, a number rounds to infinity in float32.
    halfway = str(2**128 - 2**103)
    for cell in (halfway, "3.4028236e38", "1e39"):
        path = _write(tmp_path, f"a,label\n1,x\n{cell},y\n", "inf.csv")
        with pytest.raises(DataError, match=r"row 3, column 'a': .* not a finite float32"):
            load_csv(path)


def test_rows_are_named_by_the_line_where_they_open(tmp_path):
    # A bad value after a quoted line break was named at the row's last line, an unclosed
    # quote at its first: both are now the first.
    text = 'a,b,label\n1,bad,"x\ny"\n3,4,z\n'
    with pytest.raises(DataError, match=r"row 2, column 'b': 'bad' is not a number"):
        load_csv(_write(tmp_path, text))
    text = 'a,b,label\n1,2,"x\ny"\n\n3,bad,z\n'
    with pytest.raises(DataError, match=r"row 5, column 'b': 'bad' is not a number"):
        load_csv(_write(tmp_path, text))


def test_every_byte_order_mark_before_the_header_is_dropped(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeff\ufeffa,label\n1,x\n2,y\n".encode())
    assert load_csv(path).feature_names == ("a",)


@pytest.mark.parametrize("separator", [";", "\t"])
def test_another_separator_is_named(tmp_path, separator):
    text = f"a{separator}b{separator}label\n1{separator}2{separator}x\n3{separator}4{separator}y\n"
    path = _write(tmp_path, text)
    hint = r"holding .*: is the file comma-separated\?"
    with pytest.raises(DataError, match=hint):
        load_csv(path)
    with pytest.raises(DataError, match=rf"missing feature column\(s\) 'a', 'b'.*{hint}"):
        read_features(path, ["a", "b"])
    decimal_commas = f"a{separator}label\n1,5{separator}x\n"
    with pytest.raises(DataError, match=rf"row 2: 2 fields, but the header has 1 .*{hint}"):
        load_csv(_write(tmp_path, decimal_commas, "dc.csv"))
