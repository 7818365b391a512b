"""Writing a run's outputs: finish the split pickles, write metadata CSVs and summaries, publish.

    summary = publish(output, plan, results, settings, started)

Everything is written into the output's staging folder first and then published under its final
name (a rename for folders, an upload for ``s3://``), the summaries last: a summary on disk means
the run completed. A write that fails (disk full) raises an OSError naming the file; nothing
partial is left under a final name, and ``os_error_message`` turns it into one line for people.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from dss import cli, fileio
from dss.ingest import records, reporting, sources
from dss.ingest.building import SplitResult
from dss.ingest.planning import Plan, PreprocessError, PreprocessSettings


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
        raise ValueError(f"the pickle of split {result.plan.name} is being built as {result.writer.final_path}, "
                         f"not {path}")
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


# --------------------------------------------------------------------------- one data set per output
# A file name preprocess writes, with its shard tag: train_data-00001-of-00004.pkl -> (1, 4); no tag -> (0, 1).
_SHARD_TAG = re.compile(r"^(?P<base>[a-z_]+?)(?:-(?P<index>\d{5})-of-(?P<count>\d{5}))?(?P<ext>\.[a-z]+)$")


@dataclass
class _Written:
    """The files one earlier run (one shard tag) left in the output, and the data set its summary records."""

    names: list[str]
    summary: str | None = None   # its preprocessing_summary*.json, when readable
    record: dict | None = None   # records.recorded_identity of that summary; None: no record


def _shard_of(name: str) -> tuple[int, int] | None:
    """(shard index, shard count) of a file name preprocess writes, or None for any other file."""
    match = _SHARD_TAG.match(name)
    if match is None or match["base"] + match["ext"] not in records.file_names(1, 0).values():
        return None
    return (int(match["index"]), int(match["count"])) if match["index"] else (0, 1)


def _earlier_runs(output: sources.Output) -> dict[tuple[int, int], _Written]:
    """What earlier runs left in the output, by shard tag, each with the data set its summary records."""
    runs: dict[tuple[int, int], _Written] = {}
    for name in sorted(output.existing_names(), key=lambda name: (not name.endswith(".pkl"), name)):  # pickles first
        shard = _shard_of(name)
        if shard is not None:
            runs.setdefault(shard, _Written([])).names.append(name)
    for (index, count), written in runs.items():
        summary_name = records.file_names(count, index)["summary_json"]
        if summary_name in written.names:
            try:
                written.record = records.recorded_identity(json.loads(output.read_existing(summary_name) or b""))
            except ValueError:  # unreadable JSON: no record
                written.record = None
            written.summary = summary_name if written.record else None
    return runs


def _is_other_dataset(shard: tuple[int, int], written: _Written, ours: dict, settings: PreprocessSettings) -> bool:
    if written.record == ours:
        return False
    # A sibling shard run of this job publishes its pickles before its summary: a shard of this run's
    # K without a summary yet is taken as one still publishing, never as another data set.
    sibling = settings.num_shards > 1 and shard[1] == settings.num_shards and shard[0] != settings.shard_index
    return not (sibling and written.record is None)


def _describe(identity: dict) -> str:
    return (f"input {identity['input']} at {identity['image_size']} px, --resize {identity['resize_policy']}, "
            f"--max-pixels {identity['max_pixels']}")


def _fresh_folder(output: sources.Output, identity: dict) -> str:
    """A folder name for this data set beside the output: ``./output`` + input ``./week-12`` -> ``./output-week-12``."""
    name = PurePosixPath(identity["input"].rstrip("/")).name or "new"
    return f"{output.describe().rstrip('/')}-{name}" + ("/" if sources.is_s3_uri(output.describe()) else "")


def check_output_dataset(output: sources.Output, settings: PreprocessSettings) -> None:
    """Refuse, before anything is read, written or removed, to write this run's data set into an output
    holding files of another (another input, or other settings that decide the pixels): they would be
    replaced or swept, and training would read a mix. Files without a summary recording their data set
    count as another's. ``settings.overwrite`` allows it (``publish`` then removes the other's files)."""
    if settings.overwrite:
        return
    ours = reporting.dataset_identity(settings)
    others = {shard: written for shard, written in sorted(_earlier_runs(output).items())
              if _is_other_dataset(shard, written, ours, settings)}
    if not others:
        return
    lines = []
    for written in others.values():
        names = ", ".join(written.names[:4]) + (f" and {len(written.names) - 4} more" if len(written.names) > 4 else "")
        what = (f"the data set of {_describe(written.record)} (from {written.summary})" if written.record
                else "no readable preprocessing summary records which data set they belong to")
        lines.append(f"  - {names}: {what}")
    raise PreprocessError(
        f"{output.describe()} holds another data set's files:\n" + "\n".join(lines) + f"\nThis run writes "
        f"{_describe(ours)}, and would replace or delete them. Nothing was written or removed. Use a fresh "
        f"--output-dir (one folder per data set, e.g. --output-dir {_fresh_folder(output, ours)}), or pass "
        "--overwrite true to replace that data set with this one.")


def _stale_files(output: sources.Output, settings: PreprocessSettings, produced: list[str]) -> list[tuple[str, str]]:
    """(name, why) of the files earlier runs left that this run supersedes: its own names for a split this
    input no longer has; this data set's files at another shard count (old shard j goes with new shard
    j mod K, so each old file is removed by exactly one new run); with --overwrite, another data set's
    files at another shard count. Never other shards' files of this run's K (each sibling replaces its own)."""
    ours, own = reporting.dataset_identity(settings), (settings.shard_index, settings.num_shards)
    stale = []
    for shard, written in _earlier_runs(output).items():
        if shard == own:
            why = "a split this input does not have" if written.record == ours else "another data set's (--overwrite)"
            stale += [(name, why) for name in written.names if name not in produced]
        elif written.record == ours:
            if shard[1] != settings.num_shards and shard[0] % settings.num_shards == settings.shard_index:
                stale += [(name, f"this data set as {shard[1]} shard(s); now {settings.num_shards}")
                          for name in written.names]
        elif settings.overwrite and shard[1] != settings.num_shards and _is_other_dataset(shard, written, ours,
                                                                                            settings):
            # Same-K siblings are left alone: each replaces its own files, and one may be publishing
            # its new pickles right now, before its summary says so.
            stale += [(name, "another data set's (--overwrite)") for name in written.names]
    return stale


def _remove_stale(output: sources.Output, settings: PreprocessSettings, produced: list[str], summary: dict) -> None:
    """Remove what ``_stale_files`` finds (training would otherwise read it with this run's files), and
    say so in the log and the summary."""
    removed = []
    for name, why in _stale_files(output, settings, produced):
        for path in output.remove_stale([name]):
            cli.log.info(f"Removed {path} (left by an earlier run: {why})")
            removed.append(path)
    if removed:
        summary["removed_stale_files"] = removed
        summary["warnings"].append(f"removed {len(removed)} file(s) an earlier run left in the output, "
                                   f"superseded by this run: {', '.join(removed)}")


def publish(output: sources.Output, plan: Plan, results: list[SplitResult], settings: PreprocessSettings,
            started: float) -> dict:
    """Finish the split pickles, write the metadata CSVs and the summaries, publish them; returns the
    summary. ``started``: the run's ``time.perf_counter()`` at its start, for the total timing."""
    names = records.file_names(settings.num_shards, settings.shard_index)
    summary = reporting.run_summary(plan, settings, output.describe())
    cli.log.info(f"\n{len(plan.splits) + 1}. Saving preprocessed data to {output.describe()}...")
    to_publish = []
    for result in results:
        split = result.plan.name
        summary["splits"][split] = reporting.split_summary(result)
        if result.data is None:
            continue
        pickle_name, metadata_name = names[f"{split}_data"], names[f"{split}_metadata"]
        _write(output.staging_dir / pickle_name, _commit_pickle, result)
        _write(output.staging_dir / metadata_name, fileio.write_text, records.metadata_csv(result.data))
        summary["files"][split] = {"pickle": pickle_name, "metadata": metadata_name}
        to_publish += [pickle_name, metadata_name]
    _remove_stale(output, settings, to_publish + [names["summary_json"], names["summary_txt"]], summary)
    total_seconds = time.perf_counter() - started
    total_written = sum(s["written"] for s in summary["splits"].values())
    summary["timing"] = {"seconds": round(total_seconds, 3),
                         "images_per_second": round(total_written / total_seconds, 1) if total_seconds else None,
                         "workers": settings.workers, "download_threads": settings.download_threads}
    _write(output.staging_dir / names["summary_json"], fileio.write_json, summary)
    _write(output.staging_dir / names["summary_txt"], fileio.write_text, records.summary_text(summary))
    to_publish += [names["summary_txt"], names["summary_json"]]
    output.publish(to_publish)  # the summaries last: the run is complete
    for name in to_publish:
        size = f" ({(output.staging_dir / name).stat().st_size / 1e6:.1f} MB)" if name.endswith(".pkl") else ""
        cli.log.info(f"Saved {output.describe(name)}{size}")
    cli.log.info(f"\nPREPROCESSING COMPLETE: {total_written} images in {total_seconds:.1f} s")
    return summary
