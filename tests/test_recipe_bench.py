"""bench/recipe.py: the recipe benchmark end to end on a tiny demo set, and its pieces.

The end-to-end run trains real dss_train.py subprocesses (1 epoch, 32 px, 100 images); rows whose
dss_train.py flags do not exist yet must come out as "not available", the others with numbers that
the test recomputes from the predictions each row wrote and the data set's test labels.
"""

from __future__ import annotations

import csv
import json
import re
import sys

import numpy as np
import pytest

from tests.conftest import REPO_ROOT, run_script

sys.path.insert(0, str(REPO_ROOT))
from bench import recipe  # noqa: E402

ROWS = "defaults,temperature,prototype,prior"


def _read(path):
    with open(path, newline="", encoding="utf-8") as handle:
        header, *rows = list(csv.reader(handle))
    return header, rows


def _recompute(predictions, test_labels) -> tuple[float, float]:
    """Log loss and accuracy from the files alone (no dss code): ids and classes matched by name."""
    label_header, label_rows = _read(test_labels)
    header, rows = _read(predictions)
    by_id = {row[0]: row for row in rows}
    losses, hits = [], []
    for row in label_rows:
        true_class = label_header[1 + [float(v) for v in row[1:]].index(1.0)]
        probs = {name: float(value) for name, value in zip(header[1:], by_id[row[0]][1:])}
        clipped = {name: min(max(p, 1e-15), 1 - 1e-15) for name, p in probs.items()}
        losses.append(-np.log(clipped[true_class] / sum(clipped.values())))
        hits.append(max(probs, key=probs.get) == true_class)
    return float(np.mean(losses)), float(np.mean(hits))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("recipe")
    table_path = work / "table.md"
    result = run_script("bench/recipe.py", ["--quick", "--rows", ROWS, "--work-dir", work, "--out", table_path,
                                            "--num-threads", 1], timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return work, table_path.read_text(), json.loads((work / "results.json").read_text())


def test_table_numbers_are_recomputable_from_the_written_predictions(quick_run):
    work, table, results = quick_run
    [entry] = results["tables"]
    assert entry["dataset"] == "demo" and entry["size"] == 32
    test_labels = work / "data" / "demo" / "test_labels.csv"
    assert len(_read(test_labels)[1]) == entry["test"] == 40
    table_rows = {cells[0]: cells[1:] for cells in (
        [cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()
        if line.startswith("| ") and not line.startswith("| recipe"))}
    scored = 0
    for key, row in entry["rows"].items():
        cells = table_rows[row["title"]]
        if row["status"] != "ok":
            assert row["status"].startswith("not available") and cells[0] == row["status"], (key, row)
            continue
        logloss, accuracy = _recompute(row["predictions"], test_labels)
        assert row["logloss"] == pytest.approx(logloss, abs=1e-9) and row["accuracy"] == pytest.approx(accuracy)
        assert float(cells[0].strip("*")) == pytest.approx(logloss, abs=5e-5)
        assert float(cells[1]) == pytest.approx(accuracy, abs=5e-5)
        assert float(cells[3]) >= 0  # seconds
        scored += 1
    assert {"defaults", "prototype", "prior"} <= {key for key, row in entry["rows"].items() if row["status"] == "ok"}
    assert scored >= 3
    # The prior row predicts the training class shares for every image: log loss near ln(8), never a model's.
    assert entry["rows"]["prior"]["logloss"] == pytest.approx(np.log(8), abs=0.35)


def test_header_names_machine_date_command_and_every_rows_flags(quick_run):
    _, table, results = quick_run
    assert re.search(r"^date: \d{4}-\d\d-\d\dT", table, re.M)
    assert re.search(r"^machine: .+torch ", table, re.M)
    assert "command: `python bench/recipe.py --quick --rows defaults,temperature,prototype,prior" in table
    assert "- the defaults before issue 11: dss_train.py" in table and "--tta false" in table
    assert results["command"][:3] == ["--quick", "--rows", ROWS]


def test_rows_need_their_flags_and_leave_out_missing_off_flags(tmp_path):
    args = recipe.parse_args(["--quick"])
    rows = {row.key: row for row in recipe.make_rows(args)}
    today = {"--data-dir", "--model-dir", "--weights", "--epochs", "--tta"}
    command, why = recipe.row_command(rows["defaults"], tmp_path, tmp_path, args, today)
    assert why == "" and command[command.index("--tta") + 1] == "false"
    assert "--folds" not in command and "--temperature-scaling" not in command  # absent = off
    command, why = recipe.row_command(rows["tta"], tmp_path, tmp_path, args, today)
    assert command is None and why == "not available: dss_train.py has no --best-epoch-by, --temperature-scaling"

    later = today | {"--temperature-scaling", "--best-epoch-by", "--ema-decay", "--crop-scale", "--folds"}
    command, _ = recipe.row_command(rows["defaults"], tmp_path, tmp_path, args, later)
    assert [command[command.index(flag) + 1] for flag in ("--temperature-scaling", "--ema-decay", "--folds")] == [
        "false", "0", "1"]
    command, _ = recipe.row_command(rows["k5"], tmp_path, tmp_path, args, later)
    text = " ".join(command)
    assert "--folds 5" in text and "--temperature-scaling true" in text and "--tta true" in text
    assert "--ema-decay 0.999" in text and "--crop-scale 1" in text and "--best-epoch-by calibrated-logloss" in text
    assert recipe.train_flags("  --tta TTA  --ema-decay D\n  --data-in-memory {a,b}") == {
        "--tta", "--ema-decay", "--data-in-memory"}


def test_try_rows_add_their_flags_to_the_defaults_row(tmp_path):
    args = recipe.parse_args(["--quick", "--rows", "defaults", "--try", "small lr: --learning-rate 0.0003",
                              "--try", "ls: --label-smoothing 0.1 --tta true"])
    rows = recipe.make_rows(args)
    assert [(row.key, row.title) for row in rows] == [("defaults", "the defaults before issue 11"),
                                                      ("try-1", "small lr"), ("try-2", "ls")]
    available = {"--learning-rate", "--label-smoothing", "--tta", "--folds"}
    command, _ = recipe.row_command(rows[2], tmp_path, tmp_path, args, available)
    text = " ".join(command)
    assert "--label-smoothing 0.1" in text and "--tta true" in text and "--folds 1" in text
    with pytest.raises(SystemExit):
        recipe.parse_args(["--try", "no flags"])
    with pytest.raises(SystemExit):
        recipe.parse_args(["--try", "odd: --learning-rate"])


def test_scoring_matches_ids_and_classes_by_name(tmp_path):
    labels = tmp_path / "test_labels.csv"
    labels.write_text("id,a,b,c\nx1,1.0,0.0,0.0\nx2,0.0,0.0,1.0\n")
    predictions = tmp_path / "test_predictions.csv"
    predictions.write_text("id,c,a,b\nx2,0.7,0.2,0.1\nx1,0.1,0.6,0.3\n")  # other row and column order
    scores = recipe.score_predictions(predictions, labels)
    assert scores["accuracy"] == 1.0 and scores["images"] == 2
    assert scores["logloss"] == pytest.approx(-(np.log(0.6) + np.log(0.7)) / 2)
    predictions.write_text("id,c,a,b\nx2,0.7,0.2,0.1\n")
    with pytest.raises(ValueError, match="no prediction for 1 test ids"):
        recipe.score_predictions(predictions, labels)
