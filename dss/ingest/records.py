"""The plain records of a preprocess run, below everything that plans and builds it: the file names
one run writes, a skipped image's summary entry, which data set a summary records, the metadata CSV
and the summary's text. Dicts and strings only, so ``dss.ingest.planning`` and
``dss.ingest.building`` use them without importing the reporting that sits above them.
"""

from __future__ import annotations

import csv
import io
import os

from dss.data import dataset, summaries

SUMMARY_NAME = summaries.SUMMARY_NAME
METADATA_COLUMNS = ("id", "site", "label", "source_key", "orig_width", "orig_height", "orig_mode", "was_grey")


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


def skip_entry(key: str, image_id: str, reason: str, message: str, csv_row: int = -1, site: str = "") -> dict:
    """A skipped image as the summary lists it: ``{key, id, reason, message[, csv_row][, site]}``
    (``site`` when the features CSV gives one, so predictions.csv can name it)."""
    entry = {"key": key, "id": image_id, "reason": reason, "message": message}
    if csv_row >= 0:
        entry["csv_row"] = csv_row
    if site:
        entry["site"] = site
    return entry


def resolved_input(uri: str) -> str:
    """An input as one data set is named in summaries: a folder as its absolute path, ``s3://`` with one
    trailing ``/`` (so ``./data``, ``data`` and ``/home/me/data`` are the same input)."""
    if str(uri).startswith("s3://"):
        return str(uri).rstrip("/") + "/"
    return os.path.realpath(uri)


def recorded_identity(summary: dict) -> dict | None:
    """The ``dataset_identity`` a summary records, or None when it records none. A summary written
    before ``input_resolved`` existed names its input as given: resolved against the current folder."""
    try:
        return {"input": summary.get("input_resolved") or resolved_input(summary["input"]),
                "image_size": summary["image_size"], "resize_policy": summary["resize_policy"],
                "max_pixels": summary["max_pixels"]}
    except (KeyError, TypeError, AttributeError):
        return None


def metadata_csv(data: dict) -> str:
    """``<split>_metadata.csv``: one row per pickle row, in the same order (METADATA_COLUMNS)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(METADATA_COLUMNS)
    meta = data["meta"]
    names = data["class_names"]
    for row, image_id in enumerate(data["ids"].tolist()):
        label = names[int(data["labels"][row])] if data["labels"] is not None else ""
        writer.writerow([image_id, data["sites"][row], label, meta["source_key"][row], int(meta["orig_width"][row]),
                         int(meta["orig_height"][row]), meta["orig_mode"][row],
                         "true" if meta["was_grey"][row] else "false"])
    return buffer.getvalue()


def summary_text(summary: dict) -> str:
    """``preprocessing_summary.txt``: the summary dict for people, every skipped image on its own line."""
    lines = ["PREPROCESSING SUMMARY", "=" * 60,
             f"input:         {summary['input']}",
             f"output:        {summary['output']}",
             f"image size:    {summary['image_size']} x {summary['image_size']} ({summary['resize_policy']})",
             f"max pixels:    {summary['max_pixels']}",
             f"classes:       {', '.join(summary['class_names']) or '(none: unlabelled images)'}",
             f"wall time:     {summary['timing']['seconds']} s"]
    for name, split in summary["splits"].items():
        lines += ["", f"[{name}] from {split['source']}",
                  f"  listed {split['listed']} = written {split['written']} + skipped {split['skipped_count']}"]
        if "in_other_shards" in split:
            lines.append(f"  in other shards: {split['in_other_shards']} CSV id(s) not listed here: their images "
                         "were given to other instances (ShardedByS3Key input)")
        timing = split["timing"]
        lines.append(f"  {timing['seconds']} s, {timing['images_per_second']} images/s")
        if "class_counts" in split:
            lines.append("  classes: " + ", ".join(f"{k} {v}" for k, v in split["class_counts"].items()))
        if "site_counts" in split:
            grey = "" if split["grey_share"] is None else f"; grey share {split['grey_share']:.1%}"
            lines.append(f"  sites: {len(split['site_counts'])}{grey}")
        for reason, number in split["skip_reasons"].items():
            lines.append(f"  skipped {reason}: {number}")
        for entry in split["skipped"]:
            lines.append(f"    - {entry['key']} (id {entry['id']}): {entry['reason']}: {entry['message']}")
        for key, value in split["notes"].items():
            lines.append(f"  {key}: {value}")
        for warning in split["warnings"]:
            lines.append(f"  warning: {warning}")
    if summary["csv_problems"]:
        lines += ["", f"CSV rows rejected: {len(summary['csv_problems'])}"]
        lines += [f"  - {p['file']} line {p['line']} (id {p['id']}): {p['reason']}" for p in summary["csv_problems"]]
    if summary["warnings"]:
        lines += ["", "Warnings:"] + [f"  - {warning}" for warning in summary["warnings"]]
    return "\n".join(lines) + "\n"
