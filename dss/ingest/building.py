"""Building a split: fetch, decode and write every planned image into the split's pickle.

    with decode_pool(workers) as pool:
        result = build_split(source, plan, split_plan, 1, settings, pool, staging_dir)

Downloads run on threads in this process (folders hand file paths over instead); decoding and
resizing run in ``workers`` processes, ``DECODE_BATCH`` images per task. A decode process writes
each image's (S, S, 3) uint8 row straight into the split pickle under construction
(``dss.ingest.splitfile``), at the row's slot, so pixels never travel back through a pipe. The builder
keeps, per slot, what became of it; ``SplitResult.writer.commit`` later finishes the pickle
(``dss.ingest.publishing``), keeping only the written slots, in id order.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import sys
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from dss import cli, images
from dss.data import dataset
from dss.ingest import records, sources, splitfile
from dss.ingest.planning import Item, Plan, PreprocessError, PreprocessSettings, SplitPlan

DECODE_BATCH = 16  # images per task sent to a decode process (amortises IPC)
SPLIT_TITLES = {"train": "TRAINING", "test": "TEST"}  # the prototype's stage lines

# What a decode task reports per image: (slot, info, None) when written, (slot, None, (reason, message)) when skipped.
Decoded = tuple[int, dict | None, tuple[str, str] | None]


def _problem(exc: Exception) -> tuple[str, str]:
    """(reason, message) of a skip: an image or object refusal by its reason, anything else by name."""
    if isinstance(exc, (images.ImageSkip, sources.ObjectSkip)):
        return exc.reason, str(exc)
    return "unexpected_error", f"{type(exc).__name__}: {exc}"


def decode_batch(batch: list[tuple[int, bytes | str]], image_size: int, policy: str, max_pixels: int,
                 slots: splitfile.RowSlots) -> list[Decoded]:
    """Decode ``[(slot, bytes or local file path)]`` and write each image to its slot of the split file.

    Runs in a decode process (or in the main one with one worker). Any exception while reading or
    decoding one image is a skip (a decoder bug must not lose the other images); an OSError writing
    the image (disk full) is not a skip and propagates: it ends the run.
    """
    results, blobs, blob_slots = [], [], []
    for slot, data in batch:
        try:  # a folder source: the decode process reads the file itself
            blobs.append(sources.read_local_file(data) if isinstance(data, str) else data)
            blob_slots.append(slot)
        except Exception as exc:
            results.append((slot, None, _problem(exc)))
    decoded_each = images.decode_each(blobs, image_size, policy, max_pixels, refusals=(Exception,))
    for slot, data, decoded in zip(blob_slots, blobs, decoded_each):
        if isinstance(decoded, Exception):
            results.append((slot, None, _problem(decoded)))
            continue
        array, info = decoded
        info["sha256"] = hashlib.sha256(data).hexdigest()  # finds the same file in train and test
        info["bytes"] = len(data)
        splitfile.write_row(slots, slot, array)
        results.append((slot, info, None))
    return results


@contextlib.contextmanager
def decode_pool(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """``workers`` decode processes, started at once so they boot while the input is listed; None
    with one worker (decoding happens in this process). On exit queued tasks are cancelled."""
    if workers <= 1:
        yield None
        return
    # forkserver: workers start from a clean process, not a fork of one running download threads.
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method))
    for _ in range(workers):
        pool.submit(int)  # a no-op per worker: processes start now, in the background
    try:
        yield pool
    finally:
        pool.shutdown(cancel_futures=True)


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), in bytes; None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _in_units(count: float) -> str:
    """A byte count for people: ``12.0 KiB``, ``48.0 MiB``, ``27.9 GiB``."""
    for unit in ("bytes", "KiB", "MiB"):
        if count < 1024:
            return f"{count:,.0f} {unit}" if unit == "bytes" else f"{count:,.1f} {unit}"
        count /= 1024
    return f"{count:,.1f} GiB"


def worker_death_message(exc: BaseException, settings: PreprocessSettings) -> str:
    """Why a decode process most likely died (the OS killed it for memory), with the numbers to check."""
    per_image = settings.image_size ** 2 * 3  # one decoded (S, S, 3) uint8 image
    full_frame = settings.max_pixels * 3      # the largest full-resolution RGB decode --max-pixels lets in
    available = available_memory_bytes()
    free = (f"{_in_units(available)} available now (MemAvailable)" if available is not None
            else "available memory unknown (no /proc/meminfo)")
    return (f"a decode worker process died ({type(exc).__name__}: {exc}). The likely cause is memory: the OS "
            f"killed it (out of memory). Each of the {settings.workers} decode worker(s) holds one decoded "
            f"--image-size {settings.image_size} image of {_in_units(per_image)} ({settings.image_size} x "
            f"{settings.image_size} x 3 bytes) and its full-resolution decode (up to --max-pixels "
            f"{settings.max_pixels:,} x 3 bytes = {_in_units(full_frame)}): up to "
            f"{_in_units(settings.workers * (per_image + full_frame))} in all, with {free}. Try fewer --workers, "
            "a smaller --image-size or a lower --max-pixels")


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


class SplitBuilder:
    """Builds one split's pickle from its plan and keeps, per slot, what became of each image.

    A slot is a row of the pickle under construction. Each item that passes the listing checks
    gets one, in ``plan.items`` order (sorted by id); items skipped before download take none, so
    only skips found while decoding leave gaps, which ``commit`` closes.
    """

    def __init__(self, source: sources.Source, plan: SplitPlan, settings: PreprocessSettings,
                 pool: ProcessPoolExecutor | None):
        self.source, self.plan, self.settings, self.pool = source, plan, settings, pool
        self.skipped: list[dict] = list(plan.skipped)
        self.row_of_slot: list[int] = []  # slot -> index into plan.items, ascending
        self.slot_of_key: dict[str, int] = {}
        for row, item in enumerate(plan.items):
            try:
                source.check_size(sources.ObjectInfo(item.key, item.size))
            except sources.ObjectSkip as skip:
                self._skip(item, skip.reason, str(skip))
                continue
            if item.size == 0:
                self._skip(item, "empty", "zero-byte object (from the listing)")
                continue
            self.slot_of_key[item.key] = len(self.row_of_slot)
            self.row_of_slot.append(row)
        self.written = np.zeros(len(self.row_of_slot), dtype=bool)  # per slot
        self.decoded_info: list[dict | None] = [None] * len(self.row_of_slot)  # per slot
        self.pending: set[Future] = set()  # decode tasks in flight
        self.max_pending = 4 * settings.workers  # keeps every process busy, bounds memory
        self.writer: splitfile.SplitFileWriter | None = None
        self.progress: tqdm | None = None

    def _skip(self, item: Item, reason: str, message: str) -> None:
        self.skipped.append(records.skip_entry(item.key, item.id, reason, message, item.csv_row, item.site))

    def build(self, class_names: list[str], pickle_path: Path) -> SplitResult:
        """Fetch and decode every slot into the pickle being built at ``pickle_path``."""
        started = time.perf_counter()
        stats_before = self.source.stats.as_dict()
        self.progress = tqdm(total=len(self.slot_of_key), desc=self.plan.name, unit="img",
                             disable=self.settings.quiet or not sys.stderr.isatty())
        rows = len(self.row_of_slot)
        with splitfile.SplitFileWriter(pickle_path, rows, self.settings.image_size) as writer:  # removed on any error
            self.writer = writer
            try:
                self._decode_all()
            except BrokenProcessPool as exc:
                raise PreprocessError(worker_death_message(exc, self.settings)) from exc
            finally:
                self.progress.close()
        if self.source.local_path("") is not None:  # the decode processes read the files: count the bytes here
            self.source.stats.add(bytes_read=sum(info["bytes"] for info in self.decoded_info if info is not None))
        self.skipped.sort(key=lambda entry: (entry["id"], entry["key"]))
        stats_after = self.source.stats.as_dict()
        source_stats = {name: stats_after[name] - stats_before[name] for name in stats_after}
        return self._result(class_names, time.perf_counter() - started, source_stats)

    def _decode_all(self) -> None:
        batch: list[tuple[int, bytes | str]] = []
        for slot, data in self._fetched():
            batch.append((slot, data))
            if len(batch) >= DECODE_BATCH:
                self._submit(batch)
                batch = []
        if batch:
            self._submit(batch)
        for future in self.pending:
            self._take(future.result())

    def _fetched(self) -> Iterator[tuple[int, bytes | str]]:
        """(slot, bytes or path): folders hand paths to the decode processes, S3 objects are downloaded here."""
        source = self.source
        if source.local_path("") is not None:
            for key, slot in self.slot_of_key.items():
                yield slot, source.local_path(key)
            return
        for key, result in source.fetch_many(list(self.slot_of_key), threads=self.settings.download_threads):
            slot = self.slot_of_key[key]
            if isinstance(result, sources.ObjectSkip):
                self._skip(self.plan.items[self.row_of_slot[slot]], result.reason, str(result))
                self.progress.update(1)
                continue
            yield slot, result

    def _submit(self, batch: list[tuple[int, bytes | str]]) -> None:
        """Decode ``batch`` here (one worker) or hand it to the pool, waiting while too many are in flight."""
        settings = self.settings
        task = (batch, settings.image_size, settings.policy, settings.max_pixels, self.writer.slots)
        if self.pool is None:
            self._take(decode_batch(*task))
            return
        self.pending.add(self.pool.submit(decode_batch, *task))
        while len(self.pending) >= self.max_pending:
            done, self.pending = wait(self.pending, return_when=FIRST_COMPLETED)
            for future in done:
                self._take(future.result())

    def _take(self, results: list[Decoded]) -> None:
        """Record a finished decode task: written slots and their info, skips with their reason."""
        self.writer.rows_written(sum(1 for _, info, _ in results if info is not None))
        for slot, info, problem in results:
            if info is None:
                self._skip(self.plan.items[self.row_of_slot[slot]], *problem)
            else:
                self.written[slot] = True
                self.decoded_info[slot] = info
            self.progress.update(1)

    def _result(self, class_names: list[str], seconds: float, source_stats: dict) -> SplitResult:
        """The split's pickle dict (without its images, which are already in the file) for the written slots."""
        plan, settings = self.plan, self.settings
        kept_slots = np.flatnonzero(self.written)
        # A shard with no image of this split still writes its pickle, with N = 0 rows (same schema),
        # so the loader finds every shard of the split; a split that had images but kept none writes nothing.
        empty_shard = settings.num_shards > 1 and plan.listed == 0
        if len(kept_slots) == 0 and not empty_shard:
            self.writer.discard()
            return SplitResult(plan, None, self.skipped, seconds, source_stats)
        kept = [plan.items[self.row_of_slot[slot]] for slot in kept_slots]
        infos = [self.decoded_info[slot] for slot in kept_slots]
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
                "image_size": settings.image_size,
                "resize_policy": settings.policy,
                "max_pixels": settings.max_pixels,
                "source": settings.input_uri,
                "listed": plan.listed,
                "skipped": len(self.skipped),
            },
        }
        if plan.has_csv_rows:
            data["meta"]["csv_row"] = np.array([item.csv_row for item in kept], dtype=np.int64)
        return SplitResult(plan, data, self.skipped, seconds, source_stats, [info["sha256"] for info in infos],
                           self.writer, kept_slots)


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


def build_split(source: sources.Source, plan: Plan, split_plan: SplitPlan, number: int,
                settings: PreprocessSettings, pool: ProcessPoolExecutor | None, staging_dir: Path) -> SplitResult:
    """Step ``number`` of the run: build ``split_plan`` into its unfinished pickle in ``staging_dir``
    (``dss.ingest.publishing`` commits it), log what happened, and check the rows."""
    cli.log.info(f"\n{number}. Processing {SPLIT_TITLES.get(split_plan.name, split_plan.name.upper())} images...")
    cli.log.info(f"Getting image list from {split_plan.source}")
    unresolved = split_plan.listed - len(split_plan.items)
    cli.log.info(f"Found {len(split_plan.items)} images"
                 + (f" ({unresolved} listed ids are skipped before download: see the summary)" if unresolved else ""))
    cli.log.info(f"Processing {len(split_plan.items)} images...")
    names = records.file_names(settings.num_shards, settings.shard_index)
    result = SplitBuilder(source, split_plan, settings, pool).build(
        plan.class_names, staging_dir / names[f"{split_plan.name}_data"])
    written = 0 if result.data is None else len(result.data["ids"])
    reasons = sorted(Counter(entry["reason"] for entry in result.skipped).items())
    cli.log.info(f"Written {written}, skipped {len(result.skipped)}"
                 + (f" ({', '.join(f'{r}: {n}' for r, n in reasons)})" if reasons else "")
                 + f" in {result.seconds:.1f} s ({written / max(result.seconds, 1e-9):.1f} images/s)")
    if result.data is None and split_plan.listed:
        examples = "; ".join(f"{e['key']}: {e['reason']}" for e in result.skipped[:5])
        raise PreprocessError(f"all {split_plan.listed} {split_plan.name} images were skipped, nothing "
                              f"to write (e.g. {examples})")
    if result.data is not None:
        try:
            check_alignment(result, plan.label_of if split_plan.has_labels else None)
        except BaseException:
            result.discard()
            raise
    return result
