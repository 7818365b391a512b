"""The preprocessing summaries as training reads them (``preprocessing_summary*.json`` in a data
dir, one per shard; written by ``dss.ingest``): the test images preprocess skipped, which still get
a row of test_predictions.csv, and the per-split counts MLflow records. An unreadable summary is an
error naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

SUMMARY_NAME = "preprocessing_summary"
SUMMARY_GLOB = f"{SUMMARY_NAME}*.json"


def _summary_splits(data_dir: str | Path, read) -> None:
    """Call ``read(splits)`` with the ``splits`` dict of every shard's summary in ``data_dir``; a
    summary that cannot be read or lacks what ``read`` needs is an error naming the file."""
    for path in sorted(Path(data_dir).glob(SUMMARY_GLOB)):
        try:
            read(json.loads(path.read_text(encoding="utf-8"))["splits"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path}: unreadable preprocessing summary ({type(exc).__name__}: {exc}); "
                             "re-run preprocess.py") from exc


def read_skipped_test_ids(data_dir: str | Path) -> list[dict]:
    """Test images preprocess skipped, from ``preprocessing_summary*.json`` in ``data_dir``.

    Returns the entries of ``splits.test.skipped`` (``{key, id, reason, message[, csv_row][, site]}``;
    summaries written before skip entries carried the site lack it: read it as ''), one per id,
    across all shards' summaries; empty when no summary lists a test split.
    """
    skipped: dict[str, dict] = {}

    def read(splits: dict) -> None:
        for entry in splits.get("test", {}).get("skipped", []):
            # One id can be skipped more than once (e.g. its first file undecodable, the others
            # duplicate_id); it still gets a single row.
            skipped.setdefault(entry["id"], dict(entry))

    _summary_splits(data_dir, read)
    return list(skipped.values())


def read_split_counts(data_dir: str | Path) -> dict[str, int]:
    """Per split, images ``listed``, ``written`` and ``skipped`` by preprocess, summed over every
    shard's summary in ``data_dir``: ``{"train.listed": 1200, "train.written": 1198, ...}``. Empty
    when there is no summary (pickles made some other way)."""
    counts: dict[str, int] = {}
    for path in sorted(Path(data_dir).glob(SUMMARY_GLOB)):
        try:
            splits = json.loads(path.read_text(encoding="utf-8"))["splits"]
            for split, entry in splits.items():
                for field, key in (("listed", "listed"), ("written", "written"), ("skipped", "skipped_count")):
                    counts[f"{split}.{field}"] = counts.get(f"{split}.{field}", 0) + int(entry[key])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path}: unreadable preprocessing summary ({type(exc).__name__}: {exc}); "
                             "re-run preprocess.py") from exc
    return counts
