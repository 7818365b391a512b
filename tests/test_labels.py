"""dss.ingest.labels on real CSV files: both label formats and the CSV rows of tests/robustness/ROWS.md."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dss.ingest.labels import LabelsError, RowProblem, read_features, read_labels, rejected_by_id, rejected_rows_report

CLASSES = ["antelope_duiker", "bird", "blank", "civet_genet", "hog", "leopard", "monkey_prosimian", "rodent"]
ONE_HOT_HEADER = "id," + ",".join(CLASSES)


def one_hot_row(row_id: str, class_index: int, one: str = "1.0", zero: str = "0.0") -> str:
    return ",".join([row_id] + [one if index == class_index else zero for index in range(len(CLASSES))])


def write(tmp_path: Path, text: str, name: str = "train_labels.csv", encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


# --------------------------------------------------------------------------- formats
def test_one_hot_conser_vision_layout(tmp_path):
    lines = [ONE_HOT_HEADER, one_hot_row("ZJ000000", 1), one_hot_row("ZJ000001", 7), one_hot_row("ZJ000002", 0)]
    table = read_labels(write(tmp_path, "\n".join(lines) + "\n"))
    assert table.class_names == CLASSES
    assert table.ids == ["ZJ000000", "ZJ000001", "ZJ000002"]
    assert table.labels.dtype == np.int64 and table.labels.tolist() == [1, 7, 0]
    assert table.problems == [] and table.warnings == []


def test_one_hot_classes_follow_file_order_not_hard_coded(tmp_path):
    text = "id,zebra,aardvark,mole\na,0,0,1\nb,0,1,0\nc,1,0,0\n"
    table = read_labels(write(tmp_path, text))
    assert table.class_names == ["zebra", "aardvark", "mole"]
    assert table.labels.tolist() == [2, 1, 0]


def test_one_hot_reordered_to_given_class_names(tmp_path):
    table = read_labels(write(tmp_path, "id,b,a\nx,0,1\ny,1,0\n"), class_names=["a", "b"])
    assert table.class_names == ["a", "b"] and table.labels.tolist() == [0, 1]
    with pytest.raises(LabelsError, match="do not match"):
        read_labels(write(tmp_path, "id,b,a\nx,0,1\n"), class_names=["a", "c"])


def test_label_column_format(tmp_path):
    text = "id,label,notes\nx1,hog,seen twice\nx2,bird,\nx3,hog,\n"
    table = read_labels(write(tmp_path, text))
    assert table.class_names == ["bird", "hog"]
    assert table.ids == ["x1", "x2", "x3"] and table.labels.tolist() == [1, 0, 1]
    assert any("notes" in warning for warning in table.warnings)


def test_label_column_with_given_class_names(tmp_path):
    table = read_labels(write(tmp_path, "id,label\nx1,hog\nx2,cat\n"), class_names=CLASSES)
    assert table.class_names == CLASSES
    assert table.ids == ["x1"] and table.labels.tolist() == [CLASSES.index("hog")]
    assert [(problem.line, problem.id) for problem in table.problems] == [(3, "x2")]
    assert "cat" in table.problems[0].reason


# --------------------------------------------------------------------------- bad rows
def test_b1_bad_one_hot_rows_are_rejected_with_their_lines(tmp_path):
    lines = [
        ONE_HOT_HEADER,
        one_hot_row("good1", 2),  # line 2
        one_hot_row("cat", 0).replace("1.0", "cat"),  # line 3: a class name as a value
        one_hot_row("empty", 0).replace("1.0", ""),  # line 4: "" and then no 1
        ",".join(["two", "1.0", "1.0"] + ["0.0"] * (len(CLASSES) - 2)),  # line 5: two 1s
        one_hot_row("none", 0, one="0"),  # line 6: no 1
        one_hot_row("spaced", 3, one=" 2"),  # line 7: " 2" (stripped to "2") is not 0/1
        one_hot_row("good2", 4, one="1", zero="0"),  # line 8: integer spelling is fine
        one_hot_row("", 5),  # line 9: empty id
        "short,1.0,0.0",  # line 10: wrong field count
    ]
    table = read_labels(write(tmp_path, "\n".join(lines) + "\n"))
    assert table.ids == ["good1", "good2"] and table.labels.tolist() == [2, 4]
    rejected = {(problem.line, problem.id) for problem in table.problems}
    assert rejected == {(3, "cat"), (4, "empty"), (5, "two"), (6, "none"), (7, "spaced"), (9, ""), (10, "short")}
    assert all(isinstance(problem, RowProblem) for problem in table.problems)
    assert all(problem.file.endswith("train_labels.csv") for problem in table.problems)
    reasons = {problem.id: problem.reason for problem in table.problems}
    assert "exactly one 1" in reasons["two"] and "exactly one 1" in reasons["none"]
    assert "'2'" in reasons["spaced"] and "empty id" in reasons[""]


def test_rejected_rows_are_reported_with_file_line_and_reason_first_five_shown(tmp_path):
    lines = [ONE_HOT_HEADER, one_hot_row("good", 0)] + [one_hot_row(f"bad{n}", 0, one="0") for n in range(7)]
    table = read_labels(write(tmp_path, "\n".join(lines) + "\n"))
    assert table.classes_from == "header"
    report = rejected_rows_report(table.problems).splitlines()
    assert report[0] == "WARNING: 7 row(s) rejected (not used; the summary lists every one):"
    assert report[1] == f"  - {tmp_path / 'train_labels.csv'} line 3 (id 'bad0'): {table.problems[0].reason}"
    assert len(report) == 1 + 5 + 1 and report[-1] == "  ... and 2 more"
    assert rejected_by_id(table.problems)["bad6"] == f"train_labels.csv line 9: {table.problems[6].reason}"
    assert read_labels(write(tmp_path, "id,label\na,cat\n")).classes_from == "label column"


def test_b1_bad_label_column_values(tmp_path):
    text = "id,label\na,bird\nb,\nc, 2\nd,1.0\ne,cat\n"
    table = read_labels(write(tmp_path, text), class_names=["bird", "hog"])
    assert table.ids == ["a"]
    assert [(problem.line, problem.id) for problem in table.problems] == [(3, "b"), (4, "c"), (5, "d"), (6, "e")]
    # without a given class list every non-empty label is a class; "" is still rejected
    inferred = read_labels(write(tmp_path, text))
    assert inferred.class_names == ["1.0", "2", "bird", "cat"]
    assert [(problem.line, problem.id) for problem in inferred.problems] == [(3, "b")]


# --------------------------------------------------------------------------- duplicate ids
def test_b2_duplicate_id_with_conflicting_labels_is_fatal(tmp_path):
    lines = [ONE_HOT_HEADER, one_hot_row("ZJ1", 0), one_hot_row("ZJ2", 1), one_hot_row("ZJ1", 3), one_hot_row("ZJ2", 2)]
    with pytest.raises(LabelsError) as caught:
        read_labels(write(tmp_path, "\n".join(lines)))
    message = str(caught.value)
    assert "train_labels.csv" in message and "'ZJ1'" in message and "'ZJ2'" in message
    assert "line 2" in message and "line 4" in message and "line 5" in message


def test_b3_duplicate_id_with_same_label_is_deduped_with_a_warning(tmp_path):
    lines = [ONE_HOT_HEADER, one_hot_row("ZJ1", 0), one_hot_row("ZJ2", 1), one_hot_row("ZJ1", 0, one="1", zero="0")]
    table = read_labels(write(tmp_path, "\n".join(lines)))
    assert table.ids == ["ZJ1", "ZJ2"] and table.labels.tolist() == [0, 1]
    assert len(table.warnings) == 1 and "'ZJ1'" in table.warnings[0] and "line 4" in table.warnings[0]


# --------------------------------------------------------------------------- ids stay strings
def test_b4_ids_stay_strings(tmp_path):
    text = "id,label\n00123,hog\n1e5,bird\nNA,hog\nnan,bird\nNULL,hog\n 007 ,bird\n"
    table = read_labels(write(tmp_path, text))
    assert table.ids == ["00123", "1e5", "NA", "nan", "NULL", "007"]
    features = read_features(write(tmp_path, "id,filepath,site\n00123,f/00123.jpg,S0001\nNA,f/NA.jpg,\n", "f.csv"))
    assert features.ids == ["00123", "NA"]
    assert features.filepaths == ["f/00123.jpg", "f/NA.jpg"] and features.sites == ["S0001", ""]


# --------------------------------------------------------------------------- headers, encodings and line numbers
def test_b6_bom_crlf_and_whitespace(tmp_path):
    text = "id , bird ,hog\r\n a1 , 1.0 , 0.0 \r\n\r\na2,0,1\r\n"
    path = write(tmp_path, text, encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    table = read_labels(path)
    assert table.class_names == ["bird", "hog"] and table.ids == ["a1", "a2"] and table.labels.tolist() == [0, 1]


def test_b6_line_numbers_count_blank_and_multiline_rows(tmp_path):
    text = 'id,label,notes\n\na,hog,"two\nlines"\nb,,x\n'
    table = read_labels(write(tmp_path, text))
    assert [(problem.line, problem.id) for problem in table.problems] == [(5, "b")]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("ZJ000000,0.0,1.0\nZJ000001,1.0,0.0\n", "must be a header"),  # missing header
        ("identifier,bird,hog\nx,1,0\n", "found columns"),
        ("id\nx\n", "no class columns"),
        (",id,bird,hog\n0,x,1,0\n", "column 1 has no name"),  # a saved DataFrame index
        ("id,bird,bird\nx,1,0\n", "more than once"),
        ("\nid,bird\nx,1\n", "line 1 is blank"),
    ],
)
def test_b6_bad_headers_name_the_file_and_the_columns(tmp_path, text, expected):
    with pytest.raises(LabelsError, match=expected) as caught:
        read_labels(write(tmp_path, text))
    assert "train_labels.csv" in str(caught.value)


def test_b6_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "train_labels.csv"
    path.write_bytes(b"id,label\nx,hog\ny,caf\xe9\n")
    with pytest.raises(LabelsError, match="line 3 is not UTF-8"):
        read_labels(path)


# --------------------------------------------------------------------------- empty files
@pytest.mark.parametrize("text", ["", "\n\n", ONE_HOT_HEADER + "\n"])
def test_b7_empty_files(tmp_path, text):
    with pytest.raises(LabelsError, match="empty dataset"):
        read_labels(write(tmp_path, text))


def test_b7_zero_usable_rows(tmp_path):
    text = "id,bird,hog\nx,1,1\ny,0,0\n"
    with pytest.raises(LabelsError, match="empty dataset") as caught:
        read_labels(write(tmp_path, text))
    assert "2 rejected" in str(caught.value) and "line 2" in str(caught.value)


def test_missing_file_is_a_labels_error(tmp_path):
    with pytest.raises(LabelsError, match="cannot read"):
        read_labels(tmp_path / "nope.csv")


def test_bytes_in_memory_use_the_path_only_for_messages():
    table = read_labels("s3://bucket/data/train_labels.csv", data=b"\xef\xbb\xbfid,a,b\r\nx,0,1\r\n")
    assert table.ids == ["x"] and table.class_names == ["a", "b"]
    with pytest.raises(LabelsError, match="s3://bucket/data/train_labels.csv"):
        read_labels("s3://bucket/data/train_labels.csv", data=b"")


# --------------------------------------------------------------------------- features
def test_features_columns_and_duplicates(tmp_path):
    text = (
        "id,filepath,site,extra\n"
        "a,train_features/a.jpg,S1,?\n"
        "b,train_features/b.jpg,S2,?\n"
        "a,train_features/a.jpg,S1,!\n"  # same filepath/site: a repeat
        ",x.jpg,S3,?\n"
    )
    table = read_features(write(tmp_path, text, "train_features.csv"))
    assert table.ids == ["a", "b"]
    assert table.filepaths == ["train_features/a.jpg", "train_features/b.jpg"] and table.sites == ["S1", "S2"]
    assert [(problem.line, problem.reason) for problem in table.problems] == [(5, "empty id")]
    assert any("extra" in warning for warning in table.warnings)
    assert any("'a'" in warning and "line 4" in warning for warning in table.warnings)


def test_features_optional_columns_default_to_empty(tmp_path):
    table = read_features(write(tmp_path, "id\nb\na\n", "test_features.csv"))
    assert table.ids == ["b", "a"] and table.filepaths == ["", ""] and table.sites == ["", ""]


def test_features_conflicting_duplicate_is_fatal(tmp_path):
    text = "id,filepath,site\na,a.jpg,S1\na,a.jpg,S9\n"
    with pytest.raises(LabelsError, match=r"'a'.*line 2.*line 3"):
        read_features(write(tmp_path, text, "train_features.csv"))


def test_features_empty_is_fatal(tmp_path):
    with pytest.raises(LabelsError, match="empty dataset"):
        read_features(write(tmp_path, "id,filepath,site\n", "test_features.csv"))
