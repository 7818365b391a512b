"""Read and validate the label and feature CSVs (ids always stay strings).

    table = read_labels("data/train_labels.csv")      # ids, labels (int64), class_names
    features = read_features("data/train_features.csv")  # ids, filepaths, sites

Label formats (decided by the header):
- one-hot: ``id`` then one column per class; EVERY column other than ``id`` is a class, in
  file order (Conser-vision: ``id,antelope_duiker,bird,...``). Values are 0/1 (``0``, ``1``,
  ``0.0``, ``1.0``); a row needs exactly one 1.
- a single ``label`` column of class names (``id,label``): class names are the sorted
  unique labels, or the ``class_names`` argument; other columns are ignored (with a warning).

Cells are parsed as plain text, never as numbers (ids like ``00123``, ``1e5``, ``NA`` stay
as written), with the whitespace around them stripped; a UTF-8 BOM and CRLF line ends are
fine. Python's ``csv`` module does the parsing rather than pandas so every row keeps its exact
file line number (header = line 1), which pandas loses when it skips blank lines.

What is fatal and what is not:
- a bad row (invalid label, no or two 1s, empty id, wrong number of fields) is rejected and
  recorded in ``problems`` with its line; the run continues;
- the same id twice with different labels raises LabelsError listing the ids and lines;
- the same id twice with the same label keeps the first row and adds a warning;
- no header / no ``id`` column / an empty or repeated column name raises LabelsError;
- an empty file or zero usable rows raises LabelsError ("empty dataset").
"""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

ID_COLUMN = "id"
LABEL_COLUMN = "label"
FEATURE_COLUMNS = ("filepath", "site")
MAX_LISTED = 5  # ids/lines quoted in one message before "and N more"

_ONE_HOT_VALUE = re.compile(r"^([01])(\.0*)?$")  # 0, 1, 0.0, 1.0 (and 1.00 ...)


class LabelsError(ValueError):
    """A CSV that cannot be used; the message names the file, the lines or ids, and the fix."""


@dataclass
class RowProblem:
    """A rejected row: the run goes on without it, and the summary reports it."""

    file: str
    line: int  # 1-based file line; the header is line 1
    id: str
    reason: str


@dataclass
class LabelTable:
    ids: list[str]
    labels: np.ndarray  # int64 (N,), indices into class_names; labels[i] belongs to ids[i]
    class_names: list[str]
    problems: list[RowProblem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    classes_from: str = "header"  # where class_names came from: "header" (one-hot) or "label column"


@dataclass
class FeatureTable:
    ids: list[str]
    filepaths: list[str]  # "" when the file has no filepath column
    sites: list[str]  # "" when the file has no site column
    problems: list[RowProblem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def read_labels(
    path: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    *,
    data: bytes | None = None,
) -> LabelTable:
    """Parse a labels CSV (one-hot or ``label`` column; see the module docstring).

    ``data``: the file's bytes when they are already in memory (e.g. read from S3); ``path``
    then only names the file in messages. ``class_names`` fixes the class list and order:
    for a ``label`` column, labels outside it are rejected rows; for one-hot, the columns must
    be the same set (they are reordered to it).
    """
    name = str(path)
    header, rows = _read_rows(path, data)
    id_index = _id_column(name, header, f"'{ID_COLUMN},<class 1>,<class 2>,...' (one-hot 0/1) or "
                                        f"'{ID_COLUMN},{LABEL_COLUMN}'")
    warnings: list[str] = []
    problems: list[RowProblem] = []
    if LABEL_COLUMN in header:
        accepted, names = _label_column_rows(name, header, rows, id_index, class_names, problems, warnings)
    else:
        accepted = []  # (line, id, class name)
        columns = [column for column in header if column != ID_COLUMN]
        if not columns:
            raise LabelsError(
                f"{name}: no class columns after {ID_COLUMN!r}; expected '{ID_COLUMN},<class 1>,<class 2>,...' "
                f"(one-hot 0/1) or '{ID_COLUMN},{LABEL_COLUMN}'"
            )
        names = _one_hot_class_order(name, columns, class_names)
        class_indices = [header.index(column) for column in columns]
        for line, cells in _rows_with_ids(name, header, rows, id_index, problems):
            label, reason = _one_hot_label(cells, class_indices, columns)
            if reason:
                problems.append(RowProblem(name, line, cells[id_index], reason))
            else:
                accepted.append((line, cells[id_index], label))
    kept = _dedupe(name, [(line, row_id, (label,)) for line, row_id, label in accepted], "label", warnings)
    if not kept:
        raise LabelsError(_empty_message(name, problems))
    index_of = {class_name: index for index, class_name in enumerate(names)}
    return LabelTable(
        ids=[row_id for _, row_id, _ in kept],
        labels=np.array([index_of[values[0]] for _, _, values in kept], dtype=np.int64),
        class_names=names,
        problems=problems,
        warnings=warnings,
        classes_from="label column" if LABEL_COLUMN in header else "header",
    )


def rejected_rows_report(problems: list[RowProblem], shown: int = MAX_LISTED) -> str:
    """Lines for people about rejected rows: how many, then the first ``shown`` with file, line, id and reason."""
    lines = [f"WARNING: {len(problems)} row(s) rejected (not used; the summary lists every one):"]
    lines += [f"  - {problem.file} line {problem.line} (id {problem.id!r}): {problem.reason}"
              for problem in problems[:shown]]
    if len(problems) > shown:
        lines.append(f"  ... and {len(problems) - shown} more")
    return "\n".join(lines)


def rejected_by_id(problems: list[RowProblem]) -> dict[str, str]:
    """Rejected rows by id: id -> "file line N: reason" (the first row, for an id rejected twice)."""
    rejected: dict[str, str] = {}
    for problem in problems:
        rejected.setdefault(problem.id, f"{Path(problem.file).name} line {problem.line}: {problem.reason}")
    return rejected


def _label_column_rows(
    name: str,
    header: list[str],
    rows: list[tuple[int, list[str]]],
    id_index: int,
    class_names: Sequence[str] | None,
    problems: list[RowProblem],
    warnings: list[str],
) -> tuple[list[tuple[int, str, str]], list[str]]:
    """Rows of an ``id,label`` file as ((line, id, class name) accepted, class names in order).

    Rejected rows go to ``problems``; extra columns are ignored with a warning. Without
    ``class_names`` the classes are the sorted labels found."""
    label_index = header.index(LABEL_COLUMN)
    ignored = [column for column in header if column not in (ID_COLUMN, LABEL_COLUMN)]
    if ignored:
        warnings.append(f"{name}: columns {ignored} ignored (labels come from the {LABEL_COLUMN!r} column)")
    allowed = set(class_names) if class_names is not None else None
    accepted: list[tuple[int, str, str]] = []
    for line, cells in _rows_with_ids(name, header, rows, id_index, problems):
        label = cells[label_index]
        if not label:
            problems.append(RowProblem(name, line, cells[id_index], "empty label"))
        elif allowed is not None and label not in allowed:
            reason = f"label {label!r} is not one of the classes {list(class_names)}"
            problems.append(RowProblem(name, line, cells[id_index], reason))
        else:
            accepted.append((line, cells[id_index], label))
    names = list(class_names) if class_names is not None else sorted({label for _, _, label in accepted})
    return accepted, names


def read_features(path: str | os.PathLike, *, data: bytes | None = None) -> FeatureTable:
    """Parse a features CSV: ``id`` (required), ``filepath`` and ``site`` (optional, else "").

    Other columns are ignored with a warning. Duplicate ids are handled as for labels, comparing
    (filepath, site): the same values keep the first row with a warning, different values raise.
    """
    name = str(path)
    header, rows = _read_rows(path, data)
    id_index = _id_column(name, header, f"'{ID_COLUMN},filepath,site'")
    value_indices = [header.index(column) if column in header else None for column in FEATURE_COLUMNS]
    warnings: list[str] = []
    ignored = [column for column in header if column != ID_COLUMN and column not in FEATURE_COLUMNS]
    if ignored:
        warnings.append(f"{name}: columns {ignored} ignored (used: {ID_COLUMN}, {', '.join(FEATURE_COLUMNS)})")
    problems: list[RowProblem] = []
    accepted = [
        (line, cells[id_index], tuple(cells[index] if index is not None else "" for index in value_indices))
        for line, cells in _rows_with_ids(name, header, rows, id_index, problems)
    ]
    kept = _dedupe(name, accepted, "/".join(FEATURE_COLUMNS), warnings)
    if not kept:
        raise LabelsError(_empty_message(name, problems))
    return FeatureTable(
        ids=[row_id for _, row_id, _ in kept],
        filepaths=[values[0] for _, _, values in kept],
        sites=[values[1] for _, _, values in kept],
        problems=problems,
        warnings=warnings,
    )


# --------------------------------------------------------------------------- parsing
def _read_rows(path: str | os.PathLike, data: bytes | None) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(stripped header, [(line, stripped cells)]) with blank lines dropped."""
    name = str(path)
    if data is None:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise LabelsError(f"{name}: cannot read the CSV: {exc}") from exc
    try:
        text = data.decode("utf-8-sig")  # a leading BOM is dropped
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise LabelsError(f"{name}: line {line} is not UTF-8 text ({exc.reason}); save the CSV as UTF-8") from exc

    reader = csv.reader(io.StringIO(text, newline=""))
    records: list[tuple[int, list[str]]] = []
    next_line = 1
    try:
        for cells in reader:
            start, next_line = next_line, reader.line_num + 1  # a quoted cell may span lines
            stripped = [cell.strip() for cell in cells]
            if any(stripped):
                records.append((start, stripped))
    except csv.Error as exc:
        raise LabelsError(f"{name}: line {next_line}: unreadable CSV ({exc})") from exc
    if not records:
        raise LabelsError(f"{name}: empty dataset: the file has no header and no rows")

    header_line, header = records[0]
    if header_line != 1:
        raise LabelsError(f"{name}: line 1 is blank; the header must be the first line")
    for position, column in enumerate(header, start=1):
        if not column:
            raise LabelsError(
                f"{name}: line 1: column {position} has no name (a trailing comma, or a saved DataFrame "
                f"index?); found columns {header}"
            )
    repeated = sorted({column for column in header if header.count(column) > 1})
    if repeated:
        raise LabelsError(f"{name}: line 1: columns {repeated} appear more than once; found columns {header}")
    return header, records[1:]


def _rows_with_ids(
    name: str, header: list[str], rows: list[tuple[int, list[str]]], id_index: int, problems: list[RowProblem]
) -> Iterator[tuple[int, list[str]]]:
    """Yield (line, cells) of rows with the header's field count and a non-empty id."""
    for line, cells in rows:
        row_id = cells[id_index] if id_index < len(cells) else ""
        if len(cells) != len(header):
            reason = f"expected {len(header)} fields like the header, found {len(cells)}"
            problems.append(RowProblem(name, line, row_id, reason))
        elif not row_id:
            problems.append(RowProblem(name, line, row_id, "empty id"))
        else:
            yield line, cells


def _one_hot_label(cells: list[str], class_indices: list[int], columns: list[str]) -> tuple[str, str]:
    """(class name, "") for a valid one-hot row, else ("", why it is rejected)."""
    hot: list[str] = []
    for index, column in zip(class_indices, columns):
        match = _ONE_HOT_VALUE.match(cells[index])
        if match is None:
            return "", f"column {column!r} has {cells[index]!r}; one-hot values must be 0 or 1"
        if match.group(1) == "1":
            hot.append(column)
    if len(hot) != 1:
        found = f"{len(hot)} ({', '.join(hot)})" if hot else "none"
        return "", f"a one-hot row needs exactly one 1; found {found}"
    return hot[0], ""


def _one_hot_class_order(name: str, columns: list[str], class_names: Sequence[str] | None) -> list[str]:
    if class_names is None:
        return list(columns)
    if set(class_names) != set(columns) or len(class_names) != len(columns):
        raise LabelsError(f"{name}: class columns {columns} do not match the expected classes {list(class_names)}")
    return list(class_names)


def _dedupe(
    name: str, rows: list[tuple[int, str, tuple]], what: str, warnings: list[str]
) -> list[tuple[int, str, tuple]]:
    """Drop repeats of an id with the same values (first kept, warned); raise on conflicts."""
    first_seen: dict[str, tuple[int, tuple]] = {}
    kept: list[tuple[int, str, tuple]] = []
    repeats: list[str] = []
    conflicts: dict[str, list[str]] = {}
    for line, row_id, values in rows:
        if row_id not in first_seen:
            first_seen[row_id] = (line, values)
            kept.append((line, row_id, values))
            continue
        first_line, first_values = first_seen[row_id]
        if values == first_values:
            repeats.append(f"{row_id!r} (line {line} repeats line {first_line})")
        else:
            shown = conflicts.setdefault(row_id, [f"line {first_line}: {_show(first_values)}"])
            shown.append(f"line {line}: {_show(values)}")
    if conflicts:
        listed = [f"{row_id!r} ({'; '.join(lines)})" for row_id, lines in conflicts.items()]
        raise LabelsError(
            f"{name}: {len(conflicts)} id(s) appear more than once with different {what}: {_first_few(listed)}. "
            "Keep one row per id."
        )
    if repeats:
        warnings.append(
            f"{name}: {len(repeats)} duplicate row(s) with the same {what} dropped, first kept: {_first_few(repeats)}"
        )
    return kept


def _id_column(name: str, header: list[str], expected: str) -> int:
    """Index of the ``id`` column, or a LabelsError naming the file, what was found and what is expected."""
    if ID_COLUMN not in header:
        raise LabelsError(f"{name}: line 1 must be a header with an {ID_COLUMN!r} column; found columns {header}. "
                          f"Expected {expected}.")
    return header.index(ID_COLUMN)


def _show(values: tuple) -> str:
    return "/".join(repr(value) for value in values)


def _first_few(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    return shown if len(items) <= MAX_LISTED else f"{shown} and {len(items) - MAX_LISTED} more"


def _empty_message(name: str, problems: list[RowProblem]) -> str:
    if not problems:
        return f"{name}: empty dataset: the header has no rows under it"
    listed = [f"line {problem.line} id {problem.id!r}: {problem.reason}" for problem in problems]
    return f"{name}: empty dataset: no usable rows; {len(problems)} rejected: {_first_few(listed)}"
