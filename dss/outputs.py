"""The files dss_train.py leaves behind, with the column names users and tests depend on.

Output dir: metrics.json, metrics.csv, splits.csv, val_predictions.csv, test_predictions.csv
(plots are drawn by dss.metrics). Every file is written atomically through dss.fileio, and a
training run's files are published together (``StagedFiles``): a run that fails while writing
its outputs leaves the previous run's files as they were.
Also the fixed ``[METRICS]`` stdout line that SageMaker ``metric_definitions`` regexes parse.
"""

from __future__ import annotations

import csv
import io
import math
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from dss import fileio

# Order of the per-epoch fields in metrics.csv and in metrics.json's "epochs" records.
EPOCH_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_logloss", "val_acc", "lr",
                "epoch_seconds", "train_images_per_s")
# Order of the fields on the stdout [METRICS] line (fixed: users' regexes depend on it).
METRICS_LINE_FIELDS = ("train_loss", "train_acc", "val_loss", "val_acc", "val_logloss")


def metrics_line(record: dict) -> str:
    """``[METRICS] epoch=3 train_loss=0.4123 train_acc=0.8512 val_loss=0.5000 val_acc=0.8000 val_logloss=0.5100``"""
    values = " ".join(f"{name}={float(record[name]):.4f}" for name in METRICS_LINE_FIELDS)
    return f"[METRICS] epoch={int(record['epoch'])} {values}"


def _csv_text(header: Sequence[str], rows) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _number(value) -> str:
    # repr keeps every digit, so a log loss recomputed from the CSV matches metrics.json.
    value = float(value)
    return repr(value) if math.isfinite(value) else str(value)


def write_metrics(json_path: str | Path, csv_path: str | Path, epochs: list[dict], best: dict, test: dict) -> None:
    """metrics.json ({"epochs", "best", "test"}; an epoch record may carry more than EPOCH_FIELDS,
    e.g. "per_class") and metrics.csv (one row per epoch, exactly EPOCH_FIELDS)."""
    fileio.write_json(json_path, {"epochs": epochs, "best": best, "test": test})
    rows = [[int(record["epoch"])] + [_number(record[name]) for name in EPOCH_FIELDS[1:]] for record in epochs]
    fileio.write_text(csv_path, _csv_text(EPOCH_FIELDS, rows))


def write_splits(path: str | Path, ids: Sequence[str], sites: Sequence[str], is_val: np.ndarray) -> None:
    """splits.csv: id, site, split in {train, val}; one row per training image, pickle order."""
    rows = [[image_id, site, "val" if flag else "train"] for image_id, site, flag in zip(ids, sites, is_val)]
    fileio.write_text(path, _csv_text(("id", "site", "split"), rows))


def write_probabilities(path: str | Path, leading: dict[str, Sequence], probs: np.ndarray,
                        class_names: Sequence[str]) -> None:
    """A CSV with the ``leading`` columns (e.g. id, site, label) then one probability column per class."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(class_names):
        raise ValueError(f"{path}: probabilities have shape {probs.shape}, expected (N, {len(class_names)})")
    columns = list(leading.values())
    for name, column in leading.items():
        if len(column) != len(probs):
            raise ValueError(f"{path}: column '{name}' has {len(column)} rows, probabilities have {len(probs)}")
    rows = ([column[i] for column in columns] + [repr(float(p)) for p in probs[i]] for i in range(len(probs)))
    fileio.write_text(path, _csv_text(list(leading) + list(class_names), rows))


def normalise_rows(probs: np.ndarray) -> np.ndarray:
    """float64 copy whose rows sum to 1 (softmax in float32/bf16 is off by ~1e-7)."""
    probs = np.asarray(probs, dtype=np.float64)
    return probs / probs.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------- test rows
def submission_row_order(ids: Sequence[str], csv_rows: Sequence[int] | None, skipped: list[dict]) -> list[str]:
    """All test ids (written + skipped) in ``test_features.csv`` order when the row numbers are
    known for every one of them, else sorted."""
    skipped_rows = [entry.get("csv_row") for entry in skipped]
    all_ids = list(ids) + [entry["id"] for entry in skipped]
    if csv_rows is not None and all(row is not None for row in skipped_rows):
        rows = [int(row) for row in csv_rows] + [int(row) for row in skipped_rows]
        return [image_id for _, image_id in sorted(zip(rows, all_ids))]
    return sorted(all_ids)


def csv_rows_from_meta(meta: dict) -> list[int] | None:
    """Row numbers in test_features.csv that preprocess records as ``meta["csv_row"]`` (absent
    when the test images came without a CSV)."""
    values = meta.get("csv_row")
    return None if values is None else [int(value) for value in values]


def assemble_test_predictions(ids: Sequence[str], probs: np.ndarray, order: Sequence[str],
                              prior: np.ndarray) -> np.ndarray:
    """Probabilities in ``order``; ids without a prediction (skipped by preprocess) get ``prior``."""
    by_id = {image_id: index for index, image_id in enumerate(ids)}
    prior = np.asarray(prior, dtype=np.float64)
    out = np.empty((len(order), len(prior)), dtype=np.float64)
    for row, image_id in enumerate(order):
        index = by_id.get(image_id)
        out[row] = prior if index is None else probs[index]
    return normalise_rows(out)


# --------------------------------------------------------------------------- publishing a run's files
class StagedFiles:
    """A set of output files that replace their final names together, or not at all.

    Writers write to ``stage.path(final)`` (``<final's folder>/.staging-<pid>/<name>``, through
    dss.fileio as usual); ``publish()`` then ``os.replace``s every staged file onto its final name,
    in the order the paths were asked for (put the file whose presence means "run complete" last),
    after removing the names given to ``remove``. Used as a context manager, the staging folders
    are deleted on exit, so a failure before ``publish()`` leaves the final names untouched.
    """

    def __init__(self):
        self._staged: list[tuple[Path, Path]] = []  # (staged path, final path)
        self._remove: list[Path] = []
        self._folders: list[Path] = []

    def __enter__(self) -> "StagedFiles":
        return self

    def __exit__(self, *exc_info) -> None:
        self.discard()

    def path(self, final: str | os.PathLike) -> Path:
        """Where to write the file that will become ``final``."""
        final = Path(final)
        if any(final == known for _, known in self._staged) or final in self._remove:
            raise ValueError(f"{final} is staged twice")
        staging = fileio.staging_folder(final.parent)
        staging.mkdir(parents=True, exist_ok=True)
        if staging not in self._folders:
            self._folders.append(staging)
        staged = staging / final.name
        self._staged.append((staged, final))
        return staged

    def remove(self, final: str | os.PathLike) -> None:
        """Delete ``final`` at publish time, if it exists (an output this run does not produce)."""
        final = Path(final)
        if any(final == known for _, known in self._staged):
            raise ValueError(f"{final} is both staged and to be removed")
        self._remove.append(final)

    def publish(self) -> list[Path]:
        """Move every staged file onto its final name; returns the paths removed as stale.

        Every check that can fail is done before the first rename, so an error leaves all final
        names as they were (renames within one folder do not fail short of a crash)."""
        for staged, final in self._staged:
            if not staged.is_file():
                raise FileNotFoundError(f"{staged}: nothing was written for {final}")
        for final in [final for _, final in self._staged] + self._remove:
            if final.is_dir() and not final.is_symlink():
                raise IsADirectoryError(f"{final} is a directory: cannot replace it with this run's file; "
                                        "move it away and re-run")
        removed = []
        for final in self._remove:
            if final.is_file() or final.is_symlink():
                final.unlink()
                removed.append(final)
        for staged, final in self._staged:
            os.replace(staged, final)
        for folder in {final.parent for _, final in self._staged} | {final.parent for final in self._remove}:
            fileio.fsync_folder(folder)
        return removed

    def discard(self) -> None:
        """Delete the staging folders and whatever is still in them."""
        for folder in self._folders:
            shutil.rmtree(folder, ignore_errors=True)
        self._folders = []
