"""Where a model fails, as tables and pictures: per-site scores (``site_metrics.csv``), the
reliability diagram (``calibration.png``) and the images with the highest loss
(``top_losses.png``, what a user opens first to find label errors and hard sites).

Inputs are held-out predictions: validation probabilities, or out-of-fold ones with K folds.
Plots use ``metrics.new_figure`` (matplotlib's Agg canvas, no pyplot) and are written atomically.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
import pandas as pd

from dss.models import calibration
from dss import fileio, metrics

TOP_LOSSES_COLUMNS = 4  # tiles per row of top_losses.png


def site_metrics(sites: Sequence[str], labels: np.ndarray, probs: np.ndarray,
                 class_names: Sequence[str]) -> pd.DataFrame:
    """One row per site, worst log loss first: ``site``, ``images``, ``accuracy``, ``log_loss``
    (``metrics.log_loss`` of the site's rows), ``mean_true_prob`` (mean probability given to the
    true class), then the class mix: ``n_<class>`` images of each true class."""
    losses = metrics.image_log_losses(probs, labels)
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    sites = np.asarray([str(site) for site in sites])
    if sites.shape != labels.shape:
        raise ValueError(f"sites has {sites.size} entries but labels has {labels.size}")
    if probs.shape[1] != len(class_names):
        raise ValueError(f"probs have {probs.shape[1]} columns but there are {len(class_names)} class names")
    true_prob = probs[np.arange(labels.size), labels] / probs.sum(axis=1)
    correct = probs.argmax(axis=1) == labels
    rows = []
    for site in np.unique(sites):
        members = sites == site
        counts = np.bincount(labels[members], minlength=len(class_names))
        rows.append({"site": site, "images": int(members.sum()), "accuracy": float(correct[members].mean()),
                     "log_loss": float(losses[members].mean()), "mean_true_prob": float(true_prob[members].mean()),
                     **{f"n_{name}": int(count) for name, count in zip(class_names, counts)}})
    frame = pd.DataFrame(rows)
    return frame.sort_values(["log_loss", "site"], ascending=[False, True], kind="stable").reset_index(drop=True)


def write_site_metrics(path: str | os.PathLike, table: pd.DataFrame) -> None:
    """``site_metrics``'s table as a CSV (floats at full precision), written atomically."""
    fileio.write_text(path, table.to_csv(index=False, lineterminator="\n"))


def plot_calibration(probs: np.ndarray, labels: np.ndarray, path: str | os.PathLike,
                     num_bins: int = calibration.DEFAULT_BINS, subject: str = "validation") -> float:
    """Reliability diagram (accuracy against mean confidence per equal-width confidence bin, the
    diagonal = perfect calibration) above a histogram of the bins' image counts, the ECE in the
    title; a PNG at ``path``. ``subject`` names the predictions in the title. Returns the ECE."""
    bins = calibration.reliability(probs, labels, num_bins)
    ece = calibration.expected_calibration_error(probs, labels, num_bins)
    width = 1.0 / num_bins
    figure = metrics.new_figure(6, 7)
    diagram, histogram = figure.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    filled = bins["count"] > 0
    diagram.bar(bins["lower"][filled], bins["accuracy"][filled], width=width, align="edge",
                edgecolor="black", color="tab:blue", label="accuracy")
    diagram.bar(bins["lower"][filled], bins["confidence"][filled] - bins["accuracy"][filled], width=width,
                bottom=bins["accuracy"][filled], align="edge", color="tab:red", alpha=0.3, label="gap to confidence")
    diagram.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    diagram.set_ylim(0, 1)
    diagram.set_ylabel("accuracy")
    diagram.legend(loc="upper left")
    diagram.set_title(f"Reliability, {subject} ({int(bins['count'].sum())} images): ECE = {ece:.4f}")
    histogram.bar(bins["lower"], bins["count"], width=width, align="edge", edgecolor="black", color="tab:gray")
    histogram.set_xlim(0, 1)
    histogram.set_xlabel(f"confidence (top-class probability, {num_bins} bins)")
    histogram.set_ylabel("images")
    figure.tight_layout()
    metrics.save_figure(figure, path)
    return ece


def top_losses(probs: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, losses) of the ``k`` rows with the highest per-image log loss, highest first
    (ties: lower index first)."""
    losses = metrics.image_log_losses(probs, labels)
    order = np.argsort(-losses, kind="stable")[:max(int(k), 0)]
    return order, losses[order]


def plot_top_losses(images: np.ndarray, labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str],
                    path: str | os.PathLike, k: int = 16, ids: Sequence[str] | None = None) -> np.ndarray:
    """The ``k`` images (uint8 (N, H, W, 3)) with the highest loss in a grid, highest first; each
    tile titled with its id (when given), true class, predicted class with its probability, and
    loss. A PNG at ``path``; returns the indices shown, in order."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3 or images.shape[0] != len(labels):
        raise ValueError(f"images must be uint8 (N, H, W, 3) with N = {len(labels)}, got {images.dtype} {images.shape}")
    order, losses = top_losses(probs, labels, k)
    if order.size == 0:
        raise ValueError("no images to plot")
    probs = np.asarray(probs, dtype=np.float64)
    columns = min(TOP_LOSSES_COLUMNS, order.size)
    rows = math.ceil(order.size / columns)
    figure = metrics.new_figure(2.8 * columns, 3.6 * rows)  # room for the 4-line tile titles
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
    for tile, (index, loss) in zip(axes, zip(order, losses)):
        predicted = int(probs[index].argmax())
        head = f"{ids[index]}\n" if ids is not None else ""
        tile.imshow(images[index], interpolation="nearest")
        tile.set_title(f"{head}true: {class_names[int(labels[index])]}\n"
                       f"pred: {class_names[predicted]} ({probs[index, predicted]:.2f})\nloss {loss:.2f}", fontsize=8)
    for tile in axes:
        tile.axis("off")
    figure.suptitle(f"Top {order.size} losses", fontsize=10)
    figure.tight_layout()
    metrics.save_figure(figure, path)
    return order
