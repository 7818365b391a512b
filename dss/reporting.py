"""What preprocess.py reports about a run: the summary files, and the contract training reads.

    summary = run_summary(plan, settings, output.describe())
    summary["splits"]["train"] = split_summary(result)
    text = summary_text(summary)

The summary (``preprocessing_summary.json``, one per shard: ``preprocessing_summary-0000i-of-0000K.json``)
lists, per split, every image that was listed but not written, as ``{"key", "id", "reason",
"message"[, "csv_row"][, "site"]}`` under ``splits.<split>.skipped``. That list is the one contract between
the two scripts besides the pickles: ``dss_train.py`` gives every skipped *test* id a row of
``test_predictions.csv`` (filled with the class prior), in ``test_features.csv`` order when
``csv_row`` is known. ``skip_entry`` makes each entry, ``split_summary`` writes the list, ``read_skipped_test_ids`` reads it.

Everything here builds text and dicts; ``dss.publishing`` writes them. Training imports this
module for the reader alone, so it imports nothing of the preprocess side at run time.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dss import cli, dataset

if TYPE_CHECKING:
    from dss.building import SplitResult
    from dss.planning import Plan, PreprocessSettings

SUMMARY_NAME = "preprocessing_summary"
SUMMARY_GLOB = f"{SUMMARY_NAME}*.json"
METADATA_COLUMNS = ("id", "site", "label", "source_key", "orig_width", "orig_height", "orig_mode", "was_grey")
LEAKAGE_EXAMPLES = 20  # ids / id pairs quoted in the summary per leakage kind


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


def resolved_input(uri: str) -> str:
    """An input as one data set is named in summaries: a folder as its absolute path, ``s3://`` with one
    trailing ``/`` (so ``./data``, ``data`` and ``/home/me/data`` are the same input)."""
    if str(uri).startswith("s3://"):
        return str(uri).rstrip("/") + "/"
    return os.path.realpath(uri)


def dataset_identity(settings: PreprocessSettings) -> dict:
    """Which data set a run writes: its input (resolved; for a ShardedByS3Key input the S3 URI that
    SageMaker shards) and the settings that decide the pixels. Two runs with the same identity may
    replace each other's files in an output folder; others may not (dss.publishing)."""
    return {"input": settings.dataset_uri or resolved_input(settings.input_uri), "image_size": settings.image_size,
            "resize_policy": settings.policy, "max_pixels": settings.max_pixels}


def recorded_identity(summary: dict) -> dict | None:
    """The ``dataset_identity`` a summary records, or None when it records none. A summary written
    before ``input_resolved`` existed names its input as given: resolved against the current folder."""
    try:
        return {"input": summary.get("input_resolved") or resolved_input(summary["input"]),
                "image_size": summary["image_size"], "resize_policy": summary["resize_policy"],
                "max_pixels": summary["max_pixels"]}
    except (KeyError, TypeError, AttributeError):
        return None


def run_summary(plan: Plan, settings: PreprocessSettings, output_text: str) -> dict:
    """The summary dict of a run before its splits are added (``files`` and ``splits`` start empty)."""
    return {
        "format_version": dataset.FORMAT_VERSION,
        "input": settings.input_uri,
        "input_resolved": dataset_identity(settings)["input"],
        "output": output_text,
        "mode": plan.mode,
        "image_size": settings.image_size,
        "resize_policy": settings.policy,
        "max_pixels": settings.max_pixels,
        "limit": settings.limit,
        "shard": {"index": settings.shard_index, "count": settings.num_shards},
        "class_names": plan.class_names,
        "files": {},
        "splits": {},
        "csv_problems": plan.csv_problems,
        "warnings": plan.warnings,
        "leakage": plan.leakage,
    }


def split_summary(result: SplitResult) -> dict:
    """One split's entry of the summary: counts, every skipped image, class/site/size counts, timing."""
    plan, data = result.plan, result.data
    written = 0 if data is None else len(data["ids"])
    summary = {
        "source": plan.source,
        "listed": plan.listed,
        "written": written,
        "skipped_count": len(result.skipped),
        "skip_reasons": dict(sorted(Counter(entry["reason"] for entry in result.skipped).items())),
        "skipped": result.skipped,
    }
    if plan.presharded:
        summary["in_other_shards"] = plan.in_other_shards  # CSV ids whose image went to another instance
    if data is not None:
        if data["labels"] is not None:
            counts = np.bincount(data["labels"], minlength=len(data["class_names"]))
            summary["class_counts"] = {name: int(n) for name, n in zip(data["class_names"], counts)}
        summary["site_counts"] = dict(sorted(Counter(data["sites"].tolist()).items()))
        # None for an empty shard (N = 0): no image, no share.
        summary["grey_share"] = round(float(np.mean(data["meta"]["was_grey"])), 4) if written else None
        sizes = Counter(f"{w}x{h}" for w, h in zip(data["meta"]["orig_width"].tolist(),
                                                     data["meta"]["orig_height"].tolist()))
        summary["orig_size_counts"] = dict(sorted(sizes.items(), key=lambda pair: (-pair[1], pair[0])))
    summary["notes"] = plan.notes
    summary["warnings"] = plan.warnings
    summary["timing"] = {
        "seconds": round(result.seconds, 3),
        "images_per_second": round(written / result.seconds, 1) if result.seconds > 0 else None,
        **result.source_stats,
    }
    return summary


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


def leakage_report(results: list[SplitResult], class_names: list[str]) -> tuple[dict, list[str]]:
    """Ids and identical image files (sha256 of the bytes) in both train and test, and classes
    with no train image. Policy: warnings, not errors (the test split carries no labels, so they
    cannot corrupt training; they do make test predictions meaningless for those images)."""
    # An empty shard's split (N = 0) has nothing to compare, and no class "missing" from it matters.
    by_split = {result.plan.name: result for result in results if result.data is not None and len(result.data["ids"])}
    report, warnings = {}, []
    train, test = by_split.get("train"), by_split.get("test")
    if train is not None and test is not None:
        shared_ids = sorted(set(train.data["ids"].tolist()) & set(test.data["ids"].tolist()))
        report["ids_in_both_splits"] = {"count": len(shared_ids), "examples": shared_ids[:LEAKAGE_EXAMPLES]}
        if shared_ids:
            warnings.append(f"{len(shared_ids)} id(s) are in both train and test, e.g. {shared_ids[:3]}: "
                            "check that the features CSVs are not mixed up")
        train_id_of = {}
        for image_id, digest in zip(train.data["ids"].tolist(), train.content_sha256):
            train_id_of.setdefault(digest, image_id)
        pairs = sorted((train_id_of[digest], image_id)
                       for image_id, digest in zip(test.data["ids"].tolist(), test.content_sha256)
                       if digest in train_id_of)
        report["images_in_both_splits"] = {"count": len(pairs), "examples": [list(p) for p in pairs[:LEAKAGE_EXAMPLES]]}
        if pairs:
            warnings.append(f"{len(pairs)} test image(s) are byte-identical to a train image (train id, test id), "
                            f"e.g. {pairs[:3]}: the same photo is in both splits")
    if train is not None and train.data["labels"] is not None and class_names:
        counts = np.bincount(train.data["labels"], minlength=len(class_names))
        missing = [name for name, count in zip(class_names, counts.tolist()) if count == 0]
        report["classes_without_train_images"] = missing
        if missing:
            warnings.append(f"class(es) {missing} have no train image: the model can never learn them")
    return report, warnings


def add_leakage(plan: Plan, results: list[SplitResult]) -> None:
    """Fill ``plan.leakage``; each leakage warning becomes a ``WARNING:`` log line and a summary warning."""
    plan.leakage, warnings = leakage_report(results, plan.class_names)
    for warning in warnings:
        cli.log.info(f"WARNING: {warning}")
    plan.warnings.extend(warnings)


def strict_problem(summary: dict, summary_location: str) -> str | None:
    """--strict: one line naming how many images were skipped / CSV rows rejected, or None."""
    skipped = sum(split["skipped_count"] for split in summary["splits"].values())
    rejected = len(summary["csv_problems"])
    if not skipped and not rejected:
        return None
    return (f"--strict: {skipped} image(s) skipped and {rejected} CSV row(s) rejected; the outputs were written, "
            f"but the run fails. Each one is listed with its key and reason in {summary_location}")
