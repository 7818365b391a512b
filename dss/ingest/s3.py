"""The ``s3://`` side of ``dss.ingest.sources``: the boto3 client, S3Source (list, get with retries and
integrity checks) and S3Output (stage locally, upload on publish).

boto3 is imported only here, and this module only for ``s3://`` URIs. Requests retry in botocore's
``standard`` mode (throttling and 500/502/503/504; 403s are never retried), with connect/read
timeouts. Attempts per request: ``--max-attempts`` when given, else ``AWS_MAX_ATTEMPTS`` or
``max_attempts`` in the AWS config file, else ``DEFAULT_MAX_ATTEMPTS``. ``AWS_ENDPOINT_URL`` /
``AWS_ENDPOINT_URL_S3`` are honoured by botocore itself; an explicit ``endpoint_url`` wins over them.
S3-compatible stores that reject the default checksums work with
``AWS_REQUEST_CHECKSUM_CALCULATION=when_required`` (read by botocore). A body shorter than its
Content-Length (or a connection dropped mid-body) is retried here, since botocore does not retry
once the headers have arrived.

Integrity of each body: GETs ask for S3's stored checksum (``ChecksumMode="ENABLED"``) and botocore
checks the body against the ``x-amz-checksum-*`` header while it is read. Where the response carries
no such header (older objects, other stores), the body is checked against the ETag when the ETag is
a plain MD5 of the content (single-part upload, no SSE-KMS/SSE-C). A mismatch is retried here like a
short body; when every attempt mismatches the key is skipped as ``checksum_mismatch``. Limit: bytes
that were already corrupt when uploaded carry a checksum and ETag of the corrupt bytes, so nothing
here (nor Pillow) can notice them.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Collection, Iterable

from dss.ingest.sources import (DEFAULT_MAX_ATTEMPTS, S3_STAGING_PREFIX, ObjectInfo, ObjectSkip, Output, Source,
                         SourceError, SourceOptions)

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


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> (``bucket``, ``a/b/``): the prefix always ends with ``/`` (or is empty)."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not bucket:
        raise SourceError(f"{uri!r} has no bucket name; expected s3://bucket/prefix/")
    prefix = prefix.strip("/")
    return bucket, (prefix + "/") if prefix else ""


def credentials_error(exc, needed_for: str) -> SourceError:
    """SourceError for botocore's No/PartialCredentialsError: its message verbatim, what the
    credentials were needed for, and how to configure them. botocore reports a lone
    AWS_ACCESS_KEY_ID as partial but silently ignores a lone AWS_SECRET_ACCESS_KEY, so name that here."""
    from botocore.exceptions import PartialCredentialsError

    hint = ""
    present = [name for name in ACCESS_KEY_VARIABLES if os.environ.get(name)]
    if len(present) == 1 and not isinstance(exc, PartialCredentialsError):
        missing = next(name for name in ACCESS_KEY_VARIABLES if name not in present)
        hint = f" {present[0]} is set but {missing} is not: an access key needs both."
    return SourceError(f"{exc} (needed to {needed_for}).{hint} {CREDENTIALS_HELP}")


# --------------------------------------------------------------------------- client
def resolve_max_attempts(given: int | None, core_session) -> int:
    """Attempts per request, first try included: ``given`` (--max-attempts), else AWS_MAX_ATTEMPTS or
    the profile's ``max_attempts`` as botocore reads them, else DEFAULT_MAX_ATTEMPTS."""
    if given is not None:
        return given
    try:
        configured = core_session.get_config_variable("max_attempts")
    except ValueError as exc:  # botocore converts the setting with int()
        raise SourceError(f"AWS_MAX_ATTEMPTS or `max_attempts` in the AWS config file is not a whole number "
                          f"({exc}); fix it or pass --max-attempts") from exc
    return DEFAULT_MAX_ATTEMPTS if configured is None else int(configured)


def make_s3_client(options: SourceOptions = SourceOptions()):
    """A boto3 S3 client with standard-mode retries, timeouts and a connection pool sized for the
    download threads (4 spare for listing and probes). ``options.endpoint_url=None`` leaves
    botocore's own resolution (AWS_ENDPOINT_URL...). Raises SourceError for partial credentials,
    an empty or malformed region or a bad endpoint URL."""
    import boto3
    import botocore.session
    from botocore.config import Config
    from botocore.exceptions import InvalidRegionError, PartialCredentialsError

    core_session = botocore.session.get_session()
    session = boto3.session.Session(botocore_session=core_session)
    region = session.region_name  # AWS_DEFAULT_REGION or the profile's `region`; None when neither is set
    if region is not None and not region.strip():
        raise SourceError(f"the AWS region is set but empty ({region!r}, from AWS_DEFAULT_REGION or the "
                          f"profile's `region`). {REGION_HELP}")
    config = Config(
        retries={"mode": "standard", "total_max_attempts": resolve_max_attempts(options.max_attempts, core_session)},
        connect_timeout=options.connect_timeout,
        read_timeout=options.read_timeout,
        max_pool_connections=options.download_threads + 4,
    )
    try:
        return session.client("s3", endpoint_url=options.endpoint_url or None, config=config)
    except PartialCredentialsError as exc:  # credentials are resolved here, when the client is made
        raise credentials_error(exc, "sign S3 requests") from exc
    except InvalidRegionError as exc:  # before ValueError: it is one
        raise SourceError(f"{exc} (from AWS_DEFAULT_REGION or the profile's `region`). {REGION_HELP}") from exc
    except ValueError as exc:  # botocore's "Invalid endpoint: <url>"
        raise SourceError(f"{exc}: check --endpoint-url / AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 "
                          "(a URL with scheme and host, e.g. http://localhost:9000)") from exc


def client_max_attempts(client) -> int:
    """The attempts per request ``client`` was made with (botocore's ``total_max_attempts``)."""
    return (client.meta.config.retries or {}).get("total_max_attempts", DEFAULT_MAX_ATTEMPTS)


def _request_id(metadata: dict) -> str:
    """The S3 request id from a response's ResponseMetadata ('-' when there is none)."""
    return metadata.get("RequestId") or metadata.get("HTTPHeaders", {}).get("x-amz-request-id") or "-"


def _error_details(exc) -> tuple[str, str, str, int | None]:
    """(code, message, request id, HTTP status) of a botocore ClientError."""
    response = getattr(exc, "response", {}) or {}
    error = response.get("Error", {}) or {}
    metadata = response.get("ResponseMetadata", {}) or {}
    return (str(error.get("Code", "")), str(error.get("Message", "")), _request_id(metadata),
            metadata.get("HTTPStatusCode"))


def _join_key(prefix: str, key: str) -> str:
    return prefix + key.lstrip("/")


# --------------------------------------------------------------------------- source
class S3Source(Source):
    """Objects under ``s3://bucket/prefix/``; one cheap request at construction checks access."""

    def __init__(self, uri: str, options: SourceOptions, client=None):
        super().__init__(options)
        self.bucket, self.prefix = split_s3_uri(uri)
        self.verify_etag = options.verify_etag
        self.client = client or make_s3_client(options)
        # Our own loop (short bodies, checksum mismatches) makes as many attempts as botocore does.
        self.max_attempts = (options.max_attempts if options.max_attempts is not None
                             else client_max_attempts(self.client))
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
        """One cheap request before any work: credentials, bucket, permissions, endpoint."""
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
        """Get one object. Per-key failures raise ObjectSkip; access/credential errors SourceError.

        Up to ``max_attempts`` GETs: a body that arrives short, dropped or not matching its checksum
        or MD5 ETag is fetched again (botocore's retries end once the headers have arrived)."""
        where = self.describe(key)
        last_problem = ("download_failed", "no attempt made")  # (skip reason, what went wrong), of the last attempt
        for _ in range(self.max_attempts):
            response = self._get(key, where)
            data, last_problem = self._checked_body(response)
            if data is not None:
                self.stats.add(bytes_read=len(data))
                return data
        reason, problem = last_problem
        hint = (" If this store's ETags are not MD5 digests of the content, run with --no-etag-check."
                if "ETag" in problem else "")
        raise ObjectSkip(reason, f"{where}: failed on all {self.max_attempts} attempts, last: {problem}.{hint}")

    def _get(self, key: str, where: str) -> dict:
        """One GetObject (botocore retries the request itself); its failures as ObjectSkip or SourceError."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            # ChecksumMode: S3 sends the stored checksum and botocore verifies the body against it.
            return self.client.get_object(Bucket=self.bucket, Key=_join_key(self.prefix, key),
                                          ChecksumMode="ENABLED")
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

    def _checked_body(self, response: dict) -> tuple[bytes | None, tuple[str, str] | None]:
        """(the body, None) when it arrived whole and intact, else (None, (skip reason, what went wrong))."""
        from botocore.exceptions import (ConnectionClosedError, FlexibleChecksumError, IncompleteReadError,
                                         ReadTimeoutError, ResponseStreamingError)

        metadata = response.get("ResponseMetadata", {})
        self.stats.add(retries=metadata.get("RetryAttempts", 0))
        expected = response.get("ContentLength")
        try:
            # StreamingBody.read() checks the byte count against Content-Length (IncompleteReadError).
            data = response["Body"].read()
        except (IncompleteReadError, ResponseStreamingError, ReadTimeoutError, ConnectionClosedError) as exc:
            self.stats.add(body_retries=1)
            return None, ("download_failed", f"body incomplete: {type(exc).__name__}: {exc}")
        except FlexibleChecksumError as exc:  # the body does not match S3's stored checksum
            self.stats.add(integrity_retries=1)
            return None, ("checksum_mismatch", f"{exc} [request-id {_request_id(metadata)}]")
        if expected is not None and len(data) != expected:
            self.stats.add(body_retries=1)
            return None, ("download_failed", f"body incomplete: {len(data)} of {expected} bytes")
        etag_problem = self._etag_mismatch(response, data)
        if etag_problem:
            self.stats.add(integrity_retries=1)
            return None, ("checksum_mismatch", f"{etag_problem} [request-id {_request_id(metadata)}]")
        return data, None

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


# --------------------------------------------------------------------------- output
class S3Output(Output):
    """Files staged in a local temp folder, uploaded to ``s3://bucket/prefix/`` by ``publish``."""

    def __init__(self, uri: str, options: SourceOptions, client=None):
        self.bucket, self.prefix = split_s3_uri(uri)
        self.client = client or make_s3_client(options)
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
                                   f"Use credentials with s3:ListBucket/GetObject/PutObject on '{self.bucket}'. Not retried.")
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

    def existing_names(self) -> list[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix,
                                                                      Delimiter="/")  # not in "subfolders"
        try:
            return sorted(item["Key"][len(self.prefix):] for page in pages for item in page.get("Contents", [])
                          if item["Key"] != self.prefix)
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(exc, "list") from exc

    def read_existing(self, name: str) -> bytes | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read()
        except (ClientError, BotoCoreError) as exc:
            code, _, _, status = _error_details(exc)  # a BotoCoreError has no response: ("", "", "-", None)
            if isinstance(exc, ClientError) and (code in MISSING_KEY_CODES or status == 404):
                return None
            raise self._fail(exc, f"read {name} in") from exc

    def describe(self, name: str = "") -> str:
        return f"s3://{self.bucket}/{self._key(name)}"

    def close(self) -> None:
        shutil.rmtree(self.staging_dir, ignore_errors=True)
