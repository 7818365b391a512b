"""Atomic file writes: a killed or failing run never leaves a partial file under a final name.

Every writer goes through ``atomic_write``: it writes a temp file in the same folder
(named ``.<final name>.<pid>.tmp`` so a later run can recognise and sweep it), fsyncs
it, then ``os.replace``s it over the final name and fsyncs the folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import IO, Collection, Iterator

_TEMP_PATTERN = re.compile(r"^\.(?P<final>.+)\.(?P<pid>\d+)\.tmp$")


def temp_path(final: Path) -> Path:
    """The temp name beside ``final`` that this process writes first (swept if the process dies)."""
    return final.with_name(f".{final.name}.{os.getpid()}.tmp")


def fsync_folder(path: str | os.PathLike) -> None:
    """fsync a folder by path, making the renames in it durable. Best effort: some filesystems
    cannot open or fsync a folder. (Files are fsynced by their writers, which must see the error.)"""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temp file beside ``path``; on success it replaces ``path`` atomically.

    On any exception (including disk full) the temp file is removed and the old
    ``path``, if any, is left untouched.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write supports modes 'wb' and 'w', not {mode!r}")
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_path(final)
    if mode == "w":
        handle = open(temp, "w", encoding=encoding or "utf-8", newline="")
    else:
        handle = open(temp, "wb")
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    fsync_folder(final.parent)


def replace_with_temp(temp: Path, final: Path) -> None:
    """Make a fully written and fsync'd ``temp`` (from ``temp_path``) the file ``final``, durably."""
    os.replace(temp, final)
    fsync_folder(final.parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as handle:
        handle.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w") as handle:
        handle.write(text)


def write_json(path: str | os.PathLike, obj, indent: int = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent, sort_keys=False, default=_json_default) + "\n")


def _json_default(value):
    # numpy scalars and paths appear in summaries and configs; write them as plain JSON.
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_temps(folder: str | os.PathLike, finals: Collection[str] | None = None) -> list[Path]:
    """Remove temp files left in ``folder`` by killed runs (their pid is gone). Returns what was removed.

    ``finals``: only temps of these final file names. Runs that share a folder across machines or
    containers (shards on a network filesystem) see pids of other pid namespaces as dead, so each
    run sweeps only the names it is about to write itself.
    """
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _TEMP_PATTERN.match(entry.name)
        if not match or not entry.is_file() or (finals is not None and match.group("final") not in finals):
            continue
        pid = int(match.group("pid"))
        if pid != os.getpid() and _pid_alive(pid):
            continue
        with contextlib.suppress(OSError):
            entry.unlink()
            removed.append(entry)
    return removed
