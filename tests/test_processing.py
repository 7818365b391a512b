"""SageMaker Processing jobs: preprocess.py picks shard i of K from the job's config by itself.

The config is a fake ``/opt/ml/config`` tree in tmp_path (``DSS_PROCESSING_CONFIG_DIR``), in the
format SageMaker writes. Case A: every instance sees the whole input (an s3:// prefix or a
FullyReplicated input) and takes its contiguous 1/K. Case B: the images come from a ShardedByS3Key
input, mimicked by the demo data split by hand into K "instance" folders, and the CSVs from a
replicated folder (--csv-dir). Real subprocess runs of preprocess.py and dss_train.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dss.data import dataset
from dss import sagemaker
from tests.conftest import clean_env, run_script

K = 3
SIZE = "32"
CSV_NAMES = ("train_labels.csv", "train_features.csv", "test_features.csv")


def write_config(folder: Path, current_host: str, num_hosts: int, inputs: list[tuple[str, Path, str | None]]) -> Path:
    """A Processing job's /opt/ml/config: ``inputs`` = [(name, local path, distribution or None)]."""
    folder.mkdir(parents=True)
    hosts = [f"algo-{number}" for number in range(1, num_hosts + 1)]
    (folder / sagemaker.RESOURCE_CONFIG).write_text(json.dumps(
        {"current_host": current_host, "hosts": hosts, "network_interface_name": "eth0"}))
    entries = []
    for name, local_path, distribution in inputs:
        s3_input = {"S3Uri": f"s3://bucket/{name}/", "LocalPath": str(local_path), "S3DataType": "S3Prefix",
                    "S3InputMode": "File", "S3CompressionType": "None"}
        if distribution is not None:
            s3_input["S3DataDistributionType"] = distribution
        entries.append({"InputName": name, "AppManaged": False, "S3Input": s3_input})
    (folder / sagemaker.JOB_CONFIG).write_text(json.dumps({
        "ProcessingJobName": "dss-preprocess-test",
        "ProcessingInputs": entries,
        "ProcessingOutputConfig": {"Outputs": [{"OutputName": "pickles", "S3Output": {
            "S3Uri": "s3://bucket/output/", "LocalPath": "/opt/ml/processing/output", "S3UploadMode": "EndOfJob"}}]},
        "ProcessingResources": {"ClusterConfig": {"InstanceCount": num_hosts, "InstanceType": "ml.m5.xlarge",
                                                  "VolumeSizeInGB": 30}},
    }))
    return folder


def env_for(config_dir: Path, **extra) -> dict:
    return clean_env(**{sagemaker.CONFIG_DIR_ENV: str(config_dir)}, **extra)


def sorted_by_id(data: dict) -> dict:
    order = np.argsort(np.asarray(data["ids"]))
    return {"ids": [data["ids"][i] for i in order], "images": data["images"][order],
            "labels": None if data["labels"] is None else np.asarray(data["labels"])[order],
            "sites": [data["sites"][i] for i in order]}


def assert_same_rows(got: dict, want: dict) -> None:
    assert got["ids"] == want["ids"]
    np.testing.assert_array_equal(got["images"], want["images"])
    assert got["sites"] == want["sites"]
    if want["labels"] is None:
        assert got["labels"] is None
    else:
        np.testing.assert_array_equal(got["labels"], want["labels"])


# ---------------------------------------------------------------------------- reading the config
def test_no_config_means_no_job(tmp_path):
    assert sagemaker.load_job({sagemaker.CONFIG_DIR_ENV: str(tmp_path)}) is None


def test_host_index_and_input_distribution(tmp_path):
    images, csvs, other = tmp_path / "processing" / "images", tmp_path / "processing" / "csv", tmp_path / "other"
    folder = write_config(tmp_path / "config", "algo-2", 3, [("images", images, "ShardedByS3Key"),
                                                            ("csv", csvs, "FullyReplicated"), ("extra", other, None)])
    job = sagemaker.load_job({sagemaker.CONFIG_DIR_ENV: str(folder)})
    assert (job.current_host, job.shard_index, job.num_shards) == ("algo-2", 1, 3)
    assert job.sharded_input_for(images).name == "images"
    assert job.sharded_input_for(images / "train_features").name == "images"   # under the LocalPath
    assert job.sharded_input_for(tmp_path / "processing").name == "images"      # a parent of it
    assert job.sharded_input_for(csvs) is None
    assert job.sharded_input_for(other) is None  # no distribution given: FullyReplicated (the API default)


@pytest.mark.parametrize("resource, job_config, expected", [
    ({"current_host": "algo-4", "hosts": ["algo-1", "algo-2"]}, {}, "field 'current_host'"),
    ({"current_host": "algo-1", "hosts": []}, {}, "field 'hosts'"),
    ({"current_host": "algo-1", "hosts": ["algo-1"]},
     {"ProcessingInputs": [{"S3Input": {"LocalPath": "/x", "S3DataDistributionType": "Sharded"}}]},
     "field 'S3DataDistributionType'"),
    ({"current_host": "algo-1", "hosts": ["algo-1"]}, {"ProcessingInputs": [{"S3Input": {"S3Uri": "s3://b/"}}]},
     "field 'LocalPath'"),
    ({"current_host": "algo-1", "hosts": ["algo-1"]}, None, "processingjobconfig.json does not"),
])
def test_unusable_config_names_the_file_and_field(tmp_path, resource, job_config, expected):
    (tmp_path / sagemaker.RESOURCE_CONFIG).write_text(json.dumps(resource))
    if job_config is not None:
        (tmp_path / sagemaker.JOB_CONFIG).write_text(json.dumps(job_config))
    with pytest.raises(sagemaker.ProcessingConfigError, match=expected) as error:
        sagemaker.load_job({sagemaker.CONFIG_DIR_ENV: str(tmp_path)})
    assert str(tmp_path) in str(error.value)


def test_unusable_config_stops_preprocess_with_exit_2(demo_data, tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / sagemaker.RESOURCE_CONFIG).write_text("{not json")
    result = run_script("preprocess.py", ["--input", demo_data, "--output-dir", tmp_path / "out", "--workers", "1"],
                        env=env_for(tmp_path / "config"))
    assert result.returncode == 2
    assert "resourceconfig.json is not valid JSON" in result.stderr
    assert not list((tmp_path / "out").glob("*.pkl"))
    assert "resourceconfig.json is not valid JSON" in (tmp_path / "output" / "message").read_text(encoding="utf-8")


# ---------------------------------------------------------------------------- case B: ShardedByS3Key images
@pytest.fixture(scope="module")
def sharded_job(demo_data, tmp_path_factory):
    """The demo data as SageMaker's ShardedByS3Key would spread it over K instances (objects dealt out
    in key order, not in contiguous id ranges), the CSVs in a replicated folder, and one preprocess run
    per instance, each with its own config, into one output folder."""
    root = tmp_path_factory.mktemp("processing-job")
    csv_dir = root / "csv"
    csv_dir.mkdir()
    for name in CSV_NAMES:
        shutil.copy(demo_data / name, csv_dir / name)
    instances = [root / f"instance-{index}" / "images" for index in range(K)]
    image_paths = sorted(path for path in demo_data.rglob("*.jpg"))
    for number, path in enumerate(image_paths):
        target = instances[number % K] / path.relative_to(demo_data)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    # A sharded prefix that also holds a CSV hands it to one instance only; --csv-dir makes it irrelevant.
    shutil.copy(demo_data / "train_labels.csv", instances[0] / "train_labels.csv")
    # A real skip on one instance: its copy of one train image is truncated to 0 bytes.
    corrupt = sorted((instances[1] / "train_features").glob("*.jpg"))[0]
    corrupt.write_bytes(b"")
    out = root / "output"
    runs = []
    for index, images in enumerate(instances):
        config_dir = write_config(root / f"instance-{index}" / "config", f"algo-{index + 1}", K,
                                  [("images", images, "ShardedByS3Key"), ("csv", csv_dir, "FullyReplicated")])
        result = run_script("preprocess.py", ["--input", images, "--csv-dir", csv_dir, "--output-dir", out,
                                              "--image-size", SIZE, "--workers", "1"], env=env_for(config_dir))
        assert result.returncode == 0, result.stdout + result.stderr
        runs.append(result)
    return {"instances": instances, "out": out, "runs": runs, "corrupt_id": corrupt.stem}


def shard_summary(out: Path, index: int) -> dict:
    return json.loads((out / f"preprocessing_summary-{index:05d}-of-{K:05d}.json").read_text())


def test_each_instance_names_its_files_by_host(sharded_job):
    out = sharded_job["out"]
    for index, result in enumerate(sharded_job["runs"]):
        assert f"host algo-{index + 1} of ['algo-1', 'algo-2', 'algo-3'] -> shard {index} of {K}" in result.stdout
        assert "ShardedByS3Key input 'images'" in result.stdout
        suffix = f"-{index:05d}-of-{K:05d}"
        for name in (f"train_data{suffix}.pkl", f"test_data{suffix}.pkl", f"train_metadata{suffix}.csv",
                     f"preprocessing_summary{suffix}.json", f"preprocessing_summary{suffix}.txt"):
            assert (out / name).is_file(), name
        assert shard_summary(out, index)["shard"] == {"index": index, "count": K}
    assert not (out / "train_data.pkl").exists()


def test_every_csv_id_is_written_skipped_or_on_another_instance(sharded_job, demo_data):
    out, instances = sharded_job["out"], sharded_job["instances"]
    csv_ids = {"train": len((demo_data / "train_labels.csv").read_text().strip().splitlines()) - 1,
               "test": len((demo_data / "test_features.csv").read_text().strip().splitlines()) - 1}
    for split in ("train", "test"):
        listed_total = 0
        for index in range(K):
            summary = shard_summary(out, index)["splits"][split]
            local_images = len(list((instances[index] / f"{split}_features").glob("*.jpg")))
            # Everything SageMaker put on this instance is processed; nothing is sliced again.
            assert summary["listed"] == local_images == summary["written"] + summary["skipped_count"]
            assert summary["in_other_shards"] == csv_ids[split] - local_images
            assert "missing_object" not in summary["skip_reasons"]
            assert summary["notes"]["ids_without_object"] == 0
            listed_total += summary["listed"]
        assert listed_total == csv_ids[split]
    train_1 = shard_summary(out, 1)["splits"]["train"]
    assert train_1["skip_reasons"] == {"empty": 1} and train_1["skipped"][0]["id"] == sharded_job["corrupt_id"]
    text = (out / f"preprocessing_summary-00001-of-{K:05d}.txt").read_text()
    assert f"in other shards: {csv_ids['train'] - train_1['listed']} CSV id(s)" in text


@pytest.mark.parametrize("split", ["train", "test"])
def test_union_of_the_instances_equals_one_run(sharded_job, demo_pickles, split):
    whole = dataset.load_split(demo_pickles, split)
    keep = [i for i, image_id in enumerate(whole["ids"]) if image_id != sharded_job["corrupt_id"]]
    want = {"ids": [whole["ids"][i] for i in keep], "images": whole["images"][keep],
            "labels": None if whole["labels"] is None else whole["labels"][keep],
            "sites": [whole["sites"][i] for i in keep]}
    joined = dataset.load_split(sharded_job["out"], split)
    assert joined["class_names"] == whole["class_names"]
    assert_same_rows(sorted_by_id(joined), want)


def test_training_reads_the_instances_output(sharded_job, tmp_path):
    models = tmp_path / "models"
    result = run_script("dss_train.py", ["--data-dir", sharded_job["out"], "--model-dir", models, "--epochs", "1",
                                         "--batch-size", "16", "--weights", "none", "--num-threads", "1"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[METRICS] epoch=1 " in result.stdout
    rows = (models / "test_predictions.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + len(dataset.load_split(sharded_job["out"], "test")["ids"])


def test_sharded_input_without_replicated_csvs_is_refused(sharded_job, tmp_path):
    images = sharded_job["instances"][2]
    config_dir = write_config(tmp_path / "config", "algo-3", K, [("images", images, "ShardedByS3Key")])
    result = run_script("preprocess.py", ["--input", images, "--output-dir", tmp_path / "out", "--workers", "1"],
                        env=env_for(config_dir))
    assert result.returncode == 2
    assert "ShardedByS3Key input" in result.stderr
    assert "FullyReplicated" in result.stderr and "--csv-dir" in result.stderr
    assert not list((tmp_path / "out").glob("*.pkl"))
    # The job's ExitMessage (/opt/ml/output/message beside /opt/ml/config) carries the same reason.
    exit_message = (tmp_path / "output" / "message").read_text(encoding="utf-8")
    assert exit_message.startswith("preprocess: ") and "ShardedByS3Key input" in exit_message


def test_csv_dir_without_csvs_is_refused(sharded_job, tmp_path):
    empty = tmp_path / "no-csvs"
    empty.mkdir()
    result = run_script("preprocess.py", ["--input", sharded_job["instances"][0], "--csv-dir", empty,
                                          "--output-dir", tmp_path / "out", "--workers", "1"], env=clean_env())
    assert result.returncode == 2
    assert f"--csv-dir {empty} has none of train_labels.csv" in result.stderr


# ---------------------------------------------------------------------------- case A: every instance sees all
def test_s3_input_auto_shards_into_one_s3_output(demo_data, demo_pickles, s3_server, s3_client, tmp_path):
    bucket = "processing-case-a"
    s3_client.create_bucket(Bucket=bucket)
    for path in sorted(demo_data.rglob("*")):
        if path.is_file():
            s3_client.put_object(Bucket=bucket, Key="data/" + path.relative_to(demo_data).as_posix(),
                                 Body=path.read_bytes())
    for index in range(K):
        # The code input is FullyReplicated; --input is an s3:// prefix, which is no ProcessingInput at all.
        config_dir = write_config(tmp_path / f"config-{index}", f"algo-{index + 1}", K,
                                  [("code", tmp_path / "code", "FullyReplicated")])
        result = run_script("preprocess.py", ["--input", f"s3://{bucket}/data/", "--output-dir",
                                              f"s3://{bucket}/pickles/", "--image-size", SIZE, "--workers", "1"],
                            env=dict(s3_server["env"], **{sagemaker.CONFIG_DIR_ENV: str(config_dir)}))
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"-> shard {index} of {K}" in result.stdout and "ShardedByS3Key" not in result.stdout
    local = tmp_path / "fetched"
    local.mkdir()
    for obj in s3_client.list_objects_v2(Bucket=bucket, Prefix="pickles/")["Contents"]:
        (local / obj["Key"].split("/")[-1]).write_bytes(s3_client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read())
    for split in ("train", "test"):
        parts = [dataset.load_file(path) for path in dataset.find_split_files(local, split)]
        assert len(parts) == K and all(len(part["ids"]) > 0 for part in parts)
        # Contiguous 1/K slices of the sorted ids: the union is the single run, in order, without sorting.
        assert_same_rows(dataset.load_split(local, split), dataset.load_split(demo_pickles, split))


def test_replicated_folder_input_auto_shards_and_explicit_flags_win(demo_data, demo_pickles, tmp_path):
    config_dir = write_config(tmp_path / "config", "algo-3", K, [("data", demo_data, "FullyReplicated")])
    out = tmp_path / "auto"
    result = run_script("preprocess.py", ["--input", demo_data, "--output-dir", out, "--image-size", SIZE,
                                          "--workers", "1"], env=env_for(config_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    whole = dataset.load_split(demo_pickles, "train")
    last_third = dataset.load_file(out / f"train_data-00002-of-{K:05d}.pkl")
    count = len(whole["ids"])
    assert list(last_third["ids"]) == list(whole["ids"][2 * count // K:])
    assert "in_other_shards" not in shard_summary(out, 2)["splits"]["train"]

    for flags in (["--num-shards", "1"], ["--auto-shard", "false"]):
        out = tmp_path / flags[0].strip("-")
        result = run_script("preprocess.py", ["--input", demo_data, "--output-dir", out, "--image-size", SIZE,
                                              "--workers", "1", *flags], env=env_for(config_dir))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SageMaker Processing job" not in result.stdout
        assert (out / "train_data.pkl").is_file() and not list(out.glob("*-of-*"))
