"""One data set per output folder: preprocess.py refuses to write a different data set over another's
files (before any work, touching nothing) unless --overwrite; re-runs of the same data set replace
their own files, and stale-file sweeps touch only this data set's leftovers. Real subprocess runs on
real JPEG folders, and a moto S3 server for s3:// outputs."""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from pathlib import Path

import pytest

from dss.data import dataset
from tests.conftest import run_script
from tests.test_preprocess import jpeg

SIZE = "32"


def week_folder(root: Path, count: int = 13) -> Path:
    """A deployment week: ``count`` camera JPEGs and no CSVs (preprocess takes them as test images)."""
    root.mkdir(parents=True)
    for number in range(count):
        (root / f"cam1_{number:04d}.jpg").write_bytes(jpeg(colour=(number * 9, 40, 90)))
    return root


def snapshot(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def preprocess(*args, cwd=None, env=None):
    return run_script("preprocess.py", [*map(str, args), "--workers", "1"], cwd=cwd, env=env)


@pytest.fixture
def demo_output(demo_pickles, tmp_path) -> Path:
    """A copy of the demo's preprocess output (pickles, metadata, summaries), for this test to disturb."""
    out = tmp_path / "output"
    shutil.copytree(demo_pickles, out)
    return out


def test_another_input_into_the_demo_output_is_refused_before_any_work(demo_output, tmp_path):
    week = week_folder(tmp_path / "week-folder")
    before = snapshot(demo_output)
    refused = preprocess("--input", week, "--output-dir", demo_output, "--image-size", SIZE)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    message = refused.stderr
    assert "holds another data set's files" in message and "train_data.pkl" in message
    assert str(tmp_path / "output-week-folder") in message  # a fresh folder, named
    assert "--overwrite true" in message and "Nothing was written or removed" in message
    assert "Traceback" not in message and "Listing" not in refused.stdout  # before the listing
    assert snapshot(demo_output) == before  # every file in place, byte for byte

    refused_again = preprocess("--input", week, "--output-dir", demo_output, "--image-size", SIZE,
                               "--overwrite", "false")
    assert refused_again.returncode == 2 and snapshot(demo_output) == before

    replaced = preprocess("--input", week, "--output-dir", demo_output, "--image-size", SIZE, "--overwrite")
    assert replaced.returncode == 0, replaced.stdout + replaced.stderr
    assert "another data set's (--overwrite)" in replaced.stdout
    names = {path.name for path in demo_output.iterdir()}
    assert names == {"test_data.pkl", "test_metadata.csv", "preprocessing_summary.json", "preprocessing_summary.txt"}
    assert len(dataset.load_split(demo_output, "test")["ids"]) == 13


def test_a_rerun_of_the_same_input_replaces_its_own_files_however_the_input_is_spelt(demo_data, tmp_path):
    shutil.copytree(demo_data, tmp_path / "data")
    first = preprocess("--input", "./data", "--output-dir", "./output", "--image-size", SIZE, "--limit", "20",
                       cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    out = tmp_path / "output"
    summary = json.loads((out / "preprocessing_summary.json").read_text())
    assert summary["input"] == "./data" and summary["input_resolved"] == str((tmp_path / "data").resolve())
    for spelling in ("data", str(tmp_path / "data") + "/"):
        again = preprocess("--input", spelling, "--output-dir", out, "--image-size", SIZE, "--limit", "30",
                           cwd=tmp_path)
        assert again.returncode == 0, again.stdout + again.stderr
    assert len(dataset.load_split(out, "train")["ids"]) == 30  # --limit is no pixel setting: replaced

    # A summary written before input_resolved existed: its input is resolved against the current folder.
    del summary["input_resolved"]
    (out / "preprocessing_summary.json").write_text(json.dumps(summary))
    legacy = preprocess("--input", "./data", "--output-dir", "./output", "--image-size", SIZE, "--limit", "20",
                        cwd=tmp_path)
    assert legacy.returncode == 0, legacy.stdout + legacy.stderr

    # Another setting that decides the pixels makes another data set.
    before = snapshot(out)
    for flags in (["--image-size", "48"], ["--image-size", SIZE, "--resize", "pad"]):
        other = preprocess("--input", "./data", "--output-dir", "./output", *flags, cwd=tmp_path)
        assert other.returncode == 2 and "at 32 px, --resize squash" in other.stderr, other.stderr
    assert snapshot(out) == before


def test_shard_runs_share_a_folder_but_another_data_set_may_not_join(demo_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(demo_shards, shards)
    before = snapshot(shards)
    week = week_folder(tmp_path / "week")
    refused = preprocess("--input", week, "--output-dir", shards, "--image-size", SIZE,
                         "--num-shards", "3", "--shard-index", "1")
    assert refused.returncode == 2 and "preprocessing_summary-00000-of-00003.json" in refused.stderr
    assert snapshot(shards) == before

    # A sibling shard of this run's K still publishing (its pickle there, its summary not yet) is no
    # other data set, and is left alone.
    sibling = tmp_path / "sibling"
    sibling.mkdir()
    (sibling / "test_data-00001-of-00002.pkl").write_bytes(b"shard 1 of 2, summary on its way")
    ok = preprocess("--input", week, "--output-dir", sibling, "--image-size", SIZE,
                    "--num-shards", "2", "--shard-index", "0")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert (sibling / "test_data-00001-of-00002.pkl").read_bytes() == b"shard 1 of 2, summary on its way"


@pytest.fixture
def bucket(s3_client):
    name = f"guard-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    return name


def test_an_s3_output_is_checked_through_its_summary(demo_data, s3_server, s3_client, bucket, tmp_path):
    out = f"s3://{bucket}/pickles/"
    first = preprocess("--input", demo_data, "--output-dir", out, "--image-size", SIZE, env=s3_server["env"])
    assert first.returncode == 0, first.stdout + first.stderr

    def objects() -> dict[str, str]:
        return {item["Key"]: item["ETag"] for item in s3_client.list_objects_v2(Bucket=bucket)["Contents"]}

    before = objects()
    assert "pickles/train_data.pkl" in before
    week = week_folder(tmp_path / "week")
    refused = preprocess("--input", week, "--output-dir", out, "--image-size", SIZE, env=s3_server["env"])
    assert refused.returncode == 2 and f"s3://{bucket}/pickles/ holds another data set's files" in refused.stderr
    assert objects() == before
    rerun = preprocess("--input", demo_data, "--output-dir", out, "--image-size", SIZE, env=s3_server["env"])
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    replaced = preprocess("--input", week, "--output-dir", out, "--image-size", SIZE, "--overwrite", "True",
                          env=s3_server["env"])
    assert replaced.returncode == 0, replaced.stdout + replaced.stderr
    assert "pickles/train_data.pkl" not in objects() and "pickles/test_data.pkl" in objects()
