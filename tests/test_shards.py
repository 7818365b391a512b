"""Sharded preprocessing: K=3 runs into one folder equal one K=1 run, and dss_train.py trains on
the shard folder directly. Real subprocess runs of preprocess.py and dss_train.py on the demo data."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from dss.data import dataset, streaming
from dss.demo.sample import write_demo_dataset
from tests.conftest import DEMO_SHARDS as NUM_SHARDS, run_script


def test_shard_files_are_named_by_the_contract(demo_shards):
    names = sorted(path.name for path in demo_shards.iterdir())
    for index in range(NUM_SHARDS):
        suffix = f"-{index:05d}-of-{NUM_SHARDS:05d}"
        for name in (f"train_data{suffix}.pkl", f"test_data{suffix}.pkl",
                     f"preprocessing_summary{suffix}.json", f"preprocessing_summary{suffix}.txt"):
            assert name in names
    assert "train_data.pkl" not in names and "preprocessing_summary.json" not in names
    summary = json.loads((demo_shards / f"preprocessing_summary-00001-of-{NUM_SHARDS:05d}.json").read_text())
    assert summary["shard"] == {"index": 1, "count": NUM_SHARDS}


@pytest.mark.parametrize("split", ["train", "test"])
def test_three_shards_equal_one_run(demo_shards, demo_pickles, split):
    whole = dataset.load_split(demo_pickles, split)
    joined = dataset.load_split(demo_shards, split)
    assert list(joined["ids"]) == list(whole["ids"])
    np.testing.assert_array_equal(joined["images"], whole["images"])
    if whole["labels"] is None:
        assert joined["labels"] is None
    else:
        np.testing.assert_array_equal(joined["labels"], whole["labels"])
    assert list(joined["sites"]) == list(whole["sites"])
    assert list(joined["class_names"]) == list(whole["class_names"])
    # Every shard holds a non-empty, disjoint part.
    parts = [dataset.load_file(path) for path in dataset.find_split_files(demo_shards, split)]
    assert len(parts) == NUM_SHARDS and all(len(part["ids"]) > 0 for part in parts)
    assert sum(len(part["ids"]) for part in parts) == len(whole["ids"])


def test_training_reads_the_shard_folder(demo_shards, tmp_path):
    models = tmp_path / "models"
    result = run_script("dss_train.py", ["--data-dir", demo_shards, "--model-dir", models, "--epochs", "1",
                                         "--batch-size", "16", "--weights", "none", "--num-threads", "1"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert (models / "model.pth").is_file()
    assert "[METRICS] epoch=1 " in result.stdout
    whole = dataset.load_split(demo_shards, "test")
    rows = (models / "test_predictions.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + len(whole["ids"])


def _shard_runs(data, out, count: int) -> None:
    for index in range(count):
        result = run_script("preprocess.py", ["--input", data, "--output-dir", out, "--image-size", "32", "--workers",
                                              "1", "--num-shards", count, "--shard-index", index, "--quiet"])
        assert result.returncode == 0, result.stdout + result.stderr


def test_a_shard_without_test_images_writes_an_empty_pickle_and_stale_shards_are_swept(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    write_demo_dataset(data, n_train=48, n_test=6, seed=1, scale=0.1)
    _shard_runs(data, out, 3)  # an earlier run: 6 test images, 2 per shard
    lines = (data / "test_features.csv").read_text().splitlines()
    (data / "test_features.csv").write_text("\n".join(lines[:3]) + "\n")  # 2 test ids: shard 0 of 3 gets none
    kept_ids = sorted(line.split(",")[0] for line in lines[1:3])
    _shard_runs(data, out, 3)

    empty = dataset.load_file(out / "test_data-00000-of-00003.pkl")  # N = 0, the same schema
    other = dataset.load_file(out / "test_data-00001-of-00003.pkl")
    assert empty["images"].shape == (0, 32, 32, 3) and empty["images"].dtype == np.uint8
    assert empty["ids"] == [] and empty["labels"] is None and empty["class_names"] == other["class_names"]
    assert set(empty["meta"]) == set(other["meta"]) and empty["info"]["split"] == "test"
    assert (out / "test_metadata-00000-of-00003.csv").read_text().count("\n") == 1  # the header alone
    assert json.loads((out / "preprocessing_summary-00000-of-00003.json").read_text())["splits"]["test"]["written"] == 0
    # Every shard is there, the earlier run's rows of shard 0 are not: loaded whole and streamed.
    assert dataset.load_split(out, "test")["ids"] == kept_ids
    streamed = streaming.scan_split(out, "test")
    assert streamed["ids"] == kept_ids and len(streamed["images"]) == 2
    models = tmp_path / "models"
    trained = run_script("dss_train.py", ["--data-dir", out, "--model-dir", models, "--epochs", "1", "--batch-size",
                                          "16", "--weights", "none", "--num-threads", "1", "--data-in-memory", "stream"])
    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert len((models / "test_predictions.csv").read_text().strip().splitlines()) == 1 + 2

    _shard_runs(data, out, 2)  # another K: each new shard sweeps its share of the old K's files
    assert not list(out.glob("*-of-00003.*"))
    assert dataset.load_split(out, "test")["ids"] == kept_ids
    (data / "test_features.csv").unlink()
    shutil.rmtree(data / "test_features")
    _shard_runs(data, out, 2)  # a split these shards no longer have: their own test files go
    assert not list(out.glob("test_*")) and len(dataset.load_split(out, "train")["ids"]) == 48
