"""Atomic writes: disk full (D1), kill -9 mid-write (D2), stale temp sweep; and config parsing."""

from __future__ import annotations

import argparse
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dss import cli, fileio, sagemaker


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "out" / "metrics.json"
    fileio.write_json(target, {"a": 1})
    fileio.write_json(target, {"a": 2})
    assert target.read_text().strip().endswith("}")
    assert '"a": 2' in target.read_text()
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]


def test_exception_inside_keeps_old_file_and_removes_temp(tmp_path):
    target = tmp_path / "data.bin"
    fileio.write_bytes(target, b"old")
    with pytest.raises(RuntimeError):
        with fileio.atomic_write(target) as handle:
            handle.write(b"partial")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin"]




def test_d1_disk_full_surfaces_enospc_and_keeps_previous_file(tiny_filesystem):
    target = tiny_filesystem / "train_data.pkl"
    fileio.write_bytes(target, b"previous complete file")
    with pytest.raises(OSError) as info:
        fileio.write_bytes(target, os.urandom(256 * 1024))
    assert info.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"previous complete file"
    assert [p.name for p in tiny_filesystem.iterdir()] == ["train_data.pkl"]


WRITER = r"""
import sys
from dss import fileio
path, size = sys.argv[1], int(sys.argv[2])
block = bytes([int(sys.argv[3])]) * size
while True:
    with fileio.atomic_write(path) as handle:
        for offset in range(0, size, 65536):
            handle.write(block[offset:offset + 65536])
"""


def test_d2_kill_9_never_leaves_partial_file_and_temps_are_swept(tmp_path):
    target = tmp_path / "train_data.pkl"
    size = 4 * 1024 * 1024
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(repo))
    for attempt in range(6):
        process = subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(size), str(attempt + 1)], env=env)
        time.sleep(0.3 + 0.17 * attempt)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        if target.exists():
            content = target.read_bytes()
            assert len(content) == size, "a partial file appeared under the final name"
            assert len(set(content)) == 1
    removed = fileio.sweep_stale(tmp_path)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "train_data.pkl"]
    assert leftovers == [], f"stale temps not swept: {leftovers} (removed {removed})"


def test_sweep_keeps_temps_of_live_processes(tmp_path):
    live = tmp_path / f".metrics.json.{os.getppid()}.tmp"
    live.write_text("in progress")
    dead_pid = 2 ** 22 + 12345
    dead = tmp_path / f".metrics.json.{dead_pid}.tmp"
    dead.write_text("stale")
    fileio.sweep_stale(tmp_path)
    assert live.exists() and not dead.exists()


@pytest.mark.parametrize("text, expected", [
    ("true", True), ("True", True), ("1", True), ("yes", True),
    ("false", False), ("False", False), ("0", False), ("no", False),
])
def test_str2bool_accepts_sagemaker_spellings(text, expected):
    assert cli.str2bool(text) is expected


def test_str2bool_rejects_other_values():
    with pytest.raises(argparse.ArgumentTypeError):
        cli.str2bool("maybe")


def test_sagemaker_paths_come_from_environment(tmp_path):
    env = {"SM_TRAINING_ENV": "{}", "SM_CHANNEL_TRAINING": "/x/train", "SM_MODEL_DIR": "/x/model",
           "SM_OUTPUT_DATA_DIR": "/x/out", "SM_OUTPUT_DIR": str(tmp_path)}
    assert sagemaker.under_sagemaker(env)
    assert sagemaker.training_channel(env) == "/x/train"
    assert sagemaker.training_channel({"SM_CHANNEL_TRAIN": "/y"}) == "/y"
    assert sagemaker.model_dir(env) == "/x/model"
    assert sagemaker.output_data_dir(env) == "/x/out"
    assert sagemaker.checkpoint_dir(env) == "/opt/ml/checkpoints"
    assert sagemaker.checkpoint_dir({}) is None
    path = sagemaker.write_failure("bad data", env)
    assert path == tmp_path / "failure" and path.read_text() == "bad data\n"
    assert sagemaker.write_failure("x", {}) is None


def test_sweep_limited_to_named_files_keeps_other_runs_temps(tmp_path):
    """Shard runs sharing a folder from several machines see each other's pids as dead: a run sweeps
    only the temps of the files it will write itself."""
    dead_pid = 2 ** 22 + 12345
    mine = tmp_path / f".train_data-00000-of-00002.pkl.{dead_pid}.tmp"
    other_shard = tmp_path / f".train_data-00001-of-00002.pkl.{dead_pid}.tmp"
    for path in (mine, other_shard):
        path.write_text("stale or another machine's")
    removed = fileio.sweep_stale(tmp_path, finals={"train_data-00000-of-00002.pkl", "test_data.pkl"})
    assert removed == [mine] and other_shard.exists()
