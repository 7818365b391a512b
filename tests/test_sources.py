"""dss.ingest.sources against a real moto S3 server over HTTP and real folders.

S3 faults that moto cannot produce (503 SlowDown, 403, short bodies) are injected with botocore
``before-send`` hooks registered on the client the library itself creates (``source.client``).
"""

from __future__ import annotations

import io
import os
import uuid

import numpy as np
import pytest
import urllib3
from botocore.awsrequest import AWSResponse
from PIL import Image

from dss import images

# ---------------------------------------------------------------------------- helpers
from dss.ingest import s3, sources
from dss.ingest import storage


class _RawBody(io.BytesIO):
    """What botocore expects as ``AWSResponse.raw``: a readable stream with ``stream()``."""

    def stream(self, **kwargs):
        data = self.read()
        while data:
            yield data
            data = self.read()


def error_response(request, status: int, code: str, message: str = "injected") -> AWSResponse:
    body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
            f"<RequestId>REQ-{code}</RequestId></Error>").encode()
    headers = {"x-amz-request-id": f"REQ-{code}", "Content-Type": "application/xml",
               "Content-Length": str(len(body))}
    return AWSResponse(request.url, status, headers, _RawBody(body))


class CountingHook:
    """A before-send hook that answers the first ``fail_times`` GetObject calls with ``respond``."""

    def __init__(self, respond, fail_times: int):
        self.respond = respond
        self.fail_times = fail_times
        self.calls = 0

    def __call__(self, request, **kwargs):
        self.calls += 1
        if self.calls <= self.fail_times:
            return self.respond(request)
        return None


def noisy_jpeg(seed: int = 0, width: int = 200, height: int = 150) -> bytes:
    """A JPEG of random pixels (~28 KB): its entropy-coded middle is image data, so zeroing bytes
    there still decodes, to a different picture (a corrupted-but-decodable JPEG)."""
    pixels = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def zero_middle(data: bytes, count: int = 200) -> bytes:
    middle = len(data) // 2
    return data[:middle - count // 2] + bytes(count) + data[middle + count // 2:]


class CorruptInTransit:
    """A ``before-send`` hook: sends the real GET to the moto server itself, then zeroes 200 bytes in
    the middle of the body before botocore (and our code) reads it. Status and headers are the
    server's (Content-Length, ETag, x-amz-checksum-crc32), as when bytes flip on the wire.

    Corrupts the first ``times`` GETs whose URL contains ``url_part``; ``drop_checksum`` also removes
    the ``x-amz-checksum-*`` headers (a store without checksums: only the ETag can tell)."""

    def __init__(self, times: int, url_part: str = "", drop_checksum: bool = False):
        self.times = times
        self.url_part = url_part
        self.drop_checksum = drop_checksum
        self.corrupted = 0
        self.pool = urllib3.PoolManager()

    def __call__(self, request, **kwargs):
        if self.corrupted >= self.times or self.url_part not in request.url:
            return None
        real = self.pool.request(request.method, request.url, headers=dict(request.headers.items()),
                                 preload_content=True, redirect=False)
        assert real.status == 200, real.data[:300]
        headers = {name: value for name, value in real.headers.items()
                   if not (self.drop_checksum and name.lower().startswith("x-amz-checksum-"))}
        self.corrupted += 1
        return AWSResponse(request.url, real.status, headers, _RawBody(zero_middle(real.data)))


@pytest.fixture
def bucket(s3_client):
    name = f"src-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    return name


def _open(s3_server, uri, **options):
    return storage.open_source(uri, sources.SourceOptions(endpoint_url=s3_server["endpoint"], **options))


# ---------------------------------------------------------------------------- URIs and ids


def test_split_s3_uri_normalises_prefix():
    assert s3.split_s3_uri("s3://b/data") == ("b", "data/")
    assert s3.split_s3_uri("s3://b/data/") == ("b", "data/")
    assert s3.split_s3_uri("s3://b") == ("b", "")
    with pytest.raises(sources.SourceError):
        s3.split_s3_uri("s3:///data")


# ---------------------------------------------------------------------------- local folders


def test_local_source_lists_sorted_relative_keys_and_reads(tmp_path):
    (tmp_path / "train_features").mkdir()
    (tmp_path / "train_features" / "b.jpg").write_bytes(b"bb")
    (tmp_path / "train_features" / "a.JPG").write_bytes(b"a")
    (tmp_path / "labels.csv").write_text("id\n")
    source = storage.open_source(tmp_path)
    assert source.list("") == [sources.ObjectInfo("labels.csv", 3), sources.ObjectInfo("train_features/a.JPG", 1),
                               sources.ObjectInfo("train_features/b.jpg", 2)]
    assert [i.key for i in source.list("train_features/")] == ["train_features/a.JPG", "train_features/b.jpg"]
    assert source.list("nothing/") == []
    assert source.read("train_features/b.jpg") == b"bb"
    assert source.exists("labels.csv") and not source.exists("nope.csv")
    with pytest.raises(sources.ObjectSkip) as info:
        source.read("train_features/gone.jpg")
    assert info.value.reason == "missing"


def test_local_source_missing_folder_is_a_source_error(tmp_path):
    with pytest.raises(sources.SourceError, match="does not exist"):
        storage.open_source(tmp_path / "absent")


def test_size_cap_rejects_from_listing_without_reading(tmp_path):
    (tmp_path / "big.jpg").write_bytes(b"x" * 2000)
    source = storage.open_source(tmp_path, sources.SourceOptions(max_object_bytes=1000))
    (info,) = source.list("")
    with pytest.raises(sources.ObjectSkip) as skip:
        source.check_size(info)
    assert skip.value.reason == "too_large" and "2000 bytes" in str(skip.value)
    assert source.stats.bytes_read == 0


def test_fetch_many_yields_every_key_once_with_skips(tmp_path):
    for index in range(30):
        (tmp_path / f"{index:03d}.jpg").write_bytes(bytes([index]) * (index + 1))
    source = storage.open_source(tmp_path)
    keys = [f"{index:03d}.jpg" for index in range(30)] + ["missing.jpg"]
    results = dict(source.fetch_many(keys, threads=4, prefetch=5))
    assert sorted(results) == sorted(keys)
    assert isinstance(results["missing.jpg"], sources.ObjectSkip)
    assert results["007.jpg"] == bytes([7]) * 8


# ---------------------------------------------------------------------------- S3 basics


def test_s3_lists_more_than_1000_keys_in_order_and_ignores_dir_markers(s3_server, s3_client, bucket):
    """2,503 keys need three list pages; all come back, sorted; 'dir/' markers are dropped."""
    from concurrent.futures import ThreadPoolExecutor

    keys = [f"data/imgs/{index:05d}.jpg" for index in range(2503)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda key: s3_client.put_object(Bucket=bucket, Key=key, Body=b"x"), keys))
    s3_client.put_object(Bucket=bucket, Key="data/imgs/", Body=b"")
    s3_client.put_object(Bucket=bucket, Key="data/imgs/sub/", Body=b"")
    source = _open(s3_server, f"s3://{bucket}/data")
    listed = source.list("imgs/")
    assert len(listed) == 2503
    assert [info.key for info in listed] == sorted(key[len("data/"):] for key in keys)
    assert all(info.size == 1 for info in listed)


def test_s3_reads_odd_keys(s3_server, s3_client, bucket):
    """Unicode, spaces, '+', '%' and no extension round-trip unchanged."""
    odd = ["data/ünï cödé.jpg", "data/a+b.jpg", "data/100%.JPG", "data/no_extension", "data/sp ace/x y.png"]
    for index, key in enumerate(odd):
        s3_client.put_object(Bucket=bucket, Key=key, Body=f"body{index}".encode())
    source = _open(s3_server, f"s3://{bucket}/data/")
    listed = [info.key for info in source.list("")]
    assert listed == sorted(key[len("data/"):] for key in odd)
    for index, key in enumerate(odd):
        assert source.read(key[len("data/"):]) == f"body{index}".encode()
    assert source.exists("a+b.jpg") and not source.exists("a b.jpg")
    assert source.describe("a+b.jpg") == f"s3://{bucket}/data/a+b.jpg"


def test_s3_object_deleted_after_listing_is_a_recorded_skip(s3_server, s3_client, bucket):
    """NoSuchKey between list and get -> ObjectSkip('missing'), the rest still read."""
    for name in ("a.jpg", "b.jpg"):
        s3_client.put_object(Bucket=bucket, Key=f"d/{name}", Body=b"ok")
    source = _open(s3_server, f"s3://{bucket}/d/")
    keys = [info.key for info in source.list("")]
    s3_client.delete_object(Bucket=bucket, Key="d/a.jpg")
    results = dict(source.fetch_many(keys, threads=2))
    assert results["b.jpg"] == b"ok"
    assert isinstance(results["a.jpg"], sources.ObjectSkip) and results["a.jpg"].reason == "missing"
    assert "NoSuchKey" in str(results["a.jpg"]) and f"s3://{bucket}/d/a.jpg" in str(results["a.jpg"])


def test_missing_bucket_fails_at_open(s3_server, s3_client):
    with pytest.raises(sources.SourceError, match="does not exist"):
        _open(s3_server, "s3://no-such-bucket-here/data/")


def test_no_credentials_fails_at_open_with_botocore_message(s3_server, monkeypatch, tmp_path):
    """No keys, no config files, no instance metadata -> 'Unable to locate credentials'."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    with pytest.raises(sources.SourceError, match="Unable to locate credentials"):
        _open(s3_server, "s3://any-bucket/data/")


def test_endpoint_from_environment_is_honoured(s3_server, s3_client, bucket, monkeypatch):
    """No endpoint argument; AWS_ENDPOINT_URL_S3 alone points botocore at moto."""
    s3_client.put_object(Bucket=bucket, Key="k.jpg", Body=b"1")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server["endpoint"])
    source = storage.open_source(f"s3://{bucket}/")
    assert source.client.meta.endpoint_url == s3_server["endpoint"]
    assert source.read("k.jpg") == b"1"


def test_unreachable_endpoint_fails_at_open_in_bounded_time(s3_client):
    """Connection refused -> SourceError naming the endpoint (few attempts, short timeout)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again when the block ends: nothing listens there
    with pytest.raises(sources.SourceError, match=f"127.0.0.1:{port}"):
        storage.open_source("s3://bucket/data/", sources.SourceOptions(endpoint_url=f"http://127.0.0.1:{port}",
                                                                       max_attempts=2, connect_timeout=1))


# ---------------------------------------------------------------------------- attempts per request


@pytest.fixture
def aws_attempt_settings(monkeypatch, tmp_path):
    """Sets AWS_MAX_ATTEMPTS and/or ``max_attempts`` in a test-local AWS config file (never ~/.aws)."""
    def apply(variable: str | None = None, config_file: str | None = None):
        config = tmp_path / "aws-config"
        config.write_text("" if config_file is None else f"[default]\nmax_attempts = {config_file}\n")
        monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
        monkeypatch.delenv("AWS_PROFILE", raising=False)
        if variable is None:
            monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
        else:
            monkeypatch.setenv("AWS_MAX_ATTEMPTS", variable)
    return apply


@pytest.mark.parametrize("variable, config_file, option, expected", [
    (None, None, None, sources.DEFAULT_MAX_ATTEMPTS),
    ("2", None, None, 2),
    (None, "3", None, 3),
    ("2", "3", None, 2),  # botocore: the variable wins over the file
    ("2", "3", 4, 4),  # --max-attempts wins over both
], ids=["default", "env", "config_file", "env_over_file", "option_over_both"])
def test_max_attempts_honours_aws_settings_unless_given(s3_server, s3_client, bucket, aws_attempt_settings,
                                                        variable, config_file, option, expected):
    """Without --max-attempts, AWS_MAX_ATTEMPTS or the config file's max_attempts decide (not our default)."""
    aws_attempt_settings(variable, config_file)
    source = _open(s3_server, f"s3://{bucket}/", max_attempts=option)
    assert source.client.meta.config.retries == {"mode": "standard", "total_max_attempts": expected}
    assert source.max_attempts == expected  # our own refetch loop (short bodies, checksums) agrees
    output = storage.open_output(f"s3://{bucket}/out/", sources.SourceOptions(endpoint_url=s3_server["endpoint"],
                                                                              max_attempts=option))
    output.close()
    assert output.client.meta.config.retries["total_max_attempts"] == expected


def test_aws_max_attempts_bounds_the_requests_sent(s3_server, s3_client, bucket, aws_attempt_settings):
    """AWS_MAX_ATTEMPTS=2 and no option: a key answered 503 on every attempt is requested twice."""
    aws_attempt_settings(variable="2")
    s3_client.put_object(Bucket=bucket, Key="a.jpg", Body=b"ok")
    source = _open(s3_server, f"s3://{bucket}/")
    hook = CountingHook(lambda request: error_response(request, 503, "SlowDown"), fail_times=10**6)
    source.client.meta.events.register("before-send.s3.GetObject", hook)
    with pytest.raises(sources.ObjectSkip, match="2 attempts"):
        source.read("a.jpg")
    assert hook.calls == 2


def test_malformed_aws_max_attempts_is_a_source_error(s3_server, aws_attempt_settings):
    aws_attempt_settings(variable="many")
    with pytest.raises(sources.SourceError, match="AWS_MAX_ATTEMPTS .* not a whole number.*--max-attempts"):
        _open(s3_server, "s3://any-bucket/")


# ---------------------------------------------------------------------------- injected faults


def test_slowdown_below_max_attempts_is_retried_and_succeeds(s3_server, s3_client, bucket):
    """Two 503 SlowDown answers, then the real object; retries are counted."""
    s3_client.put_object(Bucket=bucket, Key="x/a.jpg", Body=b"payload")
    source = _open(s3_server, f"s3://{bucket}/x/", max_attempts=4)
    hook = CountingHook(lambda request: error_response(request, 503, "SlowDown"), fail_times=2)
    source.client.meta.events.register("before-send.s3.GetObject", hook)
    assert source.read("a.jpg") == b"payload"
    assert hook.calls == 3
    assert source.stats.retries == 2


def test_slowdown_exhausting_attempts_skips_key_naming_bucket_key_request_id(s3_server, s3_client, bucket):
    """503 on every attempt -> ObjectSkip('download_failed') with bucket, key and request id."""
    s3_client.put_object(Bucket=bucket, Key="x/a.jpg", Body=b"payload")
    source = _open(s3_server, f"s3://{bucket}/x/", max_attempts=3)
    hook = CountingHook(lambda request: error_response(request, 503, "SlowDown"), fail_times=10**6)
    source.client.meta.events.register("before-send.s3.GetObject", hook)
    with pytest.raises(sources.ObjectSkip) as skip:
        source.read("a.jpg")
    assert skip.value.reason == "download_failed"
    message = str(skip.value)
    assert f"s3://{bucket}/x/a.jpg" in message and "REQ-SlowDown" in message and "SlowDown" in message
    assert hook.calls == 3, message


def test_500_is_retried(s3_server, s3_client, bucket):
    """A 500 InternalError is transient."""
    s3_client.put_object(Bucket=bucket, Key="a.jpg", Body=b"ok")
    source = _open(s3_server, f"s3://{bucket}/", max_attempts=3)
    hook = CountingHook(lambda request: error_response(request, 500, "InternalError"), fail_times=1)
    source.client.meta.events.register("before-send.s3.GetObject", hook)
    assert source.read("a.jpg") == b"ok" and hook.calls == 2


@pytest.mark.parametrize("code", ["AccessDenied", "InvalidAccessKeyId", "ExpiredToken"])
def test_403_is_not_retried_and_stops_the_run(s3_server, s3_client, bucket, code):
    """A 403 is fatal at once (one call), with an actionable message."""
    s3_client.put_object(Bucket=bucket, Key="a.jpg", Body=b"ok")
    s3_client.put_object(Bucket=bucket, Key="b.jpg", Body=b"ok")
    source = _open(s3_server, f"s3://{bucket}/", max_attempts=5)
    hook = CountingHook(lambda request: error_response(request, 403, code), fail_times=10**6)
    source.client.meta.events.register("before-send.s3.GetObject", hook)
    with pytest.raises(sources.SourceError) as error:
        list(source.fetch_many(["a.jpg"], threads=1))
    assert hook.calls == 1
    message = str(error.value)
    assert code in message and "Not retried" in message and f"REQ-{code}" in message


def test_403_on_listing_fails_at_open(s3_server, s3_client, bucket):
    source_hook = CountingHook(lambda request: error_response(request, 403, "AccessDenied"), fail_times=10**6)
    client = s3.make_s3_client(sources.SourceOptions(endpoint_url=s3_server["endpoint"], max_attempts=5))
    client.meta.events.register("before-send.s3.ListObjectsV2", source_hook)
    with pytest.raises(sources.SourceError, match="AccessDenied"):
        storage.open_source(f"s3://{bucket}/", client=client)
    assert source_hook.calls == 1


class _ShortBody(io.BytesIO):
    def stream(self, **kwargs):
        yield self.read()


def test_short_body_is_retried_then_succeeds(s3_server, s3_client, bucket):
    """A body shorter than its Content-Length -> IncompleteReadError -> our retry."""
    s3_client.put_object(Bucket=bucket, Key="a.jpg", Body=b"0123456789")

    def short(request):
        headers = {"Content-Length": "10", "Content-Type": "image/jpeg", "ETag": '"x"'}
        return AWSResponse(request.url, 200, headers, _ShortBody(b"01234"))

    source = _open(s3_server, f"s3://{bucket}/", max_attempts=3)
    hook = CountingHook(short, fail_times=1)
    source.client.meta.events.register("before-send.s3.GetObject", hook)
    assert source.read("a.jpg") == b"0123456789"
    assert hook.calls == 2 and source.stats.body_retries == 1


def test_short_body_every_time_is_a_recorded_skip(s3_server, s3_client, bucket):
    s3_client.put_object(Bucket=bucket, Key="a.jpg", Body=b"0123456789")

    def short(request):
        return AWSResponse(request.url, 200, {"Content-Length": "10"}, _ShortBody(b"01"))

    source = _open(s3_server, f"s3://{bucket}/", max_attempts=2)
    source.client.meta.events.register("before-send.s3.GetObject", CountingHook(short, fail_times=10**6))
    with pytest.raises(sources.ObjectSkip) as skip:
        source.read("a.jpg")
    assert skip.value.reason == "download_failed" and "incomplete" in str(skip.value)


def test_a_streak_of_failures_stops_fetch_many(s3_server, s3_client, bucket):
    """A store failing every request stops the run instead of waiting out every key."""
    for index in range(6):
        s3_client.put_object(Bucket=bucket, Key=f"{index}.jpg", Body=b"ok")
    source = _open(s3_server, f"s3://{bucket}/", max_attempts=1, max_consecutive_failures=3)
    source.client.meta.events.register(
        "before-send.s3.GetObject", CountingHook(lambda r: error_response(r, 503, "SlowDown"), fail_times=10**6))
    with pytest.raises(sources.SourceError, match="3 downloads in a row failed"):
        list(source.fetch_many([f"{index}.jpg" for index in range(6)], threads=1))


# ---------------------------------------------------------------------------- corrupted in transit


def _corrupt_source(s3_server, s3_client, bucket, max_attempts=3, **kwargs):
    clean = noisy_jpeg()
    s3_client.put_object(Bucket=bucket, Key="img/a.jpg", Body=clean)
    # What would go wrong without the checks: Pillow decodes the corrupted bytes without a word.
    corrupt_array, _ = images.decode_and_resize(zero_middle(clean), 32)
    clean_array, _ = images.decode_and_resize(clean, 32)
    assert not np.array_equal(corrupt_array, clean_array)
    return clean, _open(s3_server, f"s3://{bucket}/img/", max_attempts=max_attempts, **kwargs)


def test_body_corrupted_in_transit_fails_the_s3_checksum_and_is_refetched(s3_server, s3_client, bucket):
    """botocore checks the body against x-amz-checksum-crc32 (ChecksumMode=ENABLED) ->
    FlexibleChecksumError -> our retry gets the stored bytes."""
    clean, source = _corrupt_source(s3_server, s3_client, bucket)
    hook = CorruptInTransit(times=1)
    source.client.meta.events.register("before-send.s3.GetObject", hook)
    assert source.read("a.jpg") == clean
    assert hook.corrupted == 1 and source.stats.integrity_retries == 1


def test_body_corrupted_in_transit_without_checksum_header_is_caught_by_the_etag(s3_server, s3_client, bucket):
    """No x-amz-checksum-* header (older objects, other stores): the single-part ETag is the
    MD5 of the stored bytes, so the corrupt body is caught there and refetched."""
    clean, source = _corrupt_source(s3_server, s3_client, bucket)
    hook = CorruptInTransit(times=1, drop_checksum=True)
    source.client.meta.events.register("before-send.s3.GetObject", hook)
    assert source.read("a.jpg") == clean
    assert hook.corrupted == 1 and source.stats.integrity_retries == 1


@pytest.mark.parametrize("drop_checksum", [False, True])
def test_body_corrupted_on_every_attempt_is_a_recorded_skip(s3_server, s3_client, bucket, drop_checksum):
    """Corrupt on all attempts -> ObjectSkip('checksum_mismatch') naming the object; never returned."""
    _, source = _corrupt_source(s3_server, s3_client, bucket, max_attempts=3)
    hook = CorruptInTransit(times=10**6, drop_checksum=drop_checksum)
    source.client.meta.events.register("before-send.s3.GetObject", hook)
    with pytest.raises(sources.ObjectSkip) as skip:
        source.read("a.jpg")
    assert skip.value.reason == "checksum_mismatch"
    assert f"s3://{bucket}/img/a.jpg" in str(skip.value) and "3 attempts" in str(skip.value)
    assert hook.corrupted == 3 and source.stats.integrity_retries == 3
    assert ("ETag" in str(skip.value)) == drop_checksum


def test_etag_check_can_be_turned_off_for_stores_without_md5_etags(s3_server, s3_client, bucket):
    """verify_etag=False (--no-etag-check): with no checksum header nothing is left to notice."""
    clean, source = _corrupt_source(s3_server, s3_client, bucket, verify_etag=False)
    source.client.meta.events.register("before-send.s3.GetObject", CorruptInTransit(times=1, drop_checksum=True))
    assert source.read("a.jpg") == zero_middle(clean)
    assert source.stats.integrity_retries == 0


def test_non_md5_etag_is_not_checked(s3_server, s3_client, bucket):
    """A multipart-style ETag ("<md5>-2") is no MD5 of the body: the body is accepted as received."""
    s3_client.put_object(Bucket=bucket, Key="a.jpg", Body=b"payload")

    def multipart_etag(request):
        return AWSResponse(request.url, 200, {"Content-Length": "7", "ETag": '"' + "0" * 32 + '-2"'},
                           _RawBody(b"payload"))

    source = _open(s3_server, f"s3://{bucket}/")
    source.client.meta.events.register("before-send.s3.GetObject", CountingHook(multipart_etag, fail_times=1))
    assert source.read("a.jpg") == b"payload" and source.stats.integrity_retries == 0


# ---------------------------------------------------------------------------- outputs


def test_local_output_checks_writable_and_sweeps_temps(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    stale = folder / ".train_data.pkl.999999999.tmp"
    stale.write_bytes(b"half")
    output = storage.open_output(folder)
    output.prepare()
    assert not stale.exists()
    assert list(folder.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only folders")
def test_local_output_read_only_fails_fast(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(sources.SourceError, match="not writable"):
            storage.open_output(folder).prepare()
    finally:
        folder.chmod(0o700)


def test_local_output_under_a_file_fails_fast(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(sources.SourceError, match="cannot create output folder"):
        storage.open_output(blocker / "out").prepare()


def test_s3_output_stages_then_uploads(s3_server, s3_client, bucket):
    output = storage.open_output(f"s3://{bucket}/results", sources.SourceOptions(endpoint_url=s3_server["endpoint"]))
    output.prepare()
    (output.staging_dir / "a.txt").write_bytes(b"hello")
    output.publish(["a.txt"])
    assert s3_client.get_object(Bucket=bucket, Key="results/a.txt")["Body"].read() == b"hello"
    assert output.describe("a.txt") == f"s3://{bucket}/results/a.txt"
    assert output.remove_stale(["a.txt", "never.txt"]) == [f"s3://{bucket}/results/a.txt"]
    staging = output.staging_dir
    output.close()
    assert not staging.exists()
    keys = [obj["Key"] for obj in s3_client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert keys == []  # the write probe was removed too


def test_s3_output_missing_bucket_fails_at_prepare(s3_server, s3_client):
    output = storage.open_output("s3://no-such-output-bucket/x/",
                                 sources.SourceOptions(endpoint_url=s3_server["endpoint"]))
    try:
        with pytest.raises(sources.SourceError, match="does not exist"):
            output.prepare()
    finally:
        output.close()
