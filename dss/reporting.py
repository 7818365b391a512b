"""What preprocess.py reports about a run: the summary files, and the contract training reads.

The summary (``preprocessing_summary.json``, one per shard: ``preprocessing_summary-0000i-of-0000K.json``)
lists, per split, every image that was listed but not written, as ``{"key", "id", "reason",
"message"[, "csv_row"]}`` under ``splits.<split>.skipped``. That list is the one contract between
the two scripts besides the pickles: ``dss_train.py`` gives every skipped *test* id a row of
``test_predictions.csv`` (filled with the class prior), in ``test_features.csv`` order when
``csv_row`` is known. ``read_skipped_test_ids`` is its reader; the writer lives in this module too.
"""

from __future__ import annotations

import json
from pathlib import Path

from dss import dataset

SUMMARY_NAME = "preprocessing_summary"
SUMMARY_GLOB = f"{SUMMARY_NAME}*.json"


def file_names(num_shards: int, shard_index: int) -> dict[str, str]:
    """The files one preprocess run writes: ``{"train_data": "train_data.pkl", "train_metadata": ...,
    "summary_json": ..., "summary_txt": ...}``; with K > 1 shards each name carries ``-0000i-of-0000K``."""
    suffix = "" if num_shards == 1 else f"-{shard_index:05d}-of-{num_shards:05d}"
    names = {f"{split}_data": dataset.split_filename(split, shard_index if num_shards > 1 else None,
                                                      num_shards if num_shards > 1 else None)
             for split in dataset.SPLITS}
    names.update({f"{split}_metadata": f"{split}_metadata{suffix}.csv" for split in dataset.SPLITS})
    names["summary_json"] = f"{SUMMARY_NAME}{suffix}.json"
    names["summary_txt"] = f"{SUMMARY_NAME}{suffix}.txt"
    return names


def read_skipped_test_ids(data_dir: str | Path) -> list[dict]:
    """Test images preprocess skipped, from ``preprocessing_summary*.json`` in ``data_dir``.

    Returns the entries of ``splits.test.skipped`` (``{key, id, reason, message[, csv_row]}``),
    one per id, across all shards' summaries; empty when no summary lists a test split.
    """
    skipped, seen = [], set()
    for path in sorted(Path(data_dir).glob(SUMMARY_GLOB)):
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
            entries = summary["splits"].get("test", {}).get("skipped", [])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path}: unreadable preprocessing summary ({type(exc).__name__}: {exc}); "
                             "re-run preprocess.py") from exc
        for entry in entries:
            # One id can be skipped more than once (e.g. its first file undecodable, the others
            # duplicate_id); it still gets a single row.
            if entry["id"] not in seen:
                seen.add(entry["id"])
                skipped.append(dict(entry))
    return skipped
