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
import shutil
from pathlib import Path
from typing import IO, Collection, Iterator

from dss.cli import log

_TEMP_PATTERN = re.compile(r"^\.(?P<final>.+)\.(?P<pid>\d+)\.tmp$")
_STAGING_PATTERN = re.compile(r"^\.staging-(?P<pid>\d+)$")


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


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists in this pid namespace (owned by anyone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def staging_folder(folder: str | os.PathLike) -> Path:
    """This process's staging folder inside ``folder`` (same filesystem, so ``os.replace`` is atomic)."""
    return Path(folder) / f".staging-{os.getpid()}"


def sweep_stale(folder: str | os.PathLike, finals: Collection[str] | None = None) -> list[Path]:
    """Remove what killed runs left in ``folder``: temp files (``.<final>.<pid>.tmp``) and staging
    folders (``.staging-<pid>``) whose pid is gone. Returns what was removed.

    ``finals``: only temps of these final file names, and no staging folders. Runs that share a
    folder across machines or containers (shards on a network filesystem) see pids of other pid
    namespaces as dead, so each such run sweeps only the names it is about to write itself.
    """
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in sorted(folder.iterdir()):
        temp = _TEMP_PATTERN.match(entry.name)
        staging = _STAGING_PATTERN.match(entry.name) if finals is None else None
        if temp and entry.is_file() and (finals is None or temp.group("final") in finals):
            pid = int(temp.group("pid"))
        elif staging and entry.is_dir() and not entry.is_symlink():
            pid = int(staging.group("pid"))
        else:
            continue
        if pid != os.getpid() and pid_alive(pid):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
        if not entry.exists():
            removed.append(entry)
    return removed


def sweep_leftovers(folders: list[Path]) -> None:
    """Temp files and staging folders left in the output folders by runs that were killed."""
    for folder in dict.fromkeys(folders):
        for path in sweep_stale(folder):
            log.info(f"removed {path} (left by a run that was killed)")


class StagedFiles:
    """A set of output files that replace their final names together, or not at all.

    Writers write to ``stage.path(final)`` (``<final's folder>/.staging-<pid>/<name>``, with this
    module's writers); ``publish()`` then ``os.replace``s every staged file onto its final name,
    in the order the paths were asked for (put the file whose presence means "run complete" last),
    after removing the names given to ``remove``. Used as a context manager, the staging folders
    are deleted on exit, so a failure before ``publish()`` leaves the final names untouched.
    """

    def __init__(self):
        self._staged: list[tuple[Path, Path]] = []  # (staged path, final path)
        self._remove: list[Path] = []
        self._folders: list[Path] = []

    def __enter__(self) -> "StagedFiles":
        return self

    def __exit__(self, *exc_info) -> None:
        self.discard()

    def path(self, final: str | os.PathLike) -> Path:
        """Where to write the file that will become ``final``."""
        final = Path(final)
        if any(final == known for _, known in self._staged) or final in self._remove:
            raise ValueError(f"{final} is staged twice")
        staging = staging_folder(final.parent)
        staging.mkdir(parents=True, exist_ok=True)
        if staging not in self._folders:
            self._folders.append(staging)
        staged = staging / final.name
        self._staged.append((staged, final))
        return staged

    def remove(self, final: str | os.PathLike) -> None:
        """Delete ``final`` at publish time, if it exists (an output this run does not produce)."""
        final = Path(final)
        if any(final == known for _, known in self._staged):
            raise ValueError(f"{final} is both staged and to be removed")
        self._remove.append(final)

    def publish(self) -> list[Path]:
        """Move every staged file onto its final name; returns the paths removed as stale.

        Every check that can fail (``check``) is done before the first rename, so an error leaves
        all final names as they were (renames within one folder do not fail short of a crash)."""
        self.check()
        removed = []
        for final in self._remove:
            if final.is_file() or final.is_symlink():
                final.unlink()
                removed.append(final)
        for staged, final in self._staged:
            os.replace(staged, final)
        for folder in {final.parent for _, final in self._staged} | {final.parent for final in self._remove}:
            fsync_folder(folder)
        return removed

    def check(self) -> None:
        """Raise what would stop ``publish``: a staged file missing, a final name that is a folder."""
        for staged, final in self._staged:
            if not staged.is_file():
                raise FileNotFoundError(f"{staged}: nothing was written for {final}")
        for final in [final for _, final in self._staged] + self._remove:
            if final.is_dir() and not final.is_symlink():
                raise IsADirectoryError(f"{final} is a directory: cannot replace it with this run's file; "
                                        "move it away and re-run")

    def discard(self) -> None:
        """Delete the staging folders and whatever is still in them."""
        for folder in self._folders:
            shutil.rmtree(folder, ignore_errors=True)
        self._folders = []
