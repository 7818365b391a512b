"""What preprocess.py reports about a run: the summary files, and the contract training reads.

    summary = run_summary(plan, settings, output.describe())
    summary["splits"]["train"] = split_summary(result)
    text = records.summary_text(summary)

The summary (``preprocessing_summary.json``, one per shard: ``preprocessing_summary-0000i-of-0000K.json``)
lists, per split, every image that was listed but not written, as ``{"key", "id", "reason",
"message"[, "csv_row"][, "site"]}`` under ``splits.<split>.skipped``. That list is the one contract between
the two scripts besides the pickles: ``dss_train.py`` gives every skipped *test* id a row of
``test_predictions.csv`` (filled with the class prior), in ``test_features.csv`` order when
``csv_row`` is known. ``dss.ingest.records.skip_entry`` makes each entry, ``split_summary`` writes the list,
``dss.data.summaries`` (the reader training uses) reads it.

Everything here builds text and dicts; ``dss.ingest.publishing`` writes them.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from dss import cli
from dss.data import dataset
from dss.ingest.building import SplitResult
from dss.ingest.planning import Plan, PreprocessSettings
from dss.ingest.records import resolved_input

LEAKAGE_EXAMPLES = 20  # ids / id pairs quoted in the summary per leakage kind


def dataset_identity(settings: PreprocessSettings) -> dict:
    """Which data set a run writes: its input (resolved; for a ShardedByS3Key input the S3 URI that
    SageMaker shards) and the settings that decide the pixels. Two runs with the same identity may
    replace each other's files in an output folder; others may not (dss.ingest.publishing)."""
    return {"input": settings.dataset_uri or resolved_input(settings.input_uri), "image_size": settings.image_size,
            "resize_policy": settings.policy, "max_pixels": settings.max_pixels}


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
