"""Metrics against hand-written references, and the plots as real PNG files."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dss.metrics import (accuracy, confusion_matrix, log_loss, per_class_report, plot_confusion_matrix,
                         plot_training_curves, training_curves_figure)

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


def _epoch_record(epoch: int, fold: int | None, rng) -> dict:
    noise = rng.normal(0, 0.02)
    record = {"epoch": epoch, "train_loss": 1.0 / epoch + noise, "val_loss": 1.2 / epoch + noise,
              "val_logloss": 1.1 / epoch + noise, "val_logloss_calibrated": 1.0 / epoch + noise,
              "train_acc": 0.5 + 0.01 * epoch, "val_acc": 0.4 + 0.01 * epoch, "lr": 1e-3 / epoch}
    return record if fold is None else {"fold": fold, **record}


def _integer_ticks(axes) -> list[float]:
    low, high = axes.get_xlim()
    return [tick for tick in axes.get_xticks() if low <= tick <= high]


def _legend_clear_of_the_panels(figure) -> bool:
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    boxes = [legend.get_window_extent(renderer) for legend in figure.legends]
    return bool(boxes) and not any(box.overlaps(axes.get_window_extent(renderer)) for box in boxes
                                   for axes in figure.axes)


@pytest.mark.parametrize("folds", [5, 24])
def test_fold_curves_are_a_mean_with_a_band_not_a_line_per_fold(folds):
    rng = np.random.default_rng(0)
    # Fold 2 stops early (patience): its missing epochs are left out of the mean and band.
    history = [_epoch_record(epoch, fold, rng) for fold in range(1, folds + 1)
               for epoch in range(1, (3 if fold == 2 else 6) + 1)]
    selected = [4] * (folds - 1) + [6]
    figure = training_curves_figure(history, selected)
    loss_axes, acc_axes, lr_axes = figure.axes
    # One mean line per curve, whatever K (was 3 lines per fold: 15 for K = 5, 72 for K = 24 in all).
    assert [line.get_label() for line in loss_axes.lines] == [
        "train loss", "val loss (objective)", "val log loss (metric)", "val log loss after temperature scaling"]
    assert len(acc_axes.lines) == 2 and len(lr_axes.lines) == 1
    bands = [c for c in loss_axes.collections if c.get_label().startswith("_")]  # fill_between: unlabelled
    assert len(bands) == 4
    val_mean = loss_axes.lines[2].get_ydata()
    by_epoch = [[row["val_logloss"] for row in history if row["epoch"] == epoch] for epoch in range(1, 7)]
    np.testing.assert_allclose(val_mean, [np.mean(values) for values in by_epoch])
    # Each fold's selected epoch: one tick per distinct epoch with the number of folds above it.
    (marks,) = [c for c in loss_axes.collections if c.get_label().startswith("selected epoch")]
    assert len(marks.get_segments()) == 2
    assert sorted(text.get_text() for text in loss_axes.texts) == sorted([str(folds - 1), "1"])
    for axes in figure.axes:
        assert all(float(tick).is_integer() for tick in _integer_ticks(axes))
    assert _legend_clear_of_the_panels(figure)


def test_single_split_curves_mark_the_selected_epoch_with_integer_ticks(tmp_path):
    rng = np.random.default_rng(1)
    history = [_epoch_record(epoch, None, rng) for epoch in (1, 2, 3)]
    figure = training_curves_figure(history, [2])
    loss_axes = figure.axes[0]
    assert len(loss_axes.lines) == 5  # four curves and the selected epoch
    (mark,) = [line for line in loss_axes.lines if line.get_label() == "selected epoch 2"]
    assert list(mark.get_xdata()) == [2, 2]
    assert "val log loss after temperature scaling" in [text.get_text() for text in figure.legends[0].get_texts()]
    for axes in figure.axes:
        ticks = _integer_ticks(axes)
        assert ticks and all(float(tick).is_integer() for tick in ticks)  # was 1.0, 1.25, ... for 3 epochs
    assert _legend_clear_of_the_panels(figure)
    # Records of older runs without the calibrated log loss still plot, without that curve.
    older = [{key: value for key, value in row.items() if key != "val_logloss_calibrated"} for row in history]
    assert len(training_curves_figure(older).axes[0].lines) == 3
    plot_training_curves(history, tmp_path / "curves.png", [2])
    assert (tmp_path / "curves.png").read_bytes().startswith(PNG_MAGIC)
