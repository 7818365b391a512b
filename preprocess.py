"""Images (s3://bucket/prefix/ or a local folder) -> resized uint8 arrays -> pickles + summary.

    python preprocess.py --input s3://animal-classification-dss-works/data/ --output-dir ./output
    python preprocess.py --input ./data --output-dir ./output                # same layout, local folder
    python preprocess.py --output-dir ./output                               # --input defaults to ./data
    python preprocess.py --input ./data --output-dir ./output --limit 200    # quick run: 200 ids per split
    python preprocess.py --input ./new_deployment/ --output-dir ./new_out    # images only, no CSVs: all test
    python preprocess.py --input s3://bucket/data/ --output-dir s3://bucket/preprocessed/
    AWS_ENDPOINT_URL=http://localhost:9000 python preprocess.py --input s3://bucket/data/ --output-dir ./output
    AWS_REQUEST_CHECKSUM_CALCULATION=when_required python preprocess.py ...  # S3-compatible stores
    python preprocess.py --input ./data --output-dir ./output --num-shards 4 --shard-index 0   # 1 of 4 runs
    python preprocess.py --input /opt/ml/processing/images --csv-dir /opt/ml/processing/csv \
        --output-dir /opt/ml/processing/output   # SageMaker Processing job: shard i of K from /opt/ml/config
    python preprocess.py --input ./data --output-dir ./output --strict      # any skip -> exit 3

Input layout (Conser-vision): train_labels.csv (id + one-hot class columns, or id + label),
train_features.csv / test_features.csv (id, filepath, site), images in train_features/ and
test_features/. The image for an id is its ``filepath`` (relative to the input root), else
``<train-dir>/<id>.<jpg|jpeg|png|no extension>``. A folder/prefix with no CSVs at all is taken as
test images, ids from the file names; but when a subfolder holds the CSVs (``./data/demo/``), the
run stops and names that folder for ``--input`` rather than mixing every image below into TEST.

Pipeline: list (paginated) -> download (threads) -> decode + resize (processes) -> each array goes
straight into a preallocated (N, S, S, 3) uint8 block, rows in sorted-id order -> write, atomically:
train_data.pkl, test_data.pkl (see dss/data/dataset.py), train_metadata.csv, test_metadata.csv,
preprocessing_summary.txt and preprocessing_summary.json. Every skipped object is listed in both
summaries with its key and reason; per split, listed = written + skipped. Re-running on the same
input gives byte-identical pickles (nothing from the clock goes into them; timings live under the
summaries' "timing" keys only). A download that fails after all retries is skipped and recorded;
the run fails when every image of a split is skipped; with ``--strict`` any skipped image or
rejected CSV row fails the run (exit 3) after the summaries are written. Leakage checks: an id
or an identical image file (sha256 of the bytes) in both train and test, and a class with no train
image, are warnings in the summaries (the test split is unlabelled, so they do not corrupt
training; they do make test predictions meaningless for those images). S3 bodies are checked against S3's
checksum (or an MD5 ETag) and refetched when they arrived corrupt (see dss/ingest/sources.py). A write
that fails (disk full) stops the run with the path and errno; nothing partial is left under a
final name. An output folder holds one data set: a run of another input (or other --image-size,
--resize, --max-pixels) into it stops before any work unless --overwrite. This script never imports torch.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from dss.ingest import building, labels, publishing, records, reporting, sharding, sources
from dss import cli, images, sagemaker, threads
from dss.ingest.planning import Layout, PreprocessError, PreprocessSettings, plan_dataset, usage_hint
from dss.ingest import storage

DEFAULT_INPUT = "./data"
STRICT_EXIT_CODE = 3  # --strict: the run completed but skipped something


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=cli.HelpFormatter)
    parser.add_argument("--input", default=DEFAULT_INPUT, help="s3://bucket/prefix/ or a folder")
    parser.add_argument("--output-dir", default="./output", help="folder or s3://bucket/prefix/")
    parser.add_argument("--image-size", type=cli.image_size, default=224,
                        help=f"stored square size in px, {cli.MIN_IMAGE_SIZE} (ResNet18 halves it five times) to "
                             f"{cli.MAX_IMAGE_SIZE} (48 MiB per image)")
    parser.add_argument("--resize", choices=images.RESIZE_POLICIES, default="squash",
                        help="squash (whole frame), crop (centre) or pad (black border)")
    parser.add_argument("--workers", type=cli.positive_int, default=None,
                        help="decode processes; 1 decodes in this process (default: the CPUs this process may use, "
                             f"{threads.allowed_cpus()} here)")
    parser.add_argument("--download-threads", type=cli.positive_int, default=sources.DEFAULT_DOWNLOAD_THREADS,
                        help="concurrent S3 downloads / file reads")
    parser.add_argument("--endpoint-url", default=None,
                        help="S3 endpoint (else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / AWS)")
    parser.add_argument("--max-attempts", type=cli.positive_int, default=None,
                        help="S3 attempts per request, first try included (default: AWS_MAX_ATTEMPTS / the AWS "
                             f"config file's max_attempts, else {sources.DEFAULT_MAX_ATTEMPTS})")
    parser.add_argument("--read-timeout", type=float, default=sources.DEFAULT_READ_TIMEOUT_S,
                        help="S3 socket read timeout in seconds")
    parser.add_argument("--no-etag-check", action="store_true",
                        help="do not check S3 bodies against MD5 ETags (for stores whose ETags are not MD5s; "
                             "S3 checksums are still checked)")
    parser.add_argument("--limit", type=cli.positive_int, default=None, help="first N ids per split (quick runs)")
    parser.add_argument("--max-pixels", type=cli.positive_int, default=images.DEFAULT_MAX_PIXELS,
                        help="refuse images with more pixels than this (decompression bombs)")
    parser.add_argument("--max-object-mb", type=float, default=sources.DEFAULT_MAX_OBJECT_BYTES / 2**20,
                        help="refuse objects larger than this many MiB, from the listing, before download")
    parser.add_argument("--train-labels", default=Layout.train_labels,
                        help="labels CSV (id + one-hot class columns, or id + label), relative to --input")
    parser.add_argument("--train-features", default=Layout.train_features,
                        help="train CSV with id, filepath, site, relative to --input")
    parser.add_argument("--test-features", default=Layout.test_features,
                        help="test CSV with id, filepath, site, relative to --input")
    parser.add_argument("--train-dir", default=Layout.train_dir,
                        help="folder of train images when the CSV has no filepath")
    parser.add_argument("--test-dir", default=Layout.test_dir,
                        help="folder of test images when the CSV has no filepath")
    parser.add_argument("--num-shards", type=cli.positive_int, default=None,
                        help="split every split's sorted ids into K contiguous shards (default 1, or the "
                             "SageMaker Processing job's instance count) ...")
    parser.add_argument("--shard-index", type=cli.non_negative_int, default=None,
                        help="... and process shard i (default 0, or this instance's index among the job's hosts)")
    parser.add_argument("--auto-shard", type=cli.str2bool, default=True, metavar="{true,false}",
                        help="in a SageMaker Processing job (/opt/ml/config/resourceconfig.json, or "
                             f"${sagemaker.CONFIG_DIR_ENV}/), take shard i of K from the job's hosts and treat a "
                             "ShardedByS3Key --input as already sharded; explicit --num-shards/--shard-index win")
    parser.add_argument("--csv-dir", default=None,
                        help="folder or s3:// prefix holding the CSVs (default: --input); their filepath column "
                             "stays relative to --input. Needed when --input is a ShardedByS3Key input")
    parser.add_argument("--overwrite", type=cli.str2bool, nargs="?", const=True, default=False, metavar="{true,false}",
                        help="replace another data set's files in --output-dir (else the run stops, touching nothing)")
    parser.add_argument("--strict", action="store_true",
                        help=f"exit {STRICT_EXIT_CODE} (after writing the summaries) if any image was skipped "
                             "or any CSV row rejected: a clean dataset or a failing run")
    parser.add_argument("--quiet", action="store_true", help="only errors")
    args = parser.parse_args(argv)
    explicit = args.shard_index is not None or args.num_shards is not None  # the other one defaults
    if explicit and (args.shard_index or 0) >= (args.num_shards or 1):
        parser.error(f"--shard-index {args.shard_index} must be below --num-shards {args.num_shards or 1}")
    return args


def run(source: sources.Source, output: sources.Output, settings: PreprocessSettings,
        csv_source: sources.Source | None = None) -> dict:
    """The whole pipeline on an opened source and output: plan -> build each split -> publish.
    Returns the summary dict. ``csv_source``: where the CSVs are (--csv-dir), else the input."""
    started = time.perf_counter()
    publishing.check_output_dataset(output, settings)  # another data set's files there: stop, touching nothing
    # An unwritable output fails here, before any download.
    output.prepare(records.file_names(settings.num_shards, settings.shard_index).values())
    results: list[building.SplitResult] = []
    try:
        with building.decode_pool(settings.workers) as pool:  # its processes boot while the input is listed
            plan = plan_dataset(source, settings.layout, csv_source, settings.presharded)
            sharding.apply_limit_and_shard(plan, source, settings)
            for number, split_plan in enumerate(plan.splits, start=1):
                results.append(building.build_split(source, plan, split_plan, number, settings, pool,
                                                    output.staging_dir))
        reporting.add_leakage(plan, results)
        return publishing.publish(output, plan, results, settings, started)
    finally:
        for result in results:
            result.discard()  # an unfinished pickle (a failure or Ctrl-C); after commit there is none


def settings_from_args(args: argparse.Namespace, shard_index: int, num_shards: int,
                       sharded_source: str | None) -> PreprocessSettings:
    layout = Layout(args.train_labels, args.train_features, args.test_features,
                    args.train_dir.strip("/"), args.test_dir.strip("/"))
    return PreprocessSettings(input_uri=args.input, image_size=args.image_size, policy=args.resize,
                              max_pixels=args.max_pixels, workers=args.workers or threads.allowed_cpus(),
                              download_threads=args.download_threads, limit=args.limit, shard_index=shard_index,
                              num_shards=num_shards, quiet=args.quiet, layout=layout,
                              presharded=sharded_source is not None, dataset_uri=sharded_source,
                              overwrite=args.overwrite)


def main(argv=None) -> int:
    args = parse_args(argv)
    cli.setup_logging(enabled=not args.quiet)
    cli.log.info("=" * 60 + "\nIMAGE PREPROCESSING\n" + "=" * 60)
    output = None
    try:
        if not sources.is_s3_uri(args.input) and not Path(args.input).is_dir():
            raise PreprocessError(f"input folder {args.input} does not exist.\n{usage_hint()}")
        if args.csv_dir is not None and not sources.is_s3_uri(args.csv_dir) and not Path(args.csv_dir).is_dir():
            raise PreprocessError(f"--csv-dir {args.csv_dir} does not exist or is not a folder")
        # This run's shard: the flags, else this host's share of a SageMaker Processing job.
        shard_index, num_shards, sharded_source = sharding.resolve_sharding(args.input, args.shard_index,
                                                                            args.num_shards, args.auto_shard)
        source_options = sources.SourceOptions(
            endpoint_url=args.endpoint_url, max_attempts=args.max_attempts, read_timeout=args.read_timeout,
            download_threads=args.download_threads, max_object_bytes=int(args.max_object_mb * 2**20),
            verify_etag=not args.no_etag_check)
        source = storage.open_source(args.input, source_options)
        csv_source = storage.open_source(args.csv_dir, source_options) if args.csv_dir is not None else None
        output = storage.open_output(args.output_dir, sources.SourceOptions(endpoint_url=args.endpoint_url,
                                                                            max_attempts=args.max_attempts))
        summary = run(source, output, settings_from_args(args, shard_index, num_shards, sharded_source), csv_source)
        # --strict: the outputs are written, but any skip fails the run.
        if args.strict:
            summary_txt = records.file_names(num_shards, shard_index)["summary_txt"]
            problem = reporting.strict_problem(summary, output.describe(summary_txt))
            if problem:
                return fail(problem, STRICT_EXIT_CODE)
    except (PreprocessError, sources.SourceError, labels.LabelsError, sagemaker.ProcessingConfigError) as exc:
        return fail(str(exc))
    except OSError as exc:  # disk full (or another OS failure) while writing the outputs
        return fail(publishing.os_error_message(exc))
    finally:
        if output is not None:
            output.close()
    return 0


def fail(message: str, exit_code: int = 2) -> int:
    """An ERROR line on stderr, the same reason where SageMaker shows it; returns ``exit_code``."""
    print(f"ERROR: {message}", file=sys.stderr)
    sagemaker.report_failure(f"preprocess: {message}")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
