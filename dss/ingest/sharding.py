"""Which share of the data this run processes: --limit, then shard i of K.

    shard_index, num_shards, sharded_source = resolve_sharding(input_uri, None, None, True)
    apply_limit_and_shard(plan, source, settings)

Shards are contiguous ranges of each split's sorted ids, so K runs with the same input and
``--limit`` together cover every listed id exactly once. In a
SageMaker Processing job the shard comes from the job's hosts; a ShardedByS3Key input is already
this instance's share and is not sliced again.
"""

from __future__ import annotations

from dss import cli, sagemaker
from dss.ingest import sources
from dss.ingest.planning import Plan, PreprocessError, PreprocessSettings, SplitPlan, usage_hint


def limit_and_shard(plan: SplitPlan, limit: int | None, shard_index: int, num_shards: int) -> SplitPlan:
    """Keep the first ``limit`` ids (sorted), then this shard's contiguous share of them (unless the
    plan is ``presharded``: SageMaker already gave this instance its share of the images)."""
    entries = sorted([(item.id, 0, item) for item in plan.items] + [(s["id"], 1, s) for s in plan.skipped],
                     key=lambda entry: (entry[0], entry[1]))
    if limit is not None:
        entries = entries[:limit]
    if num_shards > 1 and not plan.presharded:
        count = len(entries)
        entries = entries[shard_index * count // num_shards:(shard_index + 1) * count // num_shards]
    plan.items = [entry[2] for entry in entries if entry[1] == 0]
    plan.skipped = [entry[2] for entry in entries if entry[1] == 1]
    return plan


def apply_limit_and_shard(plan: Plan, source: sources.Source, settings: PreprocessSettings) -> None:
    """``limit_and_shard`` every split, then refuse a dataset left with no image to process."""
    for split_plan in plan.splits:
        limit_and_shard(split_plan, settings.limit, settings.shard_index, settings.num_shards)
    train_plan = next((p for p in plan.splits if p.name == "train"), None)
    if train_plan is not None and train_plan.listed == 0 and settings.num_shards == 1:
        raise PreprocessError(f"empty dataset: {source.describe(settings.layout.train_labels)} has no usable "
                              f"labelled rows ({len(plan.csv_problems)} row(s) rejected)")
    if not any(p.listed for p in plan.splits):
        raise PreprocessError(f"empty dataset: no images to process in {source.describe()}.\n{usage_hint()}")


def resolve_sharding(input_uri: str, shard_index: int | None, num_shards: int | None,
                     use_processing_config: bool) -> tuple[int, int, str | None]:
    """(shard_index, num_shards, sharded_source) for this run. Explicit flags win; else, in a SageMaker
    Processing job, this host's index among the job's hosts. ``sharded_source``: when --input is (in) a
    ShardedByS3Key input, that input's S3 URI (SageMaker already gave this instance its share, so
    nothing is sliced again, and the URI names the data set every instance writes); else None."""
    job = sagemaker.load_job() if use_processing_config else None
    if job is not None and shard_index is None and num_shards is None:
        shard_index, num_shards = job.shard_index, job.num_shards
        cli.log.info(f"SageMaker Processing job ({job.config_dir / sagemaker.RESOURCE_CONFIG}): host "
                     f"{job.current_host} of {list(job.hosts)} -> shard {shard_index} of {num_shards} "
                     "(--num-shards/--shard-index override)")
    sharded_input = (job.sharded_input_for(input_uri)
                     if job is not None and not sources.is_s3_uri(input_uri) else None)
    if sharded_input is not None:
        cli.log.info(f"--input {input_uri} is the ShardedByS3Key input '{sharded_input.name}' "
                     f"({sharded_input.source}): processing every image SageMaker put here, without slicing "
                     "again; CSV ids whose image went to another instance are counted as in_other_shards")
    return shard_index or 0, num_shards or 1, None if sharded_input is None else sharded_input.source
