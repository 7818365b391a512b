"""Scores and plots: log loss (the competition metric), accuracy, confusion matrix,
per-class precision/recall/F1, training curves.

Plots use matplotlib's Agg canvas directly (no pyplot global state, no display) and are
written atomically; matplotlib is imported only when a plot is drawn.
"""

from __future__ import annotations

import io
import os
from typing import Sequence

import numpy as np

from dss import fileio

# Probabilities are clipped to [EPS, 1 - EPS] and renormalised before the log, as the
# competition and sklearn's log_loss do, so one confident mistake costs at most -log(EPS).
LOG_LOSS_EPS = 1e-15


def _check_probs(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if probs.ndim != 2:
        raise ValueError(f"probs must be (N, classes), got shape {probs.shape}")
    if labels.shape != (probs.shape[0],):
        raise ValueError(f"labels has shape {labels.shape}, expected ({probs.shape[0]},) to match probs")
    if probs.shape[0] == 0:
        raise ValueError("no samples to score")
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise ValueError(f"labels must be class indices in 0..{probs.shape[1] - 1}, got {labels.min()}..{labels.max()}")
    return probs, labels.astype(np.int64)


def image_log_losses(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """float64 (N,): each row's log loss (probabilities clipped and renormalised; ``log_loss`` is the mean)."""
    probs, labels = _check_probs(probs, labels)
    clipped = np.clip(probs, LOG_LOSS_EPS, 1.0 - LOG_LOSS_EPS)
    clipped /= clipped.sum(axis=1, keepdims=True)
    return -np.log(clipped[np.arange(labels.size), labels])


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean multiclass log loss of probabilities (N, C) for true class indices (N,)."""
    return float(np.mean(image_log_losses(probs, labels)))


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows whose most probable class is the true one."""
    probs, labels = _check_probs(probs, labels)
    return float(np.mean(probs.argmax(axis=1) == labels))


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 (C, C) counts: rows = true class, columns = predicted class."""
    labels = np.asarray(labels, dtype=np.int64)
    preds = np.asarray(preds, dtype=np.int64)
    if labels.shape != preds.shape or labels.ndim != 1:
        raise ValueError(f"labels and preds must be 1-D of equal length, got {labels.shape} and {preds.shape}")
    for name, values in (("labels", labels), ("preds", preds)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} must be class indices in 0..{num_classes - 1}")
    return np.bincount(labels * num_classes + preds, minlength=num_classes * num_classes).reshape(num_classes,
                                                                                                  num_classes)


def per_class_report(cm: np.ndarray, class_names: Sequence[str]) -> list[dict]:
    """Precision, recall, F1 and support per class from a confusion matrix (0 where undefined)."""
    cm = np.asarray(cm, dtype=np.float64)
    if cm.shape != (len(class_names), len(class_names)):
        raise ValueError(f"confusion matrix has shape {cm.shape}, expected {len(class_names)} x {len(class_names)}")
    report = []
    for index, name in enumerate(class_names):
        true_positive = cm[index, index]
        predicted, support = cm[:, index].sum(), cm[index, :].sum()
        precision = true_positive / predicted if predicted else 0.0
        recall = true_positive / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        report.append({"class": name, "precision": float(precision), "recall": float(recall), "f1": float(f1),
                       "support": int(support)})
    return report


def new_figure(width: float, height: float):
    """A matplotlib Figure on its own Agg canvas (no pyplot state); size in inches at 100 dpi."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure, path: str | os.PathLike) -> None:
    """The figure as a PNG at ``path``, written atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    fileio.write_bytes(path, buffer.getvalue())


# training_curves.png: per panel its title and curves (record key, legend label, colour); a key
# the records lack (older runs have no val_logloss_calibrated) is left out.
CURVE_PANELS = (
    ("Loss", (("train_loss", "train loss", "tab:blue"), ("val_loss", "val loss (objective)", "tab:orange"),
              ("val_logloss", "val log loss (metric)", "tab:green"),
              ("val_logloss_calibrated", "val log loss after temperature scaling", "tab:red"))),
    ("Accuracy", (("train_acc", "train accuracy", "tab:blue"), ("val_acc", "val accuracy", "tab:orange"))),
    ("Learning rate (end of epoch)", (("lr", "learning rate", "tab:gray"),)),
)


def _values_by_epoch(history: list[dict], key: str, folds: list) -> tuple[np.ndarray, np.ndarray]:
    """Epochs (E,) and float64 (E, folds) values of ``key``; NaN where a fold has no such epoch
    (it stopped early) or the record lacks the key."""
    epochs = np.array(sorted({int(row["epoch"]) for row in history}))
    values = np.full((len(epochs), len(folds)), np.nan)
    column = {fold: index for index, fold in enumerate(folds)}
    for row in history:
        values[np.searchsorted(epochs, int(row["epoch"])), column[row.get("fold")]] = row.get(key, np.nan)
    return epochs, values


def _mark_selected(axes, selected: list[int], folds: list) -> None:
    """The epoch whose weights were kept: a dashed line (one split), or with folds a tick at the
    bottom per selected epoch, with the number of folds that selected it."""
    if len(folds) == 1:
        axes.axvline(selected[0], color="black", linestyle="--", linewidth=1, label=f"selected epoch {selected[0]}")
        return
    epochs, counts = np.unique(selected, return_counts=True)
    axes.vlines(epochs, 0.0, 0.08, transform=axes.get_xaxis_transform(), color="black", linewidth=2,
                label="selected epoch of each fold (count above the tick)")
    for epoch, count in zip(epochs.tolist(), counts.tolist()):
        axes.text(epoch, 0.1, str(count), transform=axes.get_xaxis_transform(), ha="center", fontsize="small")


def training_curves_figure(history: list[dict], selected_epochs: Sequence[int] | None = None):
    """The Figure of training_curves.png: losses (train, val, val log loss before and after the
    temperature), accuracies and learning rate against epoch (integer ticks). For the records of a
    --folds K run (they carry "fold") each curve is the mean over the folds with a min-max band, so
    the figure reads the same for K = 2 or 24. ``selected_epochs``: the best epoch (one split) or
    each fold's, in fold order, marked on every panel. The legend sits below the panels."""
    from matplotlib.ticker import MaxNLocator

    if not history:
        raise ValueError("no epochs to plot")
    folds = sorted({row["fold"] for row in history if "fold" in row}) or [None]
    figure = new_figure(15, 5.5)
    figure.set_layout_engine("constrained")
    panels = figure.subplots(1, len(CURVE_PANELS))
    for axes, (title, curves) in zip(panels, CURVE_PANELS):
        for key, label, colour in curves:
            epochs, values = _values_by_epoch(history, key, folds)
            if np.isnan(values).all():
                continue
            mean = np.nanmean(values, axis=1) if len(folds) > 1 else values[:, 0]
            axes.plot(epochs, mean, marker="o", markersize=3, color=colour, label=label)
            if len(folds) > 1:
                axes.fill_between(epochs, np.nanmin(values, axis=1), np.nanmax(values, axis=1), color=colour,
                                  alpha=0.2, linewidth=0)
        if selected_epochs:
            _mark_selected(axes, [int(epoch) for epoch in selected_epochs], folds)
        axes.set_title(title)
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    if len(folds) > 1:
        figure.suptitle(f"{len(folds)} folds: line = mean over the folds, band = min to max")
    handles = {}
    for axes in panels:
        for handle, label in zip(*axes.get_legend_handles_labels()):
            handles.setdefault(label, handle)  # the selected-epoch mark is on every panel: one entry
    marks = [label for label in handles if label.startswith("selected epoch")]
    labels = [label for label in handles if label not in marks] + marks
    figure.legend([handles[label] for label in labels], labels, loc="outside lower center", ncols=4,
                  fontsize="small")
    return figure


def plot_training_curves(history: list[dict], path: str | os.PathLike,
                         selected_epochs: Sequence[int] | None = None) -> None:
    """``training_curves_figure`` as a PNG at ``path``."""
    save_figure(training_curves_figure(history, selected_epochs), path)


def plot_confusion_matrix(cm: np.ndarray, class_names: Sequence[str], path: str | os.PathLike) -> None:
    """Row-normalised confusion matrix (colour = share of the true class) with counts, as a PNG."""
    cm = np.asarray(cm)
    num_classes = len(class_names)
    if cm.shape != (num_classes, num_classes):
        raise ValueError(f"confusion matrix has shape {cm.shape}, expected {num_classes} x {num_classes}")
    row_totals = cm.sum(axis=1, keepdims=True)
    shares = np.divide(cm, row_totals, out=np.zeros(cm.shape, dtype=np.float64), where=row_totals > 0)
    size = 2.5 + 0.8 * num_classes
    figure = new_figure(size + 1.5, size)
    axes = figure.subplots()
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, label="share of true class")
    axes.set_xticks(range(num_classes), labels=class_names, rotation=45, ha="right")
    axes.set_yticks(range(num_classes), labels=class_names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    for row in range(num_classes):
        for col in range(num_classes):
            axes.text(col, row, str(int(cm[row, col])), ha="center", va="center", fontsize=8,
                      color="white" if shares[row, col] > 0.5 else "black")
    axes.set_title("Validation confusion matrix")
    figure.tight_layout()
    save_figure(figure, path)
