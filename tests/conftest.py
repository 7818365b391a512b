"""Shared fixtures: a real moto S3 server over HTTP, small demo datasets, and script runners.

Nothing here mocks boto3: S3 tests talk HTTP to a moto server process started per session.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

# Credentials for the local moto server only; never real AWS.
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**extra: str) -> dict:
    """The current environment without AWS/SageMaker settings that could leak into a test run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SM_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(REPO_ROOT)
    env.update(extra)
    return env


def run_script(script: str, args: list[str], env: dict | None = None, timeout: float = 600,
               cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    """Run ``preprocess.py``/``dss_train.py`` (or ``-m module``) as a real subprocess; text output."""
    command = [PYTHON, *(script.split() if script.startswith("-m ") else [str(REPO_ROOT / script)]), *map(str, args)]
    return subprocess.run(command, env=env if env is not None else clean_env(), cwd=cwd or REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def server_process(command: list[str], port: int, name: str, log_path: Path | None = None, timeout: float = 60):
    """Start a local server process and wait until ``port`` accepts connections; stopped on exit.
    Its output goes to ``log_path`` (quoted when it fails to start), else nowhere."""
    log = open(log_path or os.devnull, "wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=clean_env())
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    output = log_path.read_text()[-2000:] if log_path else ""
                    raise RuntimeError(f"{name} did not start within {timeout:.0f} s (is it installed?) {output}")
                time.sleep(0.2)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server process on a free local port. Yields a dict with ``endpoint`` and ``env``
    (fake credentials + AWS_ENDPOINT_URL) for subprocesses."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with server_process([PYTHON, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], port, "moto server"):
        yield {"endpoint": endpoint, "env": clean_env(**FAKE_AWS_ENV, AWS_ENDPOINT_URL=endpoint), "port": port}


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` (SQLite backend, local artifact store) on a free local port; yields its URI."""
    pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    command = [PYTHON, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'runs.db'}",
               "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]
    with server_process(command, port, "mlflow server", log_path=root / "server.log", timeout=120):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture
def s3_client(s3_server, monkeypatch):
    """A boto3 client on the moto server (for arranging test objects, never for the code under test)."""
    import boto3

    for key, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(key, value)
    return boto3.client("s3", endpoint_url=s3_server["endpoint"], region_name="us-east-1")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """A small demo dataset in the Conser-vision layout (tiny images so tests stay fast)."""
    from dss.demo.sample import write_demo_dataset

    root = tmp_path_factory.mktemp("demo") / "data"
    write_demo_dataset(root, n_train=160, n_test=40, seed=0, scale=0.1)
    return root


@pytest.fixture(scope="session")
def demo_pickles(demo_data, tmp_path_factory) -> Path:
    """``demo_data`` run through preprocess.py at 32 px: a folder with train/test pickles."""
    out = tmp_path_factory.mktemp("pickles")
    result = run_script("preprocess.py", ["--input", demo_data, "--output-dir", out, "--image-size", "32"])
    assert result.returncode == 0, result.stdout + result.stderr
    return out


DEMO_SHARDS = 3  # shards written by the ``demo_shards`` fixture


@pytest.fixture(scope="session")
def demo_shards(demo_data, tmp_path_factory) -> Path:
    """``demo_data`` preprocessed at 32 px as DEMO_SHARDS shard runs into one folder."""
    out = tmp_path_factory.mktemp("shards")
    for index in range(DEMO_SHARDS):
        result = run_script("preprocess.py", ["--input", demo_data, "--output-dir", out, "--image-size", "32",
                                              "--workers", "1", "--num-shards", str(DEMO_SHARDS),
                                              "--shard-index", str(index), "--quiet"])
        assert result.returncode == 0, result.stdout + result.stderr
    return out


@pytest.fixture
def one_cpu_thread():
    """Tests with torch on the CI machine's few shared cores: one intra-op thread is much faster
    than two contending (use with ``pytestmark = pytest.mark.usefixtures("one_cpu_thread")``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 64 KiB tmpfs: a real ENOSPC. Needs root (CI and dev machines run as root)."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; D1 is then covered only where tests run as root")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
