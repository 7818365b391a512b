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
train_data.pkl, test_data.pkl (see dss/dataset.py), train_metadata.csv, test_metadata.csv,
preprocessing_summary.txt and preprocessing_summary.json. Every skipped object is listed in both
summaries with its key and reason; per split, listed = written + skipped. Re-running on the same
input gives byte-identical pickles (nothing from the clock goes into them; timings live under the
summaries' "timing" keys only). A download that fails after all retries is skipped and recorded;
the run fails when every image of a split is skipped; with ``--strict`` any skipped image or
rejected CSV row fails the run (exit 3) after the summaries are written. Leakage checks (B8): an id
or an identical image file (sha256 of the bytes) in both train and test, and a class with no train
image, are warnings in the summaries (the test split is unlabelled, so they do not corrupt
training; they do make test predictions meaningless for those images). S3 bodies are checked against S3's
checksum (or an MD5 ETag) and refetched when they arrived corrupt (see dss/sources.py). A write
that fails (disk full) stops the run with the path and errno; nothing partial is left under a
final name. This script never imports torch.
"""

from __future__ import annotations

import argparse
import csv
import errno
import hashlib
import io
import multiprocessing
import os
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm import tqdm

from dss import cli, dataset, fileio, images, labels, reporting, sagemaker, sources, splitfile

DEFAULT_INPUT = "./data"
BUCKET_EXAMPLE = "s3://animal-classification-dss-works/data/"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # matched case-insensitively; no extension is accepted too
DECODE_BATCH = 16            # images per task sent to a decode process (amortises IPC)
SPLIT_TITLES = {"train": "TRAINING", "test": "TEST"}  # the prototype's stage lines
STRICT_EXIT_CODE = 3        # --strict: the run completed but skipped something
LEAKAGE_EXAMPLES = 20       # ids / id pairs quoted in the summary per leakage kind
METADATA_COLUMNS = ("id", "site", "label", "source_key", "orig_width", "orig_height", "orig_mode", "was_grey")


class PreprocessError(RuntimeError):
    """The run cannot produce a usable dataset; the message says why and what to do."""


def usage_hint() -> str:
    return ("Run it on the team's bucket or on a local copy in the same layout:\n"
            f"  python preprocess.py --input {BUCKET_EXAMPLE} --output-dir ./output\n"
            "  python preprocess.py --input ./data --output-dir ./output")


# --------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class Layout:
    """Names inside the input root (the --train-labels ... --test-dir flags)."""

    train_labels: str = "train_labels.csv"
    train_features: str = "train_features.csv"
    test_features: str = "test_features.csv"
    train_dir: str = "train_features"
    test_dir: str = "test_features"


@dataclass
class Item:
    """One image to fetch. ``label`` is a class index or -1 (test); ``csv_row`` the 0-based data row
    of the id in its features (test) / labels (train) CSV, or -1 when there is no CSV."""

    id: str
    key: str
    size: int
    site: str = ""
    label: int = -1
    csv_row: int = -1


@dataclass
class SplitPlan:
    name: str
    source: str                                        # where the images come from, for logs
    items: list[Item] = field(default_factory=list)    # sorted by id
    skipped: list[dict] = field(default_factory=list)  # decided before any download
    has_labels: bool = False
    has_csv_rows: bool = False
    notes: dict = field(default_factory=dict)          # B5 counts etc. (deterministic)
    warnings: list[str] = field(default_factory=list)
    # The input holds only this instance's share of the images (a ShardedByS3Key input): nothing is
    # sliced again, and CSV ids whose image is elsewhere are counted here, not skipped (not listed).
    presharded: bool = False
    in_other_shards: int = 0

    @property
    def listed(self) -> int:
        return len(self.items) + len(self.skipped)


def id_from_key(key: str) -> str | None:
    """The sample id of an object key: its file name without an image extension (any case).

    ``a/ZJ000001.JPG`` -> ``ZJ000001``; ``a/ZJ000001`` -> ``ZJ000001``; hidden files and other
    extensions (``notes.txt``) -> None (not an image candidate).
    """
    name = PurePosixPath(key).name
    if not name or name.startswith("."):
        return None
    stem, dot, extension = name.rpartition(".")
    if not dot:
        return name
    if stem and "." + extension.lower() in IMAGE_SUFFIXES:
        return stem
    return None


def _normalise_filepath(filepath: str) -> str:
    return filepath.strip().replace("\\", "/").removeprefix("./").lstrip("/")


def _skip(key: str, image_id: str, reason: str, message: str, csv_row: int = -1) -> dict:
    entry = {"key": key, "id": image_id, "reason": reason, "message": message}
    if csv_row >= 0:
        entry["csv_row"] = csv_row
    return entry


def _stem_index(infos: list[sources.ObjectInfo], folder: str) -> tuple[dict[str, list[sources.ObjectInfo]], list[str]]:
    """Objects directly inside ``folder``, grouped by id; plus the keys that are not image candidates."""
    prefix = folder.strip("/") + "/" if folder.strip("/") else ""
    by_id: dict[str, list[sources.ObjectInfo]] = {}
    ignored = []
    for info in infos:
        if not info.key.startswith(prefix) or "/" in info.key[len(prefix):]:
            continue
        image_id = id_from_key(info.key)
        if image_id is None:
            ignored.append(info.key)
        else:
            by_id.setdefault(image_id, []).append(info)
    return by_id, ignored


def plan_from_stems(name: str, infos: list[sources.ObjectInfo], source_text: str) -> SplitPlan:
    """A test split from image files alone: ids are the file stems, site "" (no CSV).

    Two keys whose ids match ignoring case (``a.jpg``, ``A.JPG``, ``x/a.png``) are a conflict: the
    first key in sorted order is used, the others are skipped as ``duplicate_id`` (A13)."""
    plan = SplitPlan(name=name, source=source_text)
    first_by_folded: dict[str, sources.ObjectInfo] = {}
    ignored = []
    for info in infos:  # sorted by key
        image_id = id_from_key(info.key)
        if image_id is None:
            ignored.append(info.key)
            continue
        folded = image_id.casefold()
        kept = first_by_folded.get(folded)
        if kept is not None:
            plan.skipped.append(_skip(info.key, image_id, "duplicate_id",
                                      f"id '{image_id}' (ignoring case) is already taken by {kept.key}"))
            continue
        first_by_folded[folded] = info
        plan.items.append(Item(id=image_id, key=info.key, size=info.size))
    if ignored:
        plan.notes["ignored_keys"] = {"count": len(ignored), "examples": ignored[:20]}
        plan.warnings.append(f"{len(ignored)} object(s) without a .jpg/.jpeg/.png/no extension ignored, "
                             f"e.g. {ignored[:3]}")
    return plan


def _resolve(image_id: str, filepath: str | None, keys: dict[str, sources.ObjectInfo],
             fallback: dict[str, list[sources.ObjectInfo]], folder: str) -> tuple[sources.ObjectInfo | None, str]:
    """The object for an id: its CSV filepath, else ``<folder>/<id>.<ext>``; plus the key tried."""
    if filepath:
        wanted = _normalise_filepath(filepath)
        if wanted in keys:
            return keys[wanted], wanted
    candidates = fallback.get(image_id, [])
    tried = _normalise_filepath(filepath) if filepath else f"{folder.strip('/')}/{image_id}.jpg"
    return (candidates[0] if candidates else None), tried


def plan_from_csv(name: str, ids: list[str], label_of: dict[str, int] | None, features, keys: dict,
                  infos: list[sources.ObjectInfo], folder: str, source_text: str,
                  presharded: bool = False) -> SplitPlan:
    """A split whose ids come from a CSV. ``label_of`` is None for test; ``features`` may be None.

    Ids without an object are skipped as ``missing_object`` (B5), unless ``presharded``: then the
    input is one instance's share of a ShardedByS3Key input and such ids are counted as
    ``in_other_shards`` (their image went to another instance). Objects in ``folder`` that no id
    refers to are counted under ``notes.unreferenced_objects``. Two ids on one object: the later
    id is skipped (``shared_object``)."""
    plan = SplitPlan(name=name, source=source_text, has_labels=label_of is not None, has_csv_rows=True,
                     presharded=presharded)
    feature_row = {}
    if features is not None:
        for row, image_id in enumerate(features.ids):
            feature_row[image_id] = (row, features.filepaths[row], features.sites[row])
    fallback, ignored = _stem_index(infos, folder)
    for image_id, candidates in sorted(fallback.items()):
        if len(candidates) > 1:
            plan.warnings.append(f"id '{image_id}' has {len(candidates)} files in {folder}/: "
                                 f"{[c.key for c in candidates]}; using {candidates[0].key} when no filepath says")
    used_keys: dict[str, str] = {}
    without_features = 0
    for row, image_id in enumerate(ids):
        filepath, site = None, ""
        if image_id in feature_row:
            feature_index, filepath, site = feature_row[image_id]
            if label_of is None:
                row = feature_index
        elif features is not None:
            without_features += 1
        info, tried = _resolve(image_id, filepath, keys, fallback, folder)
        if info is None and presharded:
            plan.in_other_shards += 1
            continue
        if info is None:
            plan.skipped.append(_skip(tried, image_id, "missing_object",
                                      f"no object for id '{image_id}' (looked for {tried} and {folder}/{image_id}.*)",
                                      csv_row=row))
            continue
        if info.key in used_keys:
            plan.skipped.append(_skip(info.key, image_id, "shared_object",
                                      f"object {info.key} already used for id '{used_keys[info.key]}'", csv_row=row))
            continue
        used_keys[info.key] = image_id
        label = label_of[image_id] if label_of is not None else -1
        plan.items.append(Item(id=image_id, key=info.key, size=info.size, site=site or "", label=label, csv_row=row))
    plan.items.sort(key=lambda item: item.id)
    plan.skipped.sort(key=lambda entry: entry["id"])
    unreferenced = sorted(c.key for group in fallback.values() for c in group if c.key not in used_keys)
    plan.notes["ids_without_object"] = sum(1 for s in plan.skipped if s["reason"] == "missing_object")
    plan.notes["unreferenced_objects"] = {"count": len(unreferenced), "examples": unreferenced[:20]}
    if unreferenced:
        plan.warnings.append(f"{len(unreferenced)} object(s) in {folder}/ have no row in the CSV "
                             f"(not used), e.g. {unreferenced[:3]}")
    if plan.notes["ids_without_object"]:
        plan.warnings.append(f"{plan.notes['ids_without_object']} id(s) in the CSV have no image object")
    if features is not None:
        plan.notes["ids_without_features_row"] = without_features
        if without_features:
            plan.warnings.append(f"{without_features} labelled id(s) have no row in the features CSV (site unknown)")
    if ignored:
        plan.notes["ignored_keys"] = {"count": len(ignored), "examples": ignored[:20]}
    return plan


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


def _read_csv_table(source: sources.Source, key: str, reader):
    """Run a dss.labels reader on a CSV of the source; messages name its full location."""
    try:
        data = source.read(key)
    except sources.ObjectSkip as skip:
        raise PreprocessError(f"cannot read the CSV: {skip}") from None
    return reader(source.describe(key), data=data)


@dataclass
class Plan:
    splits: list[SplitPlan]
    class_names: list[str]
    csv_problems: list[dict]
    warnings: list[str]
    mode: str  # "csv" or "images_only"
    label_of: dict[str, int] | None = None  # the labels CSV, id -> class index (train)
    leakage: dict = field(default_factory=dict)  # B8, filled after processing (see leakage_report)


def nested_dataset_folders(infos: list[sources.ObjectInfo], layout: Layout) -> dict[str, list[str]]:
    """Subfolders that hold one of the layout's CSVs: {folder: [CSV names]}, folders sorted."""
    csv_names = {layout.train_labels, layout.train_features, layout.test_features}
    found: dict[str, list[str]] = {}
    for info in infos:
        path = PurePosixPath(info.key)
        if path.name in csv_names and len(path.parts) > 1:
            found.setdefault(str(path.parent), []).append(path.name)
    return dict(sorted(found.items()))


def plan_dataset(source: sources.Source, layout: Layout, log, csv_source: sources.Source | None = None,
                 presharded: bool = False) -> Plan:
    """List the input once and decide, per split, which id comes from which object.

    ``csv_source``: where the CSVs are (--csv-dir; default the input itself; their ``filepath``
    column stays relative to the input). ``presharded``: the input is this instance's share of a
    ShardedByS3Key input, so every image in it is processed (no slicing later) and CSV ids whose
    image is not in it are counted as ``in_other_shards`` instead of skipped."""
    log(f"Listing {source.describe()} ...")
    infos = source.list("")
    keys = {info.key: info for info in infos}
    log(f"Found {len(infos)} objects")
    csv_names = (layout.train_labels, layout.train_features, layout.test_features)
    if csv_source is None:
        if presharded:
            _refuse_sharded_csvs(source, keys, layout)
        csv_source, csv_keys = source, set(keys)
    else:
        csv_keys = {name for name in csv_names if csv_source.exists(name)}
        if not csv_keys:
            raise PreprocessError(f"--csv-dir {csv_source.describe()} has none of {', '.join(csv_names)}. "
                                  "Nothing was written.")
    csv_present = [name for name in csv_names if name in csv_keys]
    if not csv_present:
        nested = nested_dataset_folders(infos, layout)
        if nested:
            # A dataset one level down (./data/demo/train_labels.csv): images-only mode would take its
            # train images as unlabelled TEST images and replace the outputs of a real run.
            folder, names = next(iter(nested.items()))
            location = source.describe(folder + "/")
            others = [source.describe(other + "/") for other in list(nested)[1:]]
            raise PreprocessError(
                f"{source.describe()} has no {layout.train_labels} or {layout.test_features} at its top level, "
                f"but {location} has {', '.join(sorted(names))}: the dataset is in that subfolder. Run with "
                f"--input {location}" + (f" (other dataset folders: {', '.join(others[:5])})" if others else "")
                + ". Nothing was written.")
        images_only = [info for info in infos if id_from_key(info.key) is not None]
        if not images_only:
            raise PreprocessError(f"nothing usable in {source.describe()}: no {layout.train_labels}, "
                                  f"{layout.test_features} or .jpg/.jpeg/.png objects.\n{usage_hint()}")
        log(f"No CSVs in {source.describe()}: treating all {len(images_only)} images as TEST images")
        plan = plan_from_stems("test", infos, source.describe())
        plan.presharded = presharded
        return Plan([plan], [], [], [], "images_only")

    if layout.train_features in csv_keys and layout.train_labels not in csv_keys:
        raise PreprocessError(f"{csv_source.describe(layout.train_features)} exists but {layout.train_labels} does "
                              "not; pass --train-labels NAME if the labels file has another name")
    csv_problems, warnings = [], []
    splits, class_names, label_of = [], [], None
    if layout.train_labels in csv_keys:
        table = _read_csv_table(csv_source, layout.train_labels, labels.read_labels)
        _collect_problems(table, csv_problems, warnings)
        class_names = list(table.class_names)
        label_of = {image_id: int(label) for image_id, label in zip(table.ids, table.labels)}
        log(f"Labels loaded: {len(table.ids)} rows, {len(class_names)} classes")
        features = None
        if layout.train_features in csv_keys:
            features = _read_csv_table(csv_source, layout.train_features, labels.read_features)
            _collect_problems(features, csv_problems, warnings)
            labelled = set(label_of)
            unlabelled = [image_id for image_id in features.ids if image_id not in labelled]
            if unlabelled:
                warnings.append(f"{len(unlabelled)} id(s) in {layout.train_features} have no label "
                                f"(not used), e.g. {unlabelled[:3]}")
        plan = plan_from_csv("train", list(table.ids), label_of, features, keys, infos, layout.train_dir,
                             source.describe(layout.train_dir + "/"), presharded)
        if features is not None:
            plan.notes["features_rows_without_label"] = sum(1 for i in features.ids if i not in label_of)
        splits.append(plan)
    if layout.test_features in csv_keys:
        features = _read_csv_table(csv_source, layout.test_features, labels.read_features)
        _collect_problems(features, csv_problems, warnings)
        splits.append(plan_from_csv("test", list(features.ids), None, features, keys, infos, layout.test_dir,
                                    source.describe(layout.test_dir + "/"), presharded))
    else:
        test_infos = [info for info in infos if info.key.startswith(layout.test_dir.strip("/") + "/")]
        if test_infos:
            log(f"No {layout.test_features}: test ids from the file names in {layout.test_dir}/")
            splits.append(plan_from_stems("test", test_infos, source.describe(layout.test_dir + "/")))
            splits[-1].presharded = presharded
    return Plan(splits, class_names, csv_problems, warnings, "csv", label_of)


def _refuse_sharded_csvs(source: sources.Source, keys: dict, layout: Layout) -> None:
    """A ShardedByS3Key input in the dataset layout needs its CSVs from elsewhere: SageMaker hands
    each CSV object to one instance only, so reading them from the input would be wrong everywhere."""
    csv_names = (layout.train_labels, layout.train_features, layout.test_features)
    found = [name for name in csv_names if name in keys]
    folders = [folder for folder in (layout.train_dir, layout.test_dir)
               if any(key.startswith(folder.strip("/") + "/") for key in keys)]
    if not found and not folders:
        return  # a flat folder of images: test images from the file names, no CSVs needed
    what = f"has {', '.join(found)}" if found else f"has {', '.join(f + '/' for f in folders)} but no CSVs"
    raise PreprocessError(
        f"{source.describe()} is a ShardedByS3Key input of this SageMaker Processing job and {what}: each "
        "instance gets only some objects of a sharded input, so a CSV in it reaches one instance only. Give "
        f"the CSVs ({', '.join(csv_names)}) as a separate ProcessingInput with "
        "s3_data_distribution_type='FullyReplicated' and pass its destination as --csv-dir "
        "(e.g. --csv-dir /opt/ml/processing/csv). Nothing was written.")


def _collect_problems(table, problems: list[dict], warnings: list[str]) -> None:
    for problem in table.problems:
        problems.append({"file": str(problem.file), "line": problem.line, "id": problem.id, "reason": problem.reason})
    warnings.extend(str(warning) for warning in table.warnings)


# --------------------------------------------------------------------------- decoding
def decode_batch(batch: list[tuple[int, bytes | str]], image_size: int, policy: str, max_pixels: int,
                 slots: splitfile.RowSlots) -> list[tuple[int, dict | None, tuple[str, str] | None]]:
    """Decode ``[(slot, bytes or local file path)]`` and write each image to its slot of the split file.

    Runs in a decode process (or in the main one with one worker). Returns ``[(slot, info, None)]`` for
    written images and ``[(slot, None, (reason, message))]`` for skips; an OSError writing the image
    (disk full) is not a skip and propagates: it ends the run.
    """
    results = []
    for slot, data in batch:
        try:
            if isinstance(data, str):  # a folder source: the decode process reads the file itself
                data = sources.read_local_file(data)
            array, info = images.decode_and_resize(data, image_size, policy, max_pixels)
            info["sha256"] = hashlib.sha256(data).hexdigest()  # B8: same file in train and test
            info["bytes"] = len(data)
        except (images.ImageSkip, sources.ObjectSkip) as skip:
            results.append((slot, None, (skip.reason, str(skip))))
            continue
        except Exception as exc:  # a decoder bug must not lose the other images: record it by name
            results.append((slot, None, ("unexpected_error", f"{type(exc).__name__}: {exc}")))
            continue
        splitfile.write_row(slots, slot, array)
        results.append((slot, info, None))
    return results


def _decode_pool(workers: int) -> ProcessPoolExecutor | None:
    if workers <= 1:
        return None
    # forkserver: workers start from a clean process, not a fork of one running download threads.
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method))
    for _ in range(workers):
        pool.submit(int)  # a no-op per worker: processes start now, in the background
    return pool


@dataclass
class SplitResult:
    plan: SplitPlan
    data: dict | None                 # the pickle dict without "images" (None when nothing was written)
    skipped: list[dict]
    seconds: float
    source_stats: dict
    content_sha256: list[str] = field(default_factory=list)  # per written row (not stored in the pickle)
    # The split's pickle under construction (its image rows are already in it) and its written slots.
    writer: splitfile.SplitFileWriter | None = None
    kept_slots: np.ndarray | None = None

    def discard(self) -> None:
        """Remove the unfinished pickle (the run failed, or nothing was written)."""
        if self.writer is not None:
            self.writer.discard()


def process_split(source: sources.Source, plan: SplitPlan, class_names: list[str], image_size: int,
                  policy: str, max_pixels: int, pool: ProcessPoolExecutor | None, workers: int, download_threads: int,
                  source_uri: str, pickle_path: Path, quiet: bool) -> SplitResult:
    """Download and decode every item of ``plan`` into the split pickle being built at ``pickle_path``
    (see dss.splitfile; ``SplitResult.writer.commit`` finishes it). Rows are in ``plan.items`` order.

    Each item that gets past the listing checks has a slot (a row of the pickle under construction);
    items skipped before download take none, so only skips found while decoding leave gaps for
    commit to close."""
    started = time.perf_counter()
    stats_before = source.stats.as_dict()
    items = plan.items
    skipped = list(plan.skipped)

    row_of_slot: list[int] = []  # slot -> index into plan.items, ascending
    slot_of_key: dict[str, int] = {}
    for row, item in enumerate(items):
        try:
            source.check_size(sources.ObjectInfo(item.key, item.size))
        except sources.ObjectSkip as skip:
            skipped.append(_skip(item.key, item.id, skip.reason, str(skip), item.csv_row))
            continue
        if item.size == 0:
            skipped.append(_skip(item.key, item.id, "empty", "zero-byte object (from the listing)", item.csv_row))
            continue
        slot_of_key[item.key] = len(row_of_slot)
        row_of_slot.append(row)
    written = np.zeros(len(row_of_slot), dtype=bool)  # per slot
    decoded_info: list[dict | None] = [None] * len(row_of_slot)

    def take(results):
        writer.rows_written(sum(1 for _, info, _ in results if info is not None))
        for slot, info, problem in results:
            if info is None:
                reason, message = problem
                item = items[row_of_slot[slot]]
                skipped.append(_skip(item.key, item.id, reason, message, item.csv_row))
            else:
                written[slot] = True
                decoded_info[slot] = info
            progress.update(1)

    def submit(batch):
        if pool is None:
            take(decode_batch(batch, image_size, policy, max_pixels, writer.slots))
            return
        pending.add(pool.submit(decode_batch, batch, image_size, policy, max_pixels, writer.slots))
        while len(pending) >= max_pending:
            done, still_pending = wait(pending, return_when=FIRST_COMPLETED)
            pending.difference_update(done)
            for future in done:
                take(future.result())

    def fetched():
        """(slot, bytes or path): folders hand paths to the decode processes, S3 objects are downloaded here."""
        if source.local_path("") is not None:
            for key, slot in slot_of_key.items():
                yield slot, source.local_path(key)
            return
        for key, result in source.fetch_many(list(slot_of_key), threads=download_threads):
            slot = slot_of_key[key]
            if isinstance(result, sources.ObjectSkip):
                item = items[row_of_slot[slot]]
                skipped.append(_skip(key, item.id, result.reason, str(result), item.csv_row))
                progress.update(1)
                continue
            yield slot, result

    progress = tqdm(total=len(slot_of_key), desc=plan.name, unit="img",
                    disable=quiet or not sys.stderr.isatty())
    pending = set()
    batch: list[tuple[int, bytes | str]] = []
    max_pending = 4 * workers  # decode tasks in flight: keeps every process busy, bounds memory
    with splitfile.SplitFileWriter(pickle_path, len(row_of_slot), image_size) as writer:  # removed on any error
        try:
            for slot, data in fetched():
                batch.append((slot, data))
                if len(batch) >= DECODE_BATCH:
                    submit(batch)
                    batch = []
            if batch:
                submit(batch)
            for future in pending:
                take(future.result())
        except BrokenProcessPool as exc:
            raise PreprocessError(f"a decode worker process died ({exc}); it was probably killed for memory: "
                                  "try fewer --workers") from exc
        finally:
            progress.close()
    if source.local_path("") is not None:
        source.stats.add(bytes_read=sum(info["bytes"] for info in decoded_info if info is not None))

    skipped.sort(key=lambda entry: (entry["id"], entry["key"]))
    seconds = time.perf_counter() - started
    stats_after = source.stats.as_dict()
    source_stats = {name: stats_after[name] - stats_before[name] for name in stats_after}
    kept_slots = np.flatnonzero(written)
    if len(kept_slots) == 0:
        writer.discard()
        return SplitResult(plan, None, skipped, seconds, source_stats)

    kept = [items[row_of_slot[slot]] for slot in kept_slots]
    infos = [decoded_info[slot] for slot in kept_slots]
    data = {
        # numpy string arrays: pickles then do not depend on which str objects happen to be shared.
        "ids": np.array([item.id for item in kept], dtype=str),
        "labels": np.array([item.label for item in kept], dtype=np.int64) if plan.has_labels else None,
        "class_names": list(class_names),
        "sites": np.array([item.site for item in kept], dtype=str),
        "meta": {
            "source_key": np.array([item.key for item in kept], dtype=str),
            "orig_width": np.array([info["orig_width"] for info in infos], dtype=np.int64),
            "orig_height": np.array([info["orig_height"] for info in infos], dtype=np.int64),
            "orig_mode": np.array([info["orig_mode"] for info in infos], dtype=str),
            "was_grey": np.array([info["was_grey"] for info in infos], dtype=bool),
        },
        "info": {
            "format_version": dataset.FORMAT_VERSION,
            "split": plan.name,
            "image_size": image_size,
            "resize_policy": policy,
            "max_pixels": max_pixels,
            "source": source_uri,
            "listed": plan.listed,
            "skipped": len(skipped),
        },
    }
    if plan.has_csv_rows:
        data["meta"]["csv_row"] = np.array([item.csv_row for item in kept], dtype=np.int64)
    return SplitResult(plan, data, skipped, seconds, source_stats, [info["sha256"] for info in infos],
                       writer, kept_slots)


def check_alignment(result: SplitResult, label_of: dict[str, int] | None) -> None:
    """Labels never shift: row i's label is the CSV label of row i's id; ids sorted and unique."""
    data = result.data
    ids = data["ids"].tolist()
    if ids != sorted(set(ids)):
        raise AssertionError(f"{result.plan.name}: ids are not sorted and unique")
    if label_of is not None:
        expected = np.array([label_of[image_id] for image_id in ids], dtype=np.int64)
        if not np.array_equal(expected, data["labels"]):
            bad = int(np.flatnonzero(expected != data["labels"])[0])
            raise AssertionError(f"{result.plan.name}: label of row {bad} (id {ids[bad]}) does not match the CSV")
    if len(result.skipped) + len(ids) != result.plan.listed:
        raise AssertionError(f"{result.plan.name}: listed {result.plan.listed} != written {len(ids)} + "
                             f"skipped {len(result.skipped)}")


# --------------------------------------------------------------------------- outputs
def metadata_csv(data: dict) -> str:
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


def split_summary(result: SplitResult) -> dict:
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
        summary["grey_share"] = round(float(np.mean(data["meta"]["was_grey"])), 4)
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


def summary_text(summary: dict) -> str:
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
            lines.append(f"  sites: {len(split['site_counts'])}; grey share {split['grey_share']:.1%}")
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


# --------------------------------------------------------------------------- the run
def _write(path: Path, writer, content) -> None:
    """``writer(path, content)``; an OSError that names no file (write() on a full disk) gets ``path``."""
    try:
        writer(path, content)
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise


def _commit_pickle(path: Path, result: SplitResult) -> None:
    """Finish ``result``'s pickle (its image rows are already in place) as ``path``."""
    if result.writer.final_path != path:
        raise ValueError(f"the pickle of split {result.plan.name} is being built as {result.writer.final_path}, not {path}")
    result.writer.commit(result.data, result.kept_slots)


def os_error_message(exc: OSError) -> str:
    """One line for an OSError: the path, what it means and the errno name (ENOSPC -> disk full)."""
    code = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno is not None else type(exc).__name__
    where = exc.filename if exc.filename is not None else "(no path given)"
    detail = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        # An s3:// output is staged in a local temp folder first: its disk is the one that filled up.
        staged = where.startswith(os.path.join(tempfile.gettempdir(), sources.S3_STAGING_PREFIX))
        fix = ("point TMPDIR at a disk with space (an s3:// output is staged there before upload)" if staged
               else "free some space or pick another --output-dir")
        return f"disk full while writing {where} ({code}: {detail}); {fix}. No partial file was left under a final name"
    return f"{where}: {detail} ({code})"


def process_plan(source: sources.Source, plan: Plan, layout: Layout, image_size: int, policy: str,
                 max_pixels: int, pool: ProcessPoolExecutor | None, workers: int, download_threads: int,
                 input_uri: str, limit: int | None, shard_index: int, num_shards: int, staging_dir: Path,
                 log, quiet: bool) -> list[SplitResult]:
    """Apply --limit/--shard, refuse empty datasets, then process every split into its unfinished
    pickle in ``staging_dir`` (finished by ``SplitResult.writer.commit``; nothing final is written)."""
    for split_plan in plan.splits:
        limit_and_shard(split_plan, limit, shard_index, num_shards)
    train_plan = next((p for p in plan.splits if p.name == "train"), None)
    if train_plan is not None and train_plan.listed == 0 and num_shards == 1:
        raise PreprocessError(f"empty dataset: {source.describe(layout.train_labels)} has no usable labelled "
                              f"rows ({len(plan.csv_problems)} row(s) rejected)")
    if not any(p.listed for p in plan.splits):
        raise PreprocessError(f"empty dataset: no images to process in {source.describe()}.\n{usage_hint()}")
    results = []
    try:
        _process_splits(source, plan, image_size, policy, max_pixels, pool, workers, download_threads, input_uri,
                        reporting.file_names(num_shards, shard_index), staging_dir, log, quiet, results)
        plan.leakage, leakage_warnings = leakage_report(results, plan.class_names)
    except BaseException:
        for result in results:
            result.discard()
        raise
    for warning in leakage_warnings:
        log(f"WARNING: {warning}")
    plan.warnings.extend(leakage_warnings)
    return results


def _process_splits(source: sources.Source, plan: Plan, image_size: int, policy: str, max_pixels: int,
                    pool: ProcessPoolExecutor | None, workers: int, download_threads: int, input_uri: str,
                    names: dict[str, str], staging_dir: Path, log, quiet: bool, results: list[SplitResult]) -> None:
    """Process the splits one after another, appending to ``results`` as each finishes."""
    for number, split_plan in enumerate(plan.splits, start=1):
        log(f"\n{number}. Processing {SPLIT_TITLES.get(split_plan.name, split_plan.name.upper())} images...")
        log(f"Getting image list from {split_plan.source}")
        unresolved = split_plan.listed - len(split_plan.items)
        log(f"Found {len(split_plan.items)} images"
            + (f" ({unresolved} listed ids are skipped before download: see the summary)" if unresolved else ""))
        log(f"Processing {len(split_plan.items)} images...")
        result = process_split(source, split_plan, plan.class_names, image_size, policy, max_pixels, pool,
                               workers, download_threads, input_uri,
                               staging_dir / names[f"{split_plan.name}_data"], quiet)
        results.append(result)
        written = 0 if result.data is None else len(result.data["ids"])
        reasons = Counter(entry["reason"] for entry in result.skipped)
        log(f"Written {written}, skipped {len(result.skipped)}"
            + (f" ({', '.join(f'{r}: {n}' for r, n in sorted(reasons.items()))})" if reasons else "")
            + f" in {result.seconds:.1f} s ({written / max(result.seconds, 1e-9):.1f} images/s)")
        if result.data is None and split_plan.listed:
            examples = "; ".join(f"{e['key']}: {e['reason']}" for e in result.skipped[:5])
            raise PreprocessError(f"all {split_plan.listed} {split_plan.name} images were skipped, nothing "
                                  f"to write (e.g. {examples})")
        if result.data is not None:
            check_alignment(result, plan.label_of if split_plan.has_labels else None)


def leakage_report(results: list[SplitResult], class_names: list[str]) -> tuple[dict, list[str]]:
    """B8: ids and identical image files (sha256 of the bytes) in both train and test, and classes
    with no train image. Policy: warnings, not errors (the test split carries no labels)."""
    by_split = {result.plan.name: result for result in results if result.data is not None}
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


def run(source: sources.Source, output: sources.Output, input_uri: str, layout: Layout, image_size: int,
        policy: str, max_pixels: int, workers: int, download_threads: int, limit: int | None = None,
        shard_index: int = 0, num_shards: int = 1, quiet: bool = False, csv_source: sources.Source | None = None,
        presharded: bool = False) -> dict:
    """The whole pipeline on an opened source and output; returns the summary dict. ``csv_source`` and
    ``presharded``: see ``plan_dataset``."""
    log = (lambda message: None) if quiet else (lambda message: print(message, flush=True))
    started = time.perf_counter()
    output.prepare(reporting.file_names(num_shards, shard_index).values())  # D4: fail before any download if unwritable
    pool = _decode_pool(workers)  # started now so the workers boot while the listing runs
    results: list[SplitResult] = []
    try:
        try:
            plan = plan_dataset(source, layout, log, csv_source=csv_source, presharded=presharded)
            results = process_plan(source, plan, layout, image_size, policy, max_pixels, pool, workers,
                                   download_threads, input_uri, limit, shard_index, num_shards, output.staging_dir,
                                   log, quiet)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        return _write_outputs(output, plan, results, input_uri, image_size, policy, max_pixels, limit, shard_index,
                              num_shards, workers, download_threads, started, log)
    finally:
        for result in results:
            result.discard()  # an unfinished pickle (a failure or Ctrl-C); after commit there is none


def _write_outputs(output: sources.Output, plan: Plan, results: list[SplitResult], input_uri: str, image_size: int,
                   policy: str, max_pixels: int, limit: int | None, shard_index: int, num_shards: int, workers: int,
                   download_threads: int, started: float, log) -> dict:
    """Finish the split pickles, write the metadata CSVs and the summary, publish; returns the summary."""
    names = reporting.file_names(num_shards, shard_index)
    summary = {
        "format_version": dataset.FORMAT_VERSION,
        "input": input_uri,
        "output": output.describe(),
        "mode": plan.mode,
        "image_size": image_size,
        "resize_policy": policy,
        "max_pixels": max_pixels,
        "limit": limit,
        "shard": {"index": shard_index, "count": num_shards},
        "class_names": plan.class_names,
        "files": {},
        "splits": {},
        "csv_problems": plan.csv_problems,
        "warnings": plan.warnings,
        "leakage": plan.leakage,
    }
    log(f"\n{len(plan.splits) + 1}. Saving preprocessed data to {output.describe()}...")
    to_publish = []
    for result in results:
        split = result.plan.name
        summary["splits"][split] = split_summary(result)
        if result.data is None:
            continue
        pickle_name, metadata_name = names[f"{split}_data"], names[f"{split}_metadata"]
        _write(output.staging_dir / pickle_name, _commit_pickle, result)
        _write(output.staging_dir / metadata_name, fileio.write_text, metadata_csv(result.data))
        summary["files"][split] = {"pickle": pickle_name, "metadata": metadata_name}
        to_publish += [pickle_name, metadata_name]
    if num_shards == 1:
        produced = set(to_publish)
        stale = [names[f"{s}_{kind}"] for s in dataset.SPLITS for kind in ("data", "metadata")
                 if names[f"{s}_{kind}"] not in produced]
        removed = output.remove_stale(stale)
        for path in removed:
            log(f"Removed {path} (left by an earlier run; this input has no such split)")
        if removed:
            summary["removed_stale_files"] = removed
            summary["warnings"].append(f"removed {len(removed)} file(s) an earlier run left in the output, "
                                       f"for splits this input does not have: {', '.join(removed)}")
    total_seconds = time.perf_counter() - started
    total_written = sum(s["written"] for s in summary["splits"].values())
    summary["timing"] = {"seconds": round(total_seconds, 3),
                         "images_per_second": round(total_written / total_seconds, 1) if total_seconds else None,
                         "workers": workers, "download_threads": download_threads}
    _write(output.staging_dir / names["summary_json"], fileio.write_json, summary)
    _write(output.staging_dir / names["summary_txt"], fileio.write_text, summary_text(summary))
    output.publish(to_publish + [names["summary_txt"], names["summary_json"]])  # summary last: run complete
    for name in to_publish:
        if name.endswith(".pkl"):
            size_mb = (output.staging_dir / name).stat().st_size / 1e6
            log(f"Saved {output.describe(name)} ({size_mb:.1f} MB)")
        else:
            log(f"Saved {output.describe(name)}")
    log(f"Saved {output.describe(names['summary_txt'])}")
    log(f"Saved {output.describe(names['summary_json'])}")
    log(f"\nPREPROCESSING COMPLETE: {total_written} images in {total_seconds:.1f} s")
    return summary


def strict_problem(summary: dict, summary_location: str) -> str | None:
    """--strict: one line naming how many images were skipped / CSV rows rejected, or None."""
    skipped = sum(split["skipped_count"] for split in summary["splits"].values())
    rejected = len(summary["csv_problems"])
    if not skipped and not rejected:
        return None
    return (f"--strict: {skipped} image(s) skipped and {rejected} CSV row(s) rejected; the outputs were written, "
            f"but the run fails. Each one is listed with its key and reason in {summary_location}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=cli.HelpFormatter)
    parser.add_argument("--input", default=DEFAULT_INPUT,
                        help="s3://bucket/prefix/ or a folder")
    parser.add_argument("--output-dir", default="./output", help="folder or s3://bucket/prefix/")
    parser.add_argument("--image-size", type=cli.positive_int, default=224, help="stored square size in px")
    parser.add_argument("--resize", choices=images.RESIZE_POLICIES, default="squash",
                        help="squash (whole frame), crop (centre) or pad (black border)")
    parser.add_argument("--workers", type=cli.positive_int, default=os.cpu_count() or 1,
                        help="decode processes, default all CPUs of this machine (1 decodes in this process)")
    parser.add_argument("--download-threads", type=cli.positive_int, default=sources.DEFAULT_DOWNLOAD_THREADS,
                        help="concurrent S3 downloads / file reads")
    parser.add_argument("--endpoint-url", default=None,
                        help="S3 endpoint (else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / AWS)")
    parser.add_argument("--max-attempts", type=cli.positive_int, default=sources.DEFAULT_MAX_ATTEMPTS,
                        help="S3 attempts per request, first try included")
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
    parser.add_argument("--strict", action="store_true",
                        help=f"exit {STRICT_EXIT_CODE} (after writing the summaries) if any image was skipped "
                             "or any CSV row rejected: a clean dataset or a failing run")
    parser.add_argument("--quiet", action="store_true", help="only errors")
    args = parser.parse_args(argv)
    if args.shard_index is not None or args.num_shards is not None:  # explicit; the other one defaults
        if (args.shard_index or 0) >= (args.num_shards or 1):
            parser.error(f"--shard-index {args.shard_index} must be below --num-shards {args.num_shards or 1}")
    return args


def resolve_sharding(input_uri: str, shard_index: int | None, num_shards: int | None, use_processing_config: bool,
                     log) -> tuple[int, int, bool]:
    """(shard_index, num_shards, presharded) for this run. Explicit flags win; else, in a SageMaker
    Processing job, this host's index among the job's hosts. ``presharded``: --input is (in) a
    ShardedByS3Key input, so SageMaker already gave this instance its share and nothing is sliced again."""
    job = sagemaker.load_job() if use_processing_config else None
    if job is not None and shard_index is None and num_shards is None:
        shard_index, num_shards = job.shard_index, job.num_shards
        log(f"SageMaker Processing job ({job.config_dir / sagemaker.RESOURCE_CONFIG}): host {job.current_host} "
            f"of {list(job.hosts)} -> shard {shard_index} of {num_shards} (--num-shards/--shard-index override)")
    sharded_input = (job.sharded_input_for(input_uri)
                     if job is not None and not sources.is_s3_uri(input_uri) else None)
    if sharded_input is not None:
        log(f"--input {input_uri} is the ShardedByS3Key input '{sharded_input.name}' ({sharded_input.source}): "
            "processing every image SageMaker put here, without slicing again; CSV ids whose image went to "
            "another instance are counted as in_other_shards")
    return shard_index or 0, num_shards or 1, sharded_input is not None


def main(argv=None) -> int:
    args = parse_args(argv)
    layout = Layout(args.train_labels, args.train_features, args.test_features,
                    args.train_dir.strip("/"), args.test_dir.strip("/"))
    if not args.quiet:
        print("=" * 60 + "\nIMAGE PREPROCESSING\n" + "=" * 60, flush=True)
    output = None
    try:
        if not sources.is_s3_uri(args.input) and not Path(args.input).is_dir():
            raise PreprocessError(f"input folder {args.input} does not exist.\n{usage_hint()}")
        if args.csv_dir is not None and not sources.is_s3_uri(args.csv_dir) and not Path(args.csv_dir).is_dir():
            raise PreprocessError(f"--csv-dir {args.csv_dir} does not exist or is not a folder")
        log = (lambda message: None) if args.quiet else (lambda message: print(message, flush=True))
        shard_index, num_shards, presharded = resolve_sharding(args.input, args.shard_index, args.num_shards,
                                                               args.auto_shard, log)
        source_options = dict(endpoint_url=args.endpoint_url, max_attempts=args.max_attempts,
                              read_timeout=args.read_timeout, download_threads=args.download_threads,
                              max_object_bytes=int(args.max_object_mb * 2**20), verify_etag=not args.no_etag_check)
        source = sources.open_source(args.input, **source_options)
        csv_source = sources.open_source(args.csv_dir, **source_options) if args.csv_dir is not None else None
        output = sources.open_output(args.output_dir, endpoint_url=args.endpoint_url, max_attempts=args.max_attempts)
        summary = run(source, output, args.input, layout, args.image_size, args.resize, args.max_pixels,
                      args.workers, args.download_threads, limit=args.limit, shard_index=shard_index,
                      num_shards=num_shards, quiet=args.quiet, csv_source=csv_source, presharded=presharded)
        if args.strict:
            problem = strict_problem(summary, output.describe(reporting.file_names(num_shards, shard_index)["summary_txt"]))
            if problem:
                print(f"ERROR: {problem}", file=sys.stderr)
                sagemaker.report_failure(f"preprocess: {problem}")
                return STRICT_EXIT_CODE
    except (PreprocessError, sources.SourceError, labels.LabelsError, sagemaker.ProcessingConfigError) as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        sagemaker.report_failure(f"preprocess: {exc}")
        return 2
    except OSError as exc:  # D1: disk full (or another OS failure) while writing the outputs
        message = os_error_message(exc)
        print(f"ERROR: {message}", file=sys.stderr)
        sagemaker.report_failure(f"preprocess: {message}")
        return 2
    finally:
        if output is not None:
            output.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
