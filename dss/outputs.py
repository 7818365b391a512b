"""The files dss_train.py leaves behind, with the column names users and tests depend on.

Output dir: metrics.json, metrics.csv, splits.csv, val_predictions.csv, test_predictions.csv
(plots are drawn by dss.metrics). Every file is written atomically through dss.fileio.
Also the fixed ``[METRICS]`` stdout line that SageMaker ``metric_definitions`` regexes parse.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from dss import fileio

# Order of the per-epoch fields in metrics.csv and in metrics.json's "epochs" records.
EPOCH_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_logloss", "val_acc", "lr",
                "epoch_seconds", "train_images_per_s")
# Order of the fields on the stdout [METRICS] line (fixed: users' regexes depend on it).
METRICS_LINE_FIELDS = ("train_loss", "train_acc", "val_loss", "val_acc", "val_logloss")
SUMMARY_GLOB = "preprocessing_summary*.json"


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


def write_metrics(output_dir: str | Path, epochs: list[dict], best: dict, test: dict) -> None:
    """metrics.json ({"epochs", "best", "test"}) and metrics.csv (one row per epoch, EPOCH_FIELDS)."""
    output_dir = Path(output_dir)
    fileio.write_json(output_dir / "metrics.json", {"epochs": epochs, "best": best, "test": test})
    rows = [[int(record["epoch"])] + [_number(record[name]) for name in EPOCH_FIELDS[1:]] for record in epochs]
    fileio.write_text(output_dir / "metrics.csv", _csv_text(EPOCH_FIELDS, rows))


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
def read_skipped_test_ids(data_dir: str | Path) -> list[dict]:
    """Test images preprocess skipped, from ``preprocessing_summary*.json`` in ``data_dir``.

    Returns ``[{"id": ..., "reason": ..., ...}, ...]`` (possibly empty). The summary lists them
    under its test split's ``skipped`` entries; entries without an ``id`` cannot get a row.
    """
    skipped, seen = [], set()
    for path in sorted(Path(data_dir).glob(SUMMARY_GLOB)):
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: unreadable preprocessing summary ({exc})") from exc
        for entry in _test_skipped_entries(summary):
            if isinstance(entry, dict) and entry.get("id") and entry["id"] not in seen:
                seen.add(entry["id"])
                skipped.append(dict(entry))
    return skipped


def _test_skipped_entries(summary: dict) -> list:
    if not isinstance(summary, dict):
        return []
    splits = summary.get("splits")
    if isinstance(splits, dict) and isinstance(splits.get("test"), dict):
        return list(splits["test"].get("skipped") or [])
    if isinstance(splits, list):
        for item in splits:
            if isinstance(item, dict) and item.get("split") == "test":
                return list(item.get("skipped") or [])
    if isinstance(summary.get("test"), dict):
        return list(summary["test"].get("skipped") or [])
    return []


def submission_row_order(ids: Sequence[str], csv_rows: Sequence[int] | None, skipped: list[dict]) -> list[str]:
    """All test ids (written + skipped) in ``test_features.csv`` order when the row numbers are
    known for every one of them, else sorted."""
    skipped_rows = [entry.get("csv_row", entry.get("row")) for entry in skipped]
    all_ids = list(ids) + [entry["id"] for entry in skipped]
    if csv_rows is not None and all(isinstance(row, (int, np.integer)) for row in skipped_rows):
        rows = [int(row) for row in csv_rows] + [int(row) for row in skipped_rows]
        return [image_id for _, image_id in sorted(zip(rows, all_ids))]
    return sorted(all_ids)


def csv_rows_from_meta(meta: dict, count: int) -> list[int] | None:
    """Row numbers in test_features.csv recorded by preprocess, when present and complete."""
    for key in ("csv_row", "row", "row_index"):
        values = meta.get(key)
        if values is not None and len(values) == count:
            try:
                return [int(value) for value in values]
            except (TypeError, ValueError):
                return None
    return None


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
