"""Writing a run's outputs: finish the split pickles, write metadata CSVs and summaries, publish.

    summary = publish(output, plan, results, settings, started)

Everything is written into the output's staging folder first and then published under its final
name (a rename for folders, an upload for ``s3://``), the summaries last: a summary on disk means
the run completed. A write that fails (disk full) raises an OSError naming the file; nothing
partial is left under a final name, and ``os_error_message`` turns it into one line for people.
"""

from __future__ import annotations

import errno
import os
import tempfile
import time
from pathlib import Path

from dss import cli, dataset, fileio, reporting, sources
from dss.building import SplitResult
from dss.planning import Plan, PreprocessSettings


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


def _remove_stale(output: sources.Output, names: dict[str, str], produced: list[str], summary: dict) -> None:
    """Remove split files an earlier run left in the output for splits this input does not have
    (training would otherwise read them as this run's), and say so in the log and the summary."""
    stale = [names[f"{split}_{kind}"] for split in dataset.SPLITS for kind in ("data", "metadata")
             if names[f"{split}_{kind}"] not in produced]
    removed = output.remove_stale(stale)
    for path in removed:
        cli.log.info(f"Removed {path} (left by an earlier run; this input has no such split)")
    if removed:
        summary["removed_stale_files"] = removed
        summary["warnings"].append(f"removed {len(removed)} file(s) an earlier run left in the output, "
                                   f"for splits this input does not have: {', '.join(removed)}")


def publish(output: sources.Output, plan: Plan, results: list[SplitResult], settings: PreprocessSettings,
            started: float) -> dict:
    """Finish the split pickles, write the metadata CSVs and the summaries, publish them; returns the
    summary. ``started``: the run's ``time.perf_counter()`` at its start, for the total timing."""
    names = reporting.file_names(settings.num_shards, settings.shard_index)
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
        _write(output.staging_dir / metadata_name, fileio.write_text, reporting.metadata_csv(result.data))
        summary["files"][split] = {"pickle": pickle_name, "metadata": metadata_name}
        to_publish += [pickle_name, metadata_name]
    if settings.num_shards == 1:
        _remove_stale(output, names, to_publish, summary)
    total_seconds = time.perf_counter() - started
    total_written = sum(s["written"] for s in summary["splits"].values())
    summary["timing"] = {"seconds": round(total_seconds, 3),
                         "images_per_second": round(total_written / total_seconds, 1) if total_seconds else None,
                         "workers": settings.workers, "download_threads": settings.download_threads}
    _write(output.staging_dir / names["summary_json"], fileio.write_json, summary)
    _write(output.staging_dir / names["summary_txt"], fileio.write_text, reporting.summary_text(summary))
    to_publish += [names["summary_txt"], names["summary_json"]]
    output.publish(to_publish)  # the summaries last: the run is complete
    for name in to_publish:
        size = f" ({(output.staging_dir / name).stat().st_size / 1e6:.1f} MB)" if name.endswith(".pkl") else ""
        cli.log.info(f"Saved {output.describe(name)}{size}")
    cli.log.info(f"\nPREPROCESSING COMPLETE: {total_written} images in {total_seconds:.1f} s")
    return summary
