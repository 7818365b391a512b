"""Sharded preprocessing: K=3 runs into one folder equal one K=1 run, and dss_train.py trains on
the shard folder directly. Real subprocess runs of preprocess.py and dss_train.py on the demo data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dss import dataset
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
