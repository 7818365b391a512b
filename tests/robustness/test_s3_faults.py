"""S3 rows of ROWS.md not covered row by row in tests/test_sources.py / tests/test_preprocess.py.

Real parts: the moto S3 server over HTTP (conftest ``s3_server``), and for faults moto cannot
produce (a server that never answers, a connection dropped mid-body) a small scripted HTTP server
on a local socket. Timeouts are short and every test has a generous hang guard; no test asserts
a speed, only counts of requests and the error that comes back.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dss.data import dataset
from dss.ingest import s3, sources
from dss.ingest import storage
from tests.conftest import FAKE_AWS_ENV, PYTHON, clean_env, run_script
from tests.test_sources import CountingHook, error_response

BODY = b"0123456789" * 10  # the object the scripted server serves (100 bytes)
EMPTY_LISTING = (b'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult '
                 b'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>b</Name><Prefix>d/</Prefix>'
                 b"<KeyCount>0</KeyCount><MaxKeys>1</MaxKeys><IsTruncated>false</IsTruncated></ListBucketResult>")


class ScriptedS3(ThreadingHTTPServer):
    """Answers ListObjectsV2 with an empty listing (unless ``hang_lists``); object GETs per ``get_mode``:
    "hang" (accept, read the request, never answer) or "drop" (headers + part of the body, then
    close the connection) for the first ``faulty_gets`` GETs, then the full BODY."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hang_lists = False
        self.get_mode = "hang"
        self.faulty_gets = 10**6
        self.requests = {"list": 0, "get": 0}
        self.release = threading.Event()  # set at teardown: hanging handlers return
        self.lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        return None

    def do_GET(self):
        server: ScriptedS3 = self.server
        kind = "list" if "list-type=2" in self.path else "get"
        with server.lock:
            server.requests[kind] += 1
            number = server.requests[kind]
        if kind == "list":
            if server.hang_lists:
                server.release.wait(60)
                return
            self._answer(EMPTY_LISTING, "application/xml")
            return
        if number <= server.faulty_gets:
            if server.get_mode == "hang":
                server.release.wait(60)
                return
            self.send_response(200)  # "drop": promise 100 bytes, send 40, close
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY[:40])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._answer(BODY, "image/jpeg")

    def _answer(self, body: bytes, content_type: str):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-amz-request-id", "SCRIPTED")
        self.end_headers()
        self.wfile.write(body)


def train_ids_written_to_s3(s3_client, bucket: str, tmp_path: Path) -> list[str]:
    """The ids of the train pickle preprocess wrote to s3://bucket/out/ (fetched, then loaded safely)."""
    local = tmp_path / "fetched"
    local.mkdir()
    (local / "train_data.pkl").write_bytes(
        s3_client.get_object(Bucket=bucket, Key="out/train_data.pkl")["Body"].read())
    return dataset.load_split(local, "train")["ids"]


@pytest.fixture
def scripted(monkeypatch):
    for key, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    server = ScriptedS3()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()


@pytest.fixture
def bucket(s3_client):
    name = f"c-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_dataset(s3_client, bucket, demo_data) -> str:
    """12 labelled demo images and the CSVs under s3://<bucket>/data/ (enough for a real run)."""
    for name in ("train_labels.csv", "train_features.csv"):
        s3_client.put_object(Bucket=bucket, Key=f"data/{name}", Body=(demo_data / name).read_bytes())
    for path in sorted((demo_data / "train_features").iterdir())[:12]:
        s3_client.put_object(Bucket=bucket, Key=f"data/train_features/{path.name}", Body=path.read_bytes())
    return f"s3://{bucket}/data/"


# ---------------------------------------------------------------------------- 5xx answers
@pytest.mark.parametrize("status, code", [(502, "BadGateway"), (503, "ServiceUnavailable"), (504, "GatewayTimeout")])
def test_c4_5xx_answers_are_retried(s3_server, s3_client, bucket, status, code):
    """(500 is in tests/test_sources.py::test_500_is_retried.) Two 5xx answers, then the object."""
    s3_client.put_object(Bucket=bucket, Key="a.jpg", Body=b"ok")
    source = storage.open_source(f"s3://{bucket}/", sources.SourceOptions(endpoint_url=s3_server["endpoint"],
                                                                          max_attempts=3))
    hook = CountingHook(lambda request: error_response(request, status, code), fail_times=2)
    source.client.meta.events.register("before-send.s3.GetObject", hook)
    assert source.read("a.jpg") == b"ok"
    assert hook.calls == 3 and source.stats.retries == 2


# ---------------------------------------------------------------------------- unreachable endpoint
@pytest.mark.timeout(120)
def test_c7_unknown_host_fails_at_open_naming_the_endpoint(monkeypatch):
    """DNS failure (the reserved .invalid TLD never resolves): SourceError at open, nothing else."""
    for key, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(key, value)
    endpoint = "http://dss-no-such-host.invalid:9000"
    with pytest.raises(sources.SourceError) as error:
        storage.open_source("s3://bucket/data/",
                            sources.SourceOptions(endpoint_url=endpoint, max_attempts=1, connect_timeout=2))
    assert "EndpointConnectionError" in str(error.value) and "dss-no-such-host.invalid" in str(error.value)


# ---------------------------------------------------------------------------- a server that never answers
@pytest.mark.timeout(120)
def test_c8_server_never_answers_the_probe_read_timeout_after_all_attempts(scripted):
    scripted.hang_lists = True
    with pytest.raises(sources.SourceError) as error:
        storage.open_source("s3://b/d/", sources.SourceOptions(endpoint_url=scripted.endpoint, max_attempts=2,
                                                               read_timeout=0.5, connect_timeout=2))
    assert "ReadTimeoutError" in str(error.value) and scripted.endpoint in str(error.value)
    assert scripted.requests["list"] == 2  # the configured attempts, then the error


@pytest.mark.timeout(120)
@pytest.mark.parametrize("flag, expected", [([], 2), (["--max-attempts", "3"], 3)], ids=["env", "flag_wins"])
def test_preprocess_takes_attempts_from_aws_max_attempts_unless_the_flag_is_given(scripted, tmp_path, flag,
                                                                                  expected):
    """preprocess.py with AWS_MAX_ATTEMPTS=2 against a server that never answers the probe: two
    attempts without --max-attempts (botocore's setting is honoured), the flag's number with it."""
    scripted.hang_lists = True
    config_file = tmp_path / "aws-config"
    config_file.write_text("")
    env = clean_env(**FAKE_AWS_ENV, AWS_MAX_ATTEMPTS="2", AWS_CONFIG_FILE=str(config_file))
    result = run_script("preprocess.py", ["--input", "s3://b/d/", "--output-dir", tmp_path / "out",
                                          "--endpoint-url", scripted.endpoint, "--read-timeout", "0.5",
                                          "--workers", "1", *flag], env=env, timeout=110)
    assert result.returncode == 2 and "ReadTimeoutError" in result.stderr, result.stdout + result.stderr
    assert scripted.requests["list"] == expected


@pytest.mark.timeout(120)
def test_c8_server_never_answers_a_get_is_a_recorded_skip(scripted):
    source = storage.open_source("s3://b/d/", sources.SourceOptions(endpoint_url=scripted.endpoint, max_attempts=3,
                                                                    read_timeout=0.5))
    results = dict(source.fetch_many(["a.jpg"], threads=1))
    skip = results["a.jpg"]
    assert isinstance(skip, sources.ObjectSkip) and skip.reason == "download_failed"
    assert "ReadTimeoutError" in str(skip) and "s3://b/d/a.jpg" in str(skip)
    assert scripted.requests["get"] == 3


# ---------------------------------------------------------------------------- connection dropped mid-body
@pytest.mark.timeout(120)
def test_c9_connection_dropped_mid_body_is_retried_then_read(scripted):
    """A real socket closed after 40 of 100 promised bytes (not a hook): our retry gets the object."""
    scripted.get_mode, scripted.faulty_gets = "drop", 1
    source = storage.open_source("s3://b/d/", sources.SourceOptions(endpoint_url=scripted.endpoint, max_attempts=3,
                                                                    read_timeout=5))
    assert source.read("a.jpg") == BODY
    assert scripted.requests["get"] == 2 and source.stats.body_retries == 1


@pytest.mark.timeout(120)
def test_c9_connection_dropped_every_time_is_a_recorded_skip(scripted):
    scripted.get_mode = "drop"
    source = storage.open_source("s3://b/d/", sources.SourceOptions(endpoint_url=scripted.endpoint, max_attempts=2,
                                                                    read_timeout=5))
    with pytest.raises(sources.ObjectSkip) as skip:
        source.read("a.jpg")
    assert skip.value.reason == "download_failed" and "incomplete" in str(skip.value)
    assert "2 attempts" in str(skip.value)


# ---------------------------------------------------------------------------- credentials and region
def no_aws_env(tmp_path, **variables: str) -> dict:
    """A subprocess environment with no AWS setting but ``variables``: no keys, no region, empty
    config and credentials files (so ~/.aws is not read), no instance metadata."""
    empty = tmp_path / "empty-aws-file"
    empty.write_text("")
    return clean_env(AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=str(empty),
                     AWS_SHARED_CREDENTIALS_FILE=str(empty), **variables)


def assert_failed_before_any_work(result, out, *messages: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for message in messages:
        assert message in result.stderr, result.stderr
    assert not out.exists()  # nothing read, nothing written: the output folder was never made


@pytest.mark.parametrize("variables, botocore_message, hint", [
    ({"AWS_ACCESS_KEY_ID": "testing"}, "Partial credentials found in env, missing: AWS_SECRET_ACCESS_KEY",
     "(needed to sign S3 requests)"),
    # botocore ignores a lone secret (no "partial" error): our hint names the missing half.
    ({"AWS_SECRET_ACCESS_KEY": "testing"}, "Unable to locate credentials",
     "AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not: an access key needs both."),
], ids=["key_id_only", "secret_only"])
def test_c11_partial_credentials_fail_before_any_work(s3_server, s3_dataset, tmp_path, variables, botocore_message,
                                                      hint):
    """The same data set and endpoint run fine with both halves (the end-to-end run below)."""
    env = no_aws_env(tmp_path, AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=s3_server["endpoint"], **variables)
    out = tmp_path / "out"
    result = run_script("preprocess.py", ["--input", s3_dataset, "--output-dir", out, "--workers", "1"], env=env)
    assert_failed_before_any_work(result, out, botocore_message, hint, s3.CREDENTIALS_HELP)


def test_c11_partial_credentials_for_an_s3_output_fail_before_reading_the_input(s3_server, s3_client, bucket,
                                                                                demo_data, tmp_path):
    env = no_aws_env(tmp_path, AWS_ACCESS_KEY_ID="testing", AWS_DEFAULT_REGION="us-east-1",
                     AWS_ENDPOINT_URL=s3_server["endpoint"])
    result = run_script("preprocess.py", ["--input", demo_data, "--output-dir", f"s3://{bucket}/out/",
                                          "--workers", "1"], env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stdout + result.stderr
    assert "Partial credentials found in env, missing: AWS_SECRET_ACCESS_KEY" in result.stderr
    assert "Processing" not in result.stdout
    assert s3_client.list_objects_v2(Bucket=bucket).get("KeyCount") == 0


def test_c11_no_region_with_an_endpoint_runs(s3_server, s3_client, bucket, s3_dataset, tmp_path):
    """Policy: S3 needs no region. With no AWS_DEFAULT_REGION/AWS_REGION and empty config files,
    botocore signs for us-east-1, which moto (and MinIO, Ceph...) accept: the run reads and writes."""
    env = no_aws_env(tmp_path, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    check = subprocess.run([PYTHON, "-c", "import boto3; print(boto3.session.Session().region_name)"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert check.stdout.strip() == "None", check.stdout + check.stderr  # really no region anywhere
    result = run_script("preprocess.py", ["--input", s3_dataset, "--output-dir", f"s3://{bucket}/out/",
                                          "--endpoint-url", s3_server["endpoint"], "--image-size", "32",
                                          "--workers", "1"], env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(train_ids_written_to_s3(s3_client, bucket, tmp_path)) == 12


def test_c11_no_region_against_aws_uses_us_east_1_and_the_global_endpoint(monkeypatch, tmp_path):
    """The botocore behaviour the no-region policy relies on (no request is sent): without a region
    the S3 client is made for us-east-1 at https://s3.amazonaws.com (never NoRegionError), and S3's
    redirect to the bucket's region is followed by botocore's region redirector."""
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in no_aws_env(tmp_path, AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s").items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    client = s3.make_s3_client()
    assert (client.meta.region_name, client.meta.endpoint_url) == ("us-east-1", "https://s3.amazonaws.com")


@pytest.mark.parametrize("region_source", ["empty_variable", "malformed_variable", "empty_in_profile"])
def test_c11_empty_or_malformed_region_fails_before_any_work_naming_aws_default_region(s3_server, s3_dataset,
                                                                                       tmp_path, region_source):
    """A region that is set must be valid: an empty one would build https://s3..amazonaws.com (or sign
    with an empty scope at a custom endpoint), a malformed one raises InvalidRegionError."""
    variables = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_ENDPOINT_URL": s3_server["endpoint"]}
    if region_source == "empty_variable":
        variables["AWS_DEFAULT_REGION"] = ""
    elif region_source == "malformed_variable":
        variables["AWS_DEFAULT_REGION"] = "eu west 1"
    env = no_aws_env(tmp_path, **variables)
    if region_source == "empty_in_profile":
        config_file = tmp_path / "config"
        config_file.write_text("[default]\nregion =\n")
        env["AWS_CONFIG_FILE"] = str(config_file)
    out = tmp_path / "out"
    result = run_script("preprocess.py", ["--input", s3_dataset, "--output-dir", out, "--workers", "1"], env=env)
    assert_failed_before_any_work(result, out, "AWS_DEFAULT_REGION", s3.REGION_HELP)


# ---------------------------------------------------------------------------- endpoint
def test_c12_endpoint_url_without_a_scheme_is_a_clear_error(monkeypatch):
    for key, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(sources.SourceError) as error:
        storage.open_source("s3://bucket/data/", sources.SourceOptions(endpoint_url="localhost:9000"))
    assert "Invalid endpoint: localhost:9000" in str(error.value) and "--endpoint-url" in str(error.value)


# ---------------------------------------------------------------------------- request checksums
def _put_headers(monkeypatch, s3_server, bucket, when_required: bool, tmp_path) -> list[dict]:
    monkeypatch.delenv("AWS_REQUEST_CHECKSUM_CALCULATION", raising=False)
    if when_required:
        monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
    output = storage.open_output(f"s3://{bucket}/out/", sources.SourceOptions(endpoint_url=s3_server["endpoint"]))
    seen = []
    output.client.meta.events.register("before-send.s3.PutObject",
                                       lambda request, **kwargs: seen.append(dict(request.headers.items())))
    try:
        output.prepare()
        (output.staging_dir / "x.txt").write_bytes(b"hello")
        output.publish(["x.txt"])
    finally:
        output.close()
    return seen


def test_c13_when_required_sends_no_default_checksums(s3_server, s3_client, bucket, monkeypatch, tmp_path):
    """Stores that reject botocore's default request checksums: with the env setting, our uploads
    carry none; by default they do (so this test can tell the two apart)."""
    def checksum_headers(headers):
        return [name for name in headers if name.lower().startswith(("x-amz-checksum-", "x-amz-sdk-checksum"))]

    default = _put_headers(monkeypatch, s3_server, bucket, False, tmp_path)
    assert default and all(checksum_headers(headers) for headers in default)
    when_required = _put_headers(monkeypatch, s3_server, bucket, True, tmp_path)
    assert len(when_required) == len(default) and not any(checksum_headers(h) for h in when_required)
    assert s3_client.get_object(Bucket=bucket, Key="out/x.txt")["Body"].read() == b"hello"


# ---------------------------------------------------------------------------- endpoint and checksums end to end
def test_c12_c13_subprocess_run_with_endpoint_url_s3_and_when_required(s3_server, s3_client, bucket, s3_dataset,
                                                                      tmp_path):
    """preprocess.py with AWS_ENDPOINT_URL_S3 only (no AWS_ENDPOINT_URL, no --endpoint-url) and
    AWS_REQUEST_CHECKSUM_CALCULATION=when_required: reads and writes moto without code changes."""
    env = clean_env(**FAKE_AWS_ENV, AWS_ENDPOINT_URL_S3=s3_server["endpoint"],
                    AWS_REQUEST_CHECKSUM_CALCULATION="when_required")
    result = run_script("preprocess.py", ["--input", f"s3://{bucket}/data/", "--output-dir", f"s3://{bucket}/out/",
                                          "--image-size", "32", "--workers", "1"], env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(train_ids_written_to_s3(s3_client, bucket, tmp_path)) == 12
