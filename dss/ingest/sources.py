"""List and read objects from ``s3://bucket/prefix/`` or a local folder behind one small interface.

    source = open_source("s3://animal-classification-dss-works/data/")   # or open_source("./data")
    infos = source.list("train_features/")        # [ObjectInfo(key, size)], sorted by key
    data = source.read("train_labels.csv")        # bytes; raises ObjectSkip for a per-key problem
    for key, result in source.fetch_many(keys, threads=16): ...   # bytes or ObjectSkip, as they arrive

Keys are relative to the source root (the folder, or the prefix after the bucket), with ``/``
separators, so ``train_features/ZJ000000.jpg`` means the same object in both kinds of source and
matches the ``filepath`` column of ``train_features.csv``.

Two kinds of errors:
- ``SourceError``: the whole run cannot go on (no credentials, bucket missing, access denied,
  endpoint unreachable, too many downloads failing in a row). Never retried by us.
- ``ObjectSkip``: one key cannot be used (deleted between list and get, too large, download
  failed after all retries). The caller records ``.reason`` and the message and goes on.

The output side (``open_output``) writes result files to a local folder, or stages them in a
temp folder and uploads them to ``s3://`` when ``publish`` is called. The S3 side (client, retries,
checksums) is in ``dss.ingest.s3``; ``dss.ingest.storage`` opens either, importing ``dss.ingest.s3``
only for ``s3://`` URIs so folder runs never load boto3.
"""

from __future__ import annotations

import errno
import os
import threading
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Collection, Iterable, Iterator

from dss import fileio

DEFAULT_MAX_OBJECT_BYTES = 50 * 1024 * 1024  # objects above this are rejected from the listing
DEFAULT_DOWNLOAD_THREADS = 16
DEFAULT_MAX_ATTEMPTS = 5  # botocore counts the first try: 5 = 1 try + 4 retries
DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_READ_TIMEOUT_S = 60.0
# After this many downloads in a row fail with a transport/throttling error, stop the run:
# the endpoint is down or throttling everything, and waiting out every key would take hours.
DEFAULT_MAX_CONSECUTIVE_FAILURES = 50
# Skip reasons that count towards that streak (a per-key problem such as "missing" does not).
STREAK_REASONS = frozenset({"download_failed", "checksum_mismatch"})
S3_STAGING_PREFIX = "dss-output-"  # local temp folders where an s3:// output is written before upload


class SourceError(RuntimeError):
    """The run cannot continue with this source or output (message says what to do)."""


class ObjectSkip(Exception):
    """One object cannot be used. ``reason`` is a short code for summaries (``missing``, ``too_large``...)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, order=True)
class ObjectInfo:
    key: str   # relative to the source root, "/"-separated
    size: int  # bytes, from the listing


@dataclass(frozen=True)
class SourceOptions:
    """How a source or output reaches its store. Folders use only the two limits."""

    endpoint_url: str | None = None  # None: botocore's own resolution (AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL)
    # Attempts per S3 request, first try included. None: AWS_MAX_ATTEMPTS or the AWS config
    # file's max_attempts, else DEFAULT_MAX_ATTEMPTS.
    max_attempts: int | None = None
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S  # seconds
    read_timeout: float = DEFAULT_READ_TIMEOUT_S  # seconds without a byte from the socket
    download_threads: int = DEFAULT_DOWNLOAD_THREADS  # sizes the S3 connection pool
    max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES
    max_consecutive_failures: int = DEFAULT_MAX_CONSECUTIVE_FAILURES
    verify_etag: bool = True  # False for stores whose ETags are not MD5s of the content


@dataclass
class FetchStats:
    """Run-dependent counters (they vary between runs; summaries keep them with the timings)."""

    retries: int = 0           # botocore retries reported in ResponseMetadata.RetryAttempts
    body_retries: int = 0      # our own retries of short/dropped bodies
    integrity_retries: int = 0  # our own retries of bodies whose checksum/ETag did not match
    bytes_read: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, retries: int = 0, body_retries: int = 0, integrity_retries: int = 0, bytes_read: int = 0) -> None:
        with self._lock:
            self.retries += retries
            self.body_retries += body_retries
            self.integrity_retries += integrity_retries
            self.bytes_read += bytes_read

    def as_dict(self) -> dict:
        return {"s3_retries": self.retries, "body_retries": self.body_retries,
                "integrity_retries": self.integrity_retries, "bytes_read": self.bytes_read}


def is_s3_uri(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # matched case-insensitively; no extension is accepted too


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


# --------------------------------------------------------------------------- base
class Source:
    """A read-only tree of objects. Subclasses implement ``_list``, ``read``, ``exists`` and ``describe``."""

    def __init__(self, options: SourceOptions):
        self.max_object_bytes = options.max_object_bytes
        self.max_consecutive_failures = options.max_consecutive_failures
        self.stats = FetchStats()

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """All objects under ``prefix`` (relative), sorted by key. Directory markers are left out."""
        infos = [info for info in self._list(prefix) if not info.key.endswith("/")]
        return sorted(infos)

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def local_path(self, key: str) -> str | None:
        """A path any process can open for ``key`` (folders), or None (the bytes must be fetched)."""
        return None

    def read(self, key: str) -> bytes:
        raise NotImplementedError

    def describe(self, key: str = "") -> str:
        """A full, human-readable location (``s3://bucket/data/key`` or a path)."""
        raise NotImplementedError

    def _list(self, prefix: str) -> Iterable[ObjectInfo]:
        raise NotImplementedError

    def check_size(self, info: ObjectInfo) -> None:
        """Reject an object from its listed size, before any download."""
        if info.size > self.max_object_bytes:
            raise ObjectSkip("too_large", f"{self.describe(info.key)} is {info.size} bytes, above the "
                                          f"{self.max_object_bytes}-byte cap; not downloaded")

    def fetch_many(self, keys: Iterable[str], threads: int = DEFAULT_DOWNLOAD_THREADS,
                   prefetch: int | None = None) -> Iterator[tuple[str, bytes | ObjectSkip]]:
        """Read ``keys`` on ``threads`` threads; yield ``(key, bytes or ObjectSkip)`` as each finishes.

        At most ``prefetch`` (default 4 x threads) reads are in flight or waiting to be consumed, so
        memory stays bounded however many keys there are. ``SourceError`` (run-level) propagates;
        so does a streak of ``max_consecutive_failures`` transport failures (the store is down).
        """
        threads = max(1, int(threads))
        window = prefetch or threads * 4
        pending_keys = deque(keys)
        consecutive_failures = 0
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dss-fetch") as pool:
            in_flight = {}

            def top_up():
                while pending_keys and len(in_flight) < window:
                    key = pending_keys.popleft()
                    in_flight[pool.submit(self._read_or_skip, key)] = key

            top_up()
            try:
                while in_flight:
                    done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                    for future in done:
                        key = in_flight.pop(future)
                        result = future.result()  # SourceError propagates from here
                        if isinstance(result, ObjectSkip) and result.reason in STREAK_REASONS:
                            consecutive_failures += 1
                            if consecutive_failures >= self.max_consecutive_failures:
                                raise SourceError(
                                    f"{consecutive_failures} downloads in a row failed after all retries; "
                                    f"stopping. Last: {result}")
                        elif not isinstance(result, ObjectSkip):
                            consecutive_failures = 0
                        yield key, result
                    top_up()
            finally:
                for future in in_flight:
                    future.cancel()

    def _read_or_skip(self, key: str) -> bytes | ObjectSkip:
        try:
            return self.read(key)
        except ObjectSkip as skip:
            return skip


# --------------------------------------------------------------------------- local folder
def read_local_file(path: str) -> bytes:
    """Read one listed file; a vanished or unreadable file is an ObjectSkip (also in decode processes)."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise ObjectSkip("missing", f"{path} disappeared after it was listed") from None
    except OSError as exc:
        raise ObjectSkip("read_failed", f"{path}: {exc}") from None


class LocalSource(Source):
    def __init__(self, root: str | os.PathLike, options: SourceOptions):
        super().__init__(options)
        self.root = Path(root)
        self._root_text = str(self.root)
        if not self.root.exists():
            raise SourceError(f"input folder {self.root} does not exist")
        if not self.root.is_dir():
            raise SourceError(f"input {self.root} is not a folder")

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*PurePosixPath(key).parts)

    def _list(self, prefix: str) -> Iterable[ObjectInfo]:
        start = self._path(prefix) if prefix else self.root
        if not start.is_dir():
            return []
        infos = []
        # Keys are built as strings, not Paths: pathlib's parsing costs more than the listing itself
        # (measured in docs/benchmarks.md, "Design notes from measurements").
        root_parts = len(self.root.parts)
        start_key = "/".join(start.parts[root_parts:])
        self._list_folder(str(start), f"{start_key}/" if start_key else "", infos)
        return infos

    @classmethod
    def _list_folder(cls, folder: str, key_prefix: str, infos: list[ObjectInfo]) -> None:
        """Files under ``folder`` as ObjectInfo(key_prefix + relative path). Symlinked folders are not
        followed (no cycles); symlinked files are listed; dangling symlinks are not objects."""
        try:
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError:
            return  # an unreadable subfolder holds no objects we can read (as os.walk skips it)
        for entry in entries:
            try:
                if entry.is_dir():
                    if not entry.is_symlink():
                        cls._list_folder(entry.path, f"{key_prefix}{entry.name}/", infos)
                    continue
                size = entry.stat().st_size
            except OSError:
                continue  # a dangling symlink, or a file removed while listing
            infos.append(ObjectInfo(f"{key_prefix}{entry.name}", size))

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def read(self, key: str) -> bytes:
        data = read_local_file(self.local_path(key))
        self.stats.add(bytes_read=len(data))
        return data

    def local_path(self, key: str) -> str:
        # Plain string joins: this runs once per image in the main process, where pathlib's parsing
        # is a measurable share of the time per image (docs/benchmarks.md).
        return os.path.join(self._root_text, *key.split("/")) if key else self._root_text

    def describe(self, key: str = "") -> str:
        return str(self._path(key)) if key else str(self.root)


# --------------------------------------------------------------------------- outputs
class Output:
    """Where result files go. Writers put files in ``staging_dir`` (atomically, via dss.fileio);
    ``publish(names)`` makes them final at the destination."""

    staging_dir: Path

    def prepare(self, names: Collection[str] | None = None) -> None:
        """Create/check the destination; fail fast (before any download) if it is not writable.
        ``names``: the files this run will write (temps of these left by killed runs are swept)."""
        raise NotImplementedError

    def publish(self, names: list[str]) -> None:
        raise NotImplementedError

    def remove_stale(self, names: list[str]) -> list[str]:
        """Delete files of ours an earlier run left at the destination; returns what was removed."""
        raise NotImplementedError

    def existing_names(self) -> list[str]:
        """The file names at the destination's top level now (what earlier runs left), sorted."""
        raise NotImplementedError

    def read_existing(self, name: str) -> bytes | None:
        """The bytes of ``name`` at the destination, or None when there is no such file."""
        raise NotImplementedError

    def describe(self, name: str = "") -> str:
        raise NotImplementedError

    def close(self) -> None:
        """Drop temporary staging files (nothing for a local folder)."""


class LocalOutput(Output):
    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.staging_dir = self.folder

    def prepare(self, names: Collection[str] | None = None) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SourceError(f"cannot create output folder {self.folder}: {exc}") from exc
        fileio.sweep_stale(self.folder, names)
        probe = self.folder / ".preprocess-write-check"
        try:
            fileio.write_bytes(probe, b"ok")
            probe.unlink(missing_ok=True)  # a concurrent run into the same folder may have removed it first
        except OSError as exc:
            full = " (disk full)" if exc.errno == errno.ENOSPC else ""
            raise SourceError(f"output folder {self.folder} is not writable{full}: {exc}") from exc

    def publish(self, names: list[str]) -> None:
        return None  # files were written in place, atomically

    def remove_stale(self, names: list[str]) -> list[str]:
        removed = []
        for name in names:
            path = self.folder / name
            try:
                path.unlink()
            except FileNotFoundError:  # gone already (a sibling shard run removed it)
                continue
            removed.append(str(path))
        return removed

    def existing_names(self) -> list[str]:
        if not self.folder.is_dir():
            return []
        return sorted(entry.name for entry in self.folder.iterdir() if entry.is_file())

    def read_existing(self, name: str) -> bytes | None:
        try:
            return (self.folder / name).read_bytes()
        except FileNotFoundError:
            return None

    def describe(self, name: str = "") -> str:
        return str(self.folder / name) if name else str(self.folder)
