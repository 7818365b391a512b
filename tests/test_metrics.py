"""Metrics against hand-written references, and the plots as real PNG files."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dss.metrics import (accuracy, confusion_matrix, log_loss, per_class_report, plot_confusion_matrix,
                         plot_training_curves)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_log_loss_matches_the_formula_written_out():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3], [0.25, 0.25, 0.5]])
    labels = np.array([0, 2, 0, 1])
    expected = -(math.log(0.7) + math.log(0.8) + math.log(0.3) + math.log(0.25)) / 4
    assert log_loss(probs, labels) == pytest.approx(expected, rel=1e-12)


def test_log_loss_clips_and_renormalises_like_the_competition():
    probs = np.array([[1.0, 0.0], [0.0, 1.0]])
    labels = np.array([1, 1])
    # Row 1: clipped to [1 - 1e-15, 1e-15], sum 1 -> -log(1e-15); row 2: -log(1 - 1e-15).
    expected = (-math.log(1e-15) - math.log(1 - 1e-15)) / 2
    assert log_loss(probs, labels) == pytest.approx(expected, rel=1e-9)
    unnormalised = np.array([[2.0, 2.0]])
    assert log_loss(unnormalised, np.array([0])) == pytest.approx(math.log(2))


def test_accuracy_and_input_checks():
    probs = np.array([[0.6, 0.4], [0.3, 0.7], [0.9, 0.1]])
    assert accuracy(probs, np.array([0, 0, 0])) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match=r"labels has shape \(2,\), expected \(3,\)"):
        accuracy(probs, np.array([0, 1]))
    with pytest.raises(ValueError, match="class indices in 0..1"):
        log_loss(probs, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match=r"probs must be \(N, classes\)"):
        log_loss(np.array([0.5, 0.5]), np.array([0]))


def test_confusion_matrix_matches_a_loop():
    rng = np.random.default_rng(0)
    labels, preds = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    expected = np.zeros((4, 4), dtype=np.int64)
    for true, predicted in zip(labels, preds):
        expected[true, predicted] += 1
    assert np.array_equal(confusion_matrix(labels, preds, 4), expected)
    with pytest.raises(ValueError, match="preds must be class indices in 0..3"):
        confusion_matrix(labels, np.full(200, 4), 4)


def test_per_class_report_by_hand():
    cm = np.array([[5, 1, 0],
                   [2, 3, 0],
                   [0, 0, 0]])
    report = per_class_report(cm, ["a", "b", "c"])
    assert [row["class"] for row in report] == ["a", "b", "c"]
    assert report[0] == pytest.approx({"class": "a", "precision": 5 / 7, "recall": 5 / 6,
                                       "f1": 2 * (5 / 7) * (5 / 6) / (5 / 7 + 5 / 6), "support": 6})
    assert report[1]["precision"] == pytest.approx(3 / 4) and report[1]["recall"] == pytest.approx(3 / 5)
    assert report[2] == {"class": "c", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    with pytest.raises(ValueError, match="expected 2 x 2"):
        per_class_report(cm, ["a", "b"])


def test_plots_are_written_atomically_as_png(tmp_path):
    history = [{"epoch": epoch, "train_loss": 1.0 / epoch, "val_loss": 1.2 / epoch, "val_logloss": 1.1 / epoch,
                "train_acc": 0.5 + 0.1 * epoch, "val_acc": 0.4 + 0.1 * epoch, "lr": 1e-3 / epoch}
               for epoch in (1, 2, 3)]
    curves = tmp_path / "plots" / "training_curves.png"
    plot_training_curves(history, curves)
    matrix = tmp_path / "plots" / "confusion_matrix.png"
    plot_confusion_matrix(np.array([[3, 1], [0, 4]]), ["duiker", "bird"], matrix)
    for path in (curves, matrix):
        assert path.read_bytes().startswith(PNG_MAGIC) and path.stat().st_size > 5000
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["confusion_matrix.png", "training_curves.png"]
    plot_confusion_matrix(np.zeros((2, 2), dtype=int), ["duiker", "bird"], matrix)  # empty rows: no division error
    with pytest.raises(ValueError, match="no epochs"):
        plot_training_curves([], curves)
