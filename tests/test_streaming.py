"""Training on data streamed from preprocess shards (bigger than memory): ``ShardedImages`` gives
the same pixels as the loaded split, every row once per epoch in a shard-shuffled order, and
dss_train.py --data-in-memory stream trains end to end (real subprocess, demo data) and leaves no
shard-reader thread behind (in process)."""

from __future__ import annotations

import json
import threading

import numpy as np
import pandas as pd
import pytest
import torch

import dss_train
from dss.data import dataset, streaming
from dss.models import loader
from tests.conftest import run_script


@pytest.fixture(scope="module")
def loaded(demo_shards):
    return dataset.load_split(demo_shards, "train")


def nchw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).permute(0, 3, 1, 2)


def test_scan_keeps_metadata_not_images(demo_shards, loaded):
    scanned = streaming.scan_split(demo_shards, "train")
    assert isinstance(scanned["images"], streaming.ShardedImages)
    assert scanned["images"].shape == loaded["images"].shape
    assert scanned["ids"] == list(loaded["ids"]) and scanned["sites"] == list(loaded["sites"])
    np.testing.assert_array_equal(scanned["labels"], loaded["labels"])
    assert scanned["class_names"] == loaded["class_names"]


def test_every_row_once_per_epoch_in_a_shard_shuffled_order(demo_shards, loaded):
    images = streaming.scan_split(demo_shards, "train")["images"].to_device(torch.device("cpu"))
    batch_size = 16
    generator = torch.Generator().manual_seed(0)
    epochs = []
    for _ in range(2):
        batches = list(images.train_batches(batch_size, generator))
        assert len(batches) == loader.num_train_batches(len(images), batch_size)
        assert all(batch.numel() == batch_size for batch in batches)
        rows = torch.cat(batches).numpy()
        assert len(set(rows.tolist())) == len(rows) == len(images) // batch_size * batch_size
        epochs.append(rows)
        # The pixels of a batch are the loaded split's rows at those indices.
        torch.testing.assert_close(images.gather(batches[1]), nchw(loaded["images"][batches[1].numpy()]))
    assert not np.array_equal(epochs[0], epochs[1])
    # Shard-level shuffle: the first shard visited is whole at the start of the epoch.
    first_rows = epochs[0][:images.offsets[1] - images.offsets[0]]
    shards_seen = np.unique(np.searchsorted(images.offsets, first_rows[:8], side="right") - 1)
    assert len(shards_seen) == 1
    images.close()


def test_slices_and_subsets_match_the_loaded_split(demo_shards, loaded):
    images = streaming.scan_split(demo_shards, "train")["images"]
    subset_index = np.arange(0, len(images), 3)
    subset = images.subset(subset_index).to_device(torch.device("cpu"))
    expected = loaded["images"][subset_index]
    assert len(subset) == len(subset_index)
    # Slices that cross shard boundaries, as evaluation reads them.
    for start in range(0, len(subset), 7):
        torch.testing.assert_close(subset.slice(start, start + 7), nchw(expected[start:start + 7]))
    subset.close()


def test_auto_streams_only_when_the_split_exceeds_the_host_memory_share():
    gib = 2**30
    assert streaming.choose_memory_mode("auto", split_bytes=4 * gib, host_bytes=16 * gib) == "device"
    assert streaming.choose_memory_mode("auto", split_bytes=9 * gib, host_bytes=16 * gib) == "stream"
    assert streaming.choose_memory_mode("host", split_bytes=9 * gib, host_bytes=1) == "host"
    with pytest.raises(ValueError, match="memory mode must be one of"):
        streaming.choose_memory_mode("disk", split_bytes=1)


def test_training_on_streamed_shards(demo_shards, tmp_path):
    models = tmp_path / "models"
    result = run_script("dss_train.py", ["--data-dir", demo_shards, "--model-dir", models, "--epochs", "1",
                                         "--batch-size", "16", "--weights", "none", "--num-threads", "1",
                                         "--data-in-memory", "stream"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "images in memory: stream" in result.stdout
    assert json.loads((models / "config.json").read_text())["memory_mode"] == "stream"
    report = json.loads((models / "metrics.json").read_text())
    assert np.isfinite(report["best"]["val_logloss"])
    val = pd.read_csv(models / "val_predictions.csv")
    class_names = list(val.columns[3:])
    np.testing.assert_allclose(val[class_names].sum(axis=1), 1.0, atol=1e-6)
    test = pd.read_csv(models / "test_predictions.csv")
    assert len(test) == len(dataset.load_split(demo_shards, "test")["ids"])


def _reader_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("shard-reader")]


@pytest.mark.parametrize("folds, views_placed", [(1, 4), (2, 7)])
def test_a_streamed_run_leaves_no_reader_thread(folds, views_placed, demo_shards, tmp_path, monkeypatch):
    """Each streamed view reads its next shard in a background thread; the run must stop them all
    when it ends, here in the process that called it (as a notebook or a sweep would). The test
    keeps every view alive, as a caller holding on to one or a reference cycle would: CPython's
    garbage collection of a dropped view would otherwise end its thread and hide a missing close."""
    views = []
    to_device = streaming.ShardedImages.to_device

    def keep(self, device):
        views.append(to_device(self, device))
        return views[-1]

    monkeypatch.setattr(streaming.ShardedImages, "to_device", keep)
    assert not _reader_threads()
    threads = torch.get_num_threads()
    try:
        code = dss_train.main(["--data-dir", str(demo_shards), "--model-dir", str(tmp_path / "models"),
                               "--epochs", "1", "--batch-size", "16", "--weights", "none", "--num-threads", "1",
                               "--data-in-memory", "stream", "--folds", str(folds)])
    finally:
        torch.set_num_threads(threads)
    assert code == 0 and (tmp_path / "models" / "model.pth").is_file()
    # Per member its train, validation and test images; then the top-loss images shown.
    assert len(views) == views_placed
    assert not _reader_threads(), _reader_threads()
