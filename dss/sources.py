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

S3 details: boto3 is imported only here and only for ``s3://`` URIs. Requests retry in botocore's
``standard`` mode (throttling and 500/502/503/504; 403s are never retried), with connect/read
timeouts. ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` are honoured by botocore itself; an explicit
``endpoint_url`` wins over them. S3-compatible stores that reject the default checksums work with
``AWS_REQUEST_CHECKSUM_CALCULATION=when_required`` (read by botocore). A body shorter than its
Content-Length (or a connection dropped mid-body) is retried here, since botocore does not retry
once the headers have arrived.

Integrity of each body (ROBUSTNESS A4/C10): GETs ask for S3's stored checksum
(``ChecksumMode="ENABLED"``) and botocore checks the body against the ``x-amz-checksum-*`` header
while it is read. Where the response carries no such header (older objects, other stores), the
body is checked against the ETag when the ETag is a plain MD5 of the content (single-part upload,
no SSE-KMS/SSE-C). A mismatch is retried here like a short body; when every attempt mismatches the
key is skipped as ``checksum_mismatch``. Limit: bytes that were already corrupt when uploaded
carry a checksum and ETag of the corrupt bytes, so nothing here (nor Pillow) can notice them.

The output side (``open_output``) writes result files to a local folder, or stages them in a
temp folder and uploads them to ``s3://`` when ``publish`` is called.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import tempfile
import threading
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Collection, Iterable, Iterator

from dss import fileio

DEFAULT_MAX_OBJECT_BYTES = 50 * 1024 * 1024  # objects above this are rejected from the listing (A7)
DEFAULT_DOWNLOAD_THREADS = 16
DEFAULT_MAX_ATTEMPTS = 5  # botocore counts the first try: 5 = 1 try + 4 retries
DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_READ_TIMEOUT_S = 60.0
# After this many downloads in a row fail with a transport/throttling error, stop the run:
# the endpoint is down or throttling everything, and waiting out every key would take hours.
DEFAULT_MAX_CONSECUTIVE_FAILURES = 50
# Skip reasons that count towards that streak (a per-key problem such as "missing" does not).
S3_STAGING_PREFIX = "dss-output-"  # local temp folders where an s3:// output is written before upload
STREAK_REASONS = frozenset({"download_failed", "checksum_mismatch"})
# An ETag that is the MD5 of the bytes: 32 hex digits (multipart ETags end in "-<parts>").
MD5_ETAG = re.compile(r"[0-9a-f]{32}")
# Server-side encryption whose ETag is not an MD5 of the plaintext.
NON_MD5_ETAG_ENCRYPTION = frozenset({"aws:kms", "aws:kms:dsse"})

# S3 error codes meaning "these credentials may not do this": retrying never helps.
ACCESS_ERROR_CODES = frozenset({
    "AccessDenied", "InvalidAccessKeyId", "ExpiredToken", "ExpiredTokenException", "InvalidToken",
    "SignatureDoesNotMatch", "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem",
    "InvalidClientTokenId", "UnrecognizedClientException", "403", "Forbidden",
})
MISSING_KEY_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
MISSING_BUCKET_CODES = frozenset({"NoSuchBucket"})

CREDENTIALS_HELP = (
    "Configure AWS credentials first: `aws configure`, AWS_PROFILE=<profile>, or "
    "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (plus AWS_SESSION_TOKEN for temporary keys); "
    "on SageMaker/EC2 the instance role provides them. Check with `aws sts get-caller-identity`."
)
# S3 itself needs no region (botocore then uses us-east-1 and follows S3's redirect to the bucket's
# region), but a region that is set must be valid: an empty one builds "s3..amazonaws.com" or signs
# with an empty scope, a malformed one raises InvalidRegionError.
REGION_HELP = (
    "Set AWS_DEFAULT_REGION to the bucket's region (e.g. eu-west-1), or unset it and drop `region` "
    "from the profile in the AWS config file (AWS_CONFIG_FILE, default ~/.aws/config): S3 works "
    "without a region (us-east-1 is used and S3 redirects to the bucket's region)."
)
ACCESS_KEY_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


class SourceError(RuntimeError):
    """The run cannot continue with this source or output (message says what to do)."""


def credentials_error(exc, needed_for: str) -> SourceError:
    """SourceError for botocore's No/PartialCredentialsError (C11): its message verbatim, what the
    credentials were needed for, and how to configure them. botocore reports a lone
    AWS_ACCESS_KEY_ID as partial but silently ignores a lone AWS_SECRET_ACCESS_KEY, so name that here."""
    from botocore.exceptions import PartialCredentialsError

    hint = ""
    present = [name for name in ACCESS_KEY_VARIABLES if os.environ.get(name)]
    if len(present) == 1 and not isinstance(exc, PartialCredentialsError):
        missing = next(name for name in ACCESS_KEY_VARIABLES if name not in present)
        hint = f" {present[0]} is set but {missing} is not: an access key needs both."
    return SourceError(f"{exc} (needed to {needed_for}).{hint} {CREDENTIALS_HELP}")


class ObjectSkip(Exception):
    """One object cannot be used. ``reason`` is a short code for summaries (``missing``, ``too_large``...)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, order=True)
class ObjectInfo:
    key: str   # relative to the source root, "/"-separated
    size: int  # bytes, from the listing


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


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> (``bucket``, ``a/b/``): the prefix always ends with ``/`` (or is empty)."""
    if not is_s3_uri(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    rest = uri[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise SourceError(f"{uri!r} has no bucket name; expected s3://bucket/prefix/")
    prefix = prefix.strip("/")
    return bucket, (prefix + "/") if prefix else ""


def _join_key(prefix: str, key: str) -> str:
    return prefix + key.lstrip("/")


# --------------------------------------------------------------------------- base
class Source:
    """A read-only tree of objects. Subclasses implement ``_list``, ``_read`` and ``describe``."""

    kind = "base"

    def __init__(self, max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES,
                 max_consecutive_failures: int = DEFAULT_MAX_CONSECUTIVE_FAILURES):
        self.max_object_bytes = max_object_bytes
        self.max_consecutive_failures = max_consecutive_failures
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
        """Reject an object from its listed size, before any download (A7)."""
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
    kind = "folder"

    def __init__(self, root: str | os.PathLike, **kwargs):
        super().__init__(**kwargs)
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
        # Keys are built as strings, not Paths: pathlib's parsing cost more than the listing itself
        # (~0.1 s per 2,000 files).
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
        # cost 0.17 ms an image (a tenth of a decode process's time per image, taken from one of them).
        return os.path.join(self._root_text, *key.split("/")) if key else self._root_text

    def describe(self, key: str = "") -> str:
        return str(self._path(key)) if key else str(self.root)


# --------------------------------------------------------------------------- S3
def make_s3_client(endpoint_url: str | None = None, max_attempts: int = DEFAULT_MAX_ATTEMPTS,
                   connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
                   read_timeout: float = DEFAULT_READ_TIMEOUT_S,
                   max_pool_connections: int = DEFAULT_DOWNLOAD_THREADS + 4, session=None):
    """A boto3 S3 client with standard-mode retries, timeouts and a connection pool sized for the
    download threads. ``endpoint_url=None`` leaves botocore's own resolution (AWS_ENDPOINT_URL...).
    Raises SourceError for partial credentials, an empty or malformed region (C11) or a bad endpoint URL (C12)."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import InvalidRegionError, PartialCredentialsError

    config = Config(
        retries={"mode": "standard", "total_max_attempts": max_attempts},  # first try included
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        max_pool_connections=max_pool_connections,
    )
    session = session or boto3.session.Session()
    region = session.region_name  # AWS_DEFAULT_REGION or the profile's `region`; None when neither is set
    if region is not None and not region.strip():
        raise SourceError(f"the AWS region is set but empty ({region!r}, from AWS_DEFAULT_REGION or the "
                          f"profile's `region`). {REGION_HELP}")
    try:
        return session.client("s3", endpoint_url=endpoint_url or None, config=config)
    except PartialCredentialsError as exc:  # credentials are resolved here, when the client is made
        raise credentials_error(exc, "sign S3 requests") from exc
    except InvalidRegionError as exc:  # before ValueError: it is one
        raise SourceError(f"{exc} (from AWS_DEFAULT_REGION or the profile's `region`). {REGION_HELP}") from exc
    except ValueError as exc:  # botocore's "Invalid endpoint: <url>"
        raise SourceError(f"{exc}: check --endpoint-url / AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 "
                          "(a URL with scheme and host, e.g. http://localhost:9000)") from exc


def _request_id(metadata: dict) -> str:
    """The S3 request id from a response's ResponseMetadata ('-' when there is none)."""
    return metadata.get("RequestId") or metadata.get("HTTPHeaders", {}).get("x-amz-request-id") or "-"


def _error_details(exc) -> tuple[str, str, str, int | None]:
    """(code, message, request id, HTTP status) of a botocore ClientError."""
    response = getattr(exc, "response", {}) or {}
    error = response.get("Error", {}) or {}
    metadata = response.get("ResponseMetadata", {}) or {}
    request_id = metadata.get("RequestId") or metadata.get("HTTPHeaders", {}).get("x-amz-request-id", "")
    return str(error.get("Code", "")), str(error.get("Message", "")), request_id or "-", metadata.get("HTTPStatusCode")


class S3Source(Source):
    kind = "s3"

    def __init__(self, uri: str, client=None, endpoint_url: str | None = None,
                 max_attempts: int = DEFAULT_MAX_ATTEMPTS, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
                 read_timeout: float = DEFAULT_READ_TIMEOUT_S, download_threads: int = DEFAULT_DOWNLOAD_THREADS,
                 verify_etag: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.bucket, self.prefix = split_s3_uri(uri)
        self.max_attempts = max_attempts
        self.verify_etag = verify_etag
        self.client = client or make_s3_client(endpoint_url, max_attempts, connect_timeout, read_timeout,
                                               max_pool_connections=download_threads + 4)
        self._probe()

    def _fatal(self, exc, action: str, key: str = "") -> SourceError:
        """Turn a run-level botocore error into a SourceError with what to do about it."""
        from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

        where = f"s3://{self.bucket}/{_join_key(self.prefix, key)}"
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return credentials_error(exc, f"{action} {where}")
        if isinstance(exc, ClientError):
            code, message, request_id, status = _error_details(exc)
            if code in MISSING_BUCKET_CODES or (status == 404 and not key):
                return SourceError(f"bucket '{self.bucket}' does not exist (or is not on this endpoint: "
                                   f"{self.client.meta.endpoint_url}); check the --input URI. "
                                   f"[{code or status}, request-id {request_id}]")
            if code in ACCESS_ERROR_CODES or status == 403:
                return SourceError(f"S3 refused to {action} {where}: {code} {message} "
                                   f"[request-id {request_id}]. The credentials in use are not allowed to "
                                   f"do this, or have expired: refresh them (e.g. `aws sso login`) or use a "
                                   f"profile with s3:ListBucket and s3:GetObject on bucket '{self.bucket}'. "
                                   "Not retried.")
            return SourceError(f"S3 error while trying to {action} {where}: {code} {message} "
                               f"[HTTP {status}, request-id {request_id}]")
        return SourceError(f"cannot {action} {where} at {self.client.meta.endpoint_url}: "
                           f"{type(exc).__name__}: {exc}")

    def _probe(self) -> None:
        """One cheap request before any work: credentials, bucket, permissions, endpoint (C5, C7, C11)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        except (ClientError, BotoCoreError) as exc:
            raise self._fatal(exc, "list") from exc

    def _list(self, prefix: str) -> Iterable[ObjectInfo]:
        from botocore.exceptions import BotoCoreError, ClientError

        full_prefix = _join_key(self.prefix, prefix)
        paginator = self.client.get_paginator("list_objects_v2")
        infos = []
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
                self.stats.add(retries=page.get("ResponseMetadata", {}).get("RetryAttempts", 0))
                for item in page.get("Contents", []):
                    infos.append(ObjectInfo(item["Key"][len(self.prefix):], int(item["Size"])))
        except (ClientError, BotoCoreError) as exc:
            raise self._fatal(exc, "list", prefix) from exc
        return infos

    def exists(self, key: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=_join_key(self.prefix, key))
            return True
        except ClientError as exc:
            code, _, _, status = _error_details(exc)
            if code in MISSING_KEY_CODES or status == 404:
                return False
            raise self._fatal(exc, "read", key) from exc
        except BotoCoreError as exc:
            raise self._fatal(exc, "read", key) from exc

    def read(self, key: str) -> bytes:
        """Get one object. Per-key failures raise ObjectSkip; access/credential errors SourceError."""
        from botocore.exceptions import (BotoCoreError, ClientError, ConnectionClosedError, FlexibleChecksumError,
                                         IncompleteReadError, NoCredentialsError, ReadTimeoutError,
                                         ResponseStreamingError)

        full_key = _join_key(self.prefix, key)
        where = f"s3://{self.bucket}/{full_key}"
        body_errors = (IncompleteReadError, ResponseStreamingError, ReadTimeoutError, ConnectionClosedError)
        last_problem = ("download_failed", "no attempt made")  # (skip reason, what went wrong), of the last attempt
        for _ in range(self.max_attempts):
            try:
                # ChecksumMode: S3 sends the stored checksum and botocore verifies the body against it.
                response = self.client.get_object(Bucket=self.bucket, Key=full_key, ChecksumMode="ENABLED")
            except NoCredentialsError as exc:
                raise self._fatal(exc, "read", key) from exc
            except ClientError as exc:
                code, message, request_id, status = _error_details(exc)
                if code in MISSING_KEY_CODES or status == 404:
                    raise ObjectSkip("missing", f"{where} was listed but is gone: {code} "
                                                f"[request-id {request_id}]") from None
                if code in ACCESS_ERROR_CODES or status == 403:
                    raise self._fatal(exc, "read", key) from exc
                retries = exc.response.get("ResponseMetadata", {}).get("RetryAttempts", 0)
                self.stats.add(retries=retries)
                raise ObjectSkip("download_failed", f"{where}: {code} {message} [HTTP {status}, "
                                                    f"request-id {request_id}, {retries + 1} attempts]") from None
            except BotoCoreError as exc:
                raise ObjectSkip("download_failed", f"{where}: {type(exc).__name__}: {exc} "
                                                    f"(after botocore retries)") from None
            metadata = response.get("ResponseMetadata", {})
            self.stats.add(retries=metadata.get("RetryAttempts", 0))
            expected = response.get("ContentLength")
            try:
                # StreamingBody.read() checks the byte count against Content-Length (IncompleteReadError).
                data = response["Body"].read()
            except body_errors as exc:
                last_problem = ("download_failed", f"body incomplete: {type(exc).__name__}: {exc}")
                self.stats.add(body_retries=1)
                continue
            except FlexibleChecksumError as exc:  # the body does not match S3's stored checksum
                last_problem = ("checksum_mismatch", f"{exc} [request-id {_request_id(metadata)}]")
                self.stats.add(integrity_retries=1)
                continue
            if expected is not None and len(data) != expected:
                last_problem = ("download_failed", f"body incomplete: {len(data)} of {expected} bytes")
                self.stats.add(body_retries=1)
                continue
            etag_problem = self._etag_mismatch(response, data)
            if etag_problem:
                last_problem = ("checksum_mismatch", f"{etag_problem} [request-id {_request_id(metadata)}]")
                self.stats.add(integrity_retries=1)
                continue
            self.stats.add(bytes_read=len(data))
            return data
        reason, problem = last_problem
        hint = (" If this store's ETags are not MD5 digests of the content, run with --no-etag-check."
                if "ETag" in problem else "")
        raise ObjectSkip(reason, f"{where}: failed on all {self.max_attempts} attempts, last: {problem}.{hint}")

    def _etag_mismatch(self, response: dict, data: bytes) -> str | None:
        """Why ``data`` does not match the response's ETag, or None (match, or the ETag is no MD5).

        Only used when botocore did not already verify an ``x-amz-checksum-*`` header: the ETag is the
        MD5 of the content for single-part uploads without SSE-KMS/SSE-C."""
        from botocore.httpchecksum import StreamingChecksumBody

        if not self.verify_etag or isinstance(response.get("Body"), StreamingChecksumBody):
            return None
        etag = str(response.get("ETag", "")).strip('"').lower()
        if (not MD5_ETAG.fullmatch(etag) or response.get("SSECustomerAlgorithm")
                or response.get("ServerSideEncryption") in NON_MD5_ETAG_ENCRYPTION):
            return None
        received = hashlib.md5(data, usedforsecurity=False).hexdigest()
        if received == etag:
            return None
        return f"MD5 of the {len(data)} bytes received is {received}, the ETag says {etag}"

    def describe(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{_join_key(self.prefix, key)}"


def open_source(uri: str | os.PathLike, endpoint_url: str | None = None, client=None,
                max_attempts: int = DEFAULT_MAX_ATTEMPTS, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
                read_timeout: float = DEFAULT_READ_TIMEOUT_S, download_threads: int = DEFAULT_DOWNLOAD_THREADS,
                max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES,
                max_consecutive_failures: int = DEFAULT_MAX_CONSECUTIVE_FAILURES, verify_etag: bool = True) -> Source:
    """A Source for ``s3://bucket/prefix/`` (probed with one request now) or a local folder.

    ``client`` injects a ready boto3 S3 client (tests register botocore event hooks on it);
    otherwise one is made with ``make_s3_client``. ``verify_etag=False`` turns off the MD5-ETag
    check (for stores whose ETags are not MD5s). Raises SourceError when the input is unusable.
    """
    common = dict(max_object_bytes=max_object_bytes, max_consecutive_failures=max_consecutive_failures)
    if is_s3_uri(uri):
        return S3Source(str(uri), client=client, endpoint_url=endpoint_url, max_attempts=max_attempts,
                        connect_timeout=connect_timeout, read_timeout=read_timeout,
                        download_threads=download_threads, verify_etag=verify_etag, **common)
    return LocalSource(uri, **common)


# --------------------------------------------------------------------------- outputs
class Output:
    """Where result files go. Writers put files in ``staging_dir`` (atomically, via dss.fileio);
    ``publish(names)`` makes them final at the destination."""

    staging_dir: Path

    def prepare(self, names: Collection[str] | None = None) -> None:
        """Create/check the destination; fail fast (before any download) if it is not writable (D4).
        ``names``: the files this run will write (temps of these left by killed runs are swept)."""
        raise NotImplementedError

    def publish(self, names: list[str]) -> None:
        raise NotImplementedError

    def remove_stale(self, names: list[str]) -> list[str]:
        """Delete files of ours an earlier run left at the destination; returns what was removed."""
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
            probe.unlink(missing_ok=True)  # D6: a concurrent run may have removed the shared probe first
        except OSError as exc:
            full = " (disk full)" if exc.errno == errno.ENOSPC else ""
            raise SourceError(f"output folder {self.folder} is not writable{full}: {exc}") from exc

    def publish(self, names: list[str]) -> None:
        return None  # files were written in place, atomically

    def remove_stale(self, names: list[str]) -> list[str]:
        removed = []
        for name in names:
            path = self.folder / name
            if path.is_file():
                path.unlink()
                removed.append(str(path))
        return removed

    def describe(self, name: str = "") -> str:
        return str(self.folder / name) if name else str(self.folder)


class S3Output(Output):
    def __init__(self, uri: str, client=None, endpoint_url: str | None = None,
                 max_attempts: int = DEFAULT_MAX_ATTEMPTS):
        self.bucket, self.prefix = split_s3_uri(uri)
        self.client = client or make_s3_client(endpoint_url, max_attempts)
        self.staging_dir = Path(tempfile.mkdtemp(prefix=S3_STAGING_PREFIX))

    def _key(self, name: str) -> str:
        return _join_key(self.prefix, name)

    def _fail(self, exc, action: str) -> SourceError:
        from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

        where = self.describe()
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return credentials_error(exc, f"write to {where}")
        if isinstance(exc, ClientError):
            code, message, request_id, status = _error_details(exc)
            if code in MISSING_BUCKET_CODES:
                return SourceError(f"output bucket '{self.bucket}' does not exist; check --output-dir. "
                                   f"[request-id {request_id}]")
            if code in ACCESS_ERROR_CODES or status == 403:
                return SourceError(f"S3 refused to {action} {where}: {code} {message} [request-id {request_id}]. "
                                   f"Use credentials with s3:PutObject on bucket '{self.bucket}'. Not retried.")
            return SourceError(f"cannot {action} {where}: {code} {message} [HTTP {status}, request-id {request_id}]")
        return SourceError(f"cannot {action} {where}: {type(exc).__name__}: {exc}")

    def prepare(self, names: Collection[str] | None = None) -> None:  # staging is a fresh temp folder
        from botocore.exceptions import BotoCoreError, ClientError

        key = self._key(".preprocess-write-check")
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=b"ok")
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(exc, "write to") from exc

    def publish(self, names: list[str]) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        for name in names:  # in the caller's order: the summary last marks a complete run
            try:
                # upload_file switches to multipart for big pickles; each object appears atomically.
                self.client.upload_file(str(self.staging_dir / name), self.bucket, self._key(name))
            except (ClientError, BotoCoreError) as exc:
                raise self._fail(exc, f"upload {name} to") from exc
            except Exception as exc:  # boto3's S3UploadFailedError wraps the ClientError
                raise SourceError(f"cannot upload {name} to {self.describe(name)}: {exc}") from exc

    def remove_stale(self, names: list[str]) -> list[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        removed = []
        for name in names:
            try:
                self.client.head_object(Bucket=self.bucket, Key=self._key(name))
            except ClientError:
                continue
            try:
                self.client.delete_object(Bucket=self.bucket, Key=self._key(name))
            except (ClientError, BotoCoreError) as exc:
                raise self._fail(exc, f"delete stale {name} from") from exc
            removed.append(self.describe(name))
        return removed

    def describe(self, name: str = "") -> str:
        return f"s3://{self.bucket}/{self._key(name)}"

    def close(self) -> None:
        shutil.rmtree(self.staging_dir, ignore_errors=True)


def open_output(uri: str | os.PathLike, endpoint_url: str | None = None, client=None,
                max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> Output:
    """A LocalOutput for a folder, or an S3Output (staging in a temp folder) for ``s3://``."""
    if is_s3_uri(uri):
        return S3Output(str(uri), client=client, endpoint_url=endpoint_url, max_attempts=max_attempts)
    return LocalOutput(uri)
