"""The prediction files users read and submit, written the same way by a training run and by
--predict-only: test_predictions.csv (the competition's submission: id, then one probability column
per class, rows in test_features.csv order) and predictions.csv (the same rows, readable: id, site,
predicted class, its probability, status, then the class probabilities). Images preprocess skipped
(named in its summaries) get a row filled with the training class prior and say so in ``status``.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

import numpy as np

from dss import fileio
from dss.cli import log
from dss.data import summaries

# The submission (id, then one probability column per class) and its readable twin: these
# columns, then the same probability columns. "status" is PREDICTED, or SKIPPED_STATUS + the reason
# preprocess skipped the image (its probabilities are then the training class prior).
TEST_PREDICTIONS = "test_predictions.csv"
PREDICTIONS = "predictions.csv"
PREDICTIONS_COLUMNS = ("id", "site", "predicted_class", "probability", "status")
PREDICTED, SKIPPED_STATUS = "predicted", "skipped: "



def csv_text(header: Sequence[str], rows) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


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
    fileio.write_text(path, csv_text(list(leading) + list(class_names), rows))


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


def predictions_dir(model_dir: str | Path, data_dir: str | Path) -> Path:
    """--predict-only's default output folder: ``<model dir>/predictions/<data dir's name>``, one per
    data set, apart from the training run's outputs."""
    return Path(model_dir) / "predictions" / (Path(data_dir).resolve().name or "data")


def write_readable_predictions(path: str | Path, order: Sequence[str], sites: dict[str, str], probs: np.ndarray,
                               class_names: Sequence[str], skipped_reasons: dict[str, str]) -> None:
    """predictions.csv: per image its id, site ('' where unknown), the most probable class and its
    probability, its status ('predicted', or 'skipped: <reason>' for an id in ``skipped_reasons``,
    whose row is the class prior), then every class probability (the rows and values of the submission)."""
    top = np.argmax(probs, axis=1)
    status = [SKIPPED_STATUS + skipped_reasons[image_id] if image_id in skipped_reasons else PREDICTED
              for image_id in order]
    columns = (list(order), [sites.get(image_id, "") for image_id in order], [class_names[k] for k in top],
               [repr(float(probs[row, k])) for row, k in enumerate(top)], status)
    write_probabilities(path, dict(zip(PREDICTIONS_COLUMNS, columns)), probs, class_names)


def write_test_predictions(paths: tuple[Path, Path], data_dir: Path, test: dict, probs: np.ndarray,
                           prior: np.ndarray, class_names: list[str]) -> dict:
    """Write test_predictions.csv (the submission) to ``paths[0]`` and predictions.csv to
    ``paths[1]``: every test id, the ones preprocess skipped (named in its summaries in
    ``data_dir``) filled with ``prior``; ``probs`` float64 (N_test, C) in the split's row order.
    Returns a summary for metrics.json."""
    skipped = summaries.read_skipped_test_ids(data_dir)
    written = set(test["ids"])
    skipped = [entry for entry in skipped if entry["id"] not in written]
    csv_rows = csv_rows_from_meta(test["meta"])
    order = submission_row_order(test["ids"], csv_rows, skipped)
    table = assemble_test_predictions(test["ids"], probs, order, prior)
    write_probabilities(paths[0], {"id": order}, table, class_names)
    # Skip entries carry the site from the features CSV (summaries of older preprocess runs do not: '').
    sites = {entry["id"]: str(entry.get("site", "")) for entry in skipped} | dict(zip(test["ids"], test["sites"]))
    write_readable_predictions(paths[1], order, sites, table, class_names,
                               {entry["id"]: str(entry["reason"]) for entry in skipped})
    if skipped:
        log.info(f"warning: {len(skipped)} test image(s) skipped by preprocess got the training class prior: "
                 + ", ".join(f"{entry['id']} ({entry['reason']})" for entry in skipped[:10])
                 + (" ..." if len(skipped) > 10 else ""))
    return {"num_images": len(order), "num_predicted": len(test["ids"]),
            "filled_with_prior": [entry["id"] for entry in skipped],
            "row_order": "test_features.csv" if csv_rows is not None else "sorted ids"}
