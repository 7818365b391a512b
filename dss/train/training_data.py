"""The data of one training run: the train split and the optional test split, loaded whole or
streamed from their shards, checked to agree, split into train and validation, and placed where
batches are cheap to draw.

``with load(settings, device) as data:`` owns them for the run. Streamed images read their shards
in a background thread each (dss.data.streaming); leaving the block stops those threads, whether the
run finished, failed or was stopped by SIGTERM.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dss.train import fingerprints, split
from dss import cli
from dss.data import agreement, dataset, streaming, summaries
from dss.models import loader
from dss.cli import log
from dss.train.training_args import Settings


def fingerprint(data: dict) -> str:
    """sha256 identifying a train split for checkpoints, the same whether its images are loaded or
    streamed (a resume must not depend on free memory): the pixels hashed in row order (a streamed
    split's were hashed shard by shard while scanning), then shape, ids, labels, class names, sites."""
    images = data["images"]
    if isinstance(images, streaming.ShardedImages):
        pixels, (height, width) = data["images_sha256"], (images.height, images.width)
    else:
        pixels, (height, width) = hashlib.sha256(memoryview(np.ascontiguousarray(images).reshape(-1))).hexdigest(), \
            images.shape[1:3]
    empty = np.zeros((0, height, width, 3), dtype=np.uint8)
    rest = dataset.content_fingerprint(empty, data["ids"], data["labels"], data["class_names"], data["sites"])
    return hashlib.sha256(f"pixels:{pixels}:{rest}".encode()).hexdigest()


def choose_memory_mode(requested: str, split_bytes: int, checkpoint_dir: Path | None) -> str:
    """--data-in-memory resolved: with 'auto', a run resuming from checkpoints keeps the memory
    mode they were made with (streamed data draws batches in another order), else
    ``streaming.choose_memory_mode`` decides from the free host memory."""
    chosen = streaming.choose_memory_mode(requested, split_bytes)
    saved = fingerprints.saved_setting(checkpoint_dir, "data_in_memory") if requested == "auto" else None
    if saved == "stream" and chosen != "stream":
        log.info("images in memory: stream, as the checkpoints in --checkpoint-dir were made (their batch order)")
        return "stream"
    if saved == "memory" and chosen == "stream":
        raise dataset.DatasetError(
            f"the checkpoints in {checkpoint_dir} were made with the images in memory, but the train pickles "
            f"({split_bytes / 2**30:.1f} GiB) no longer fit the free host memory, so --data-in-memory auto would "
            "stream them (another batch order): free memory and re-run, or pass --data-in-memory device to try "
            "in memory anyway, or start fresh with a new --checkpoint-dir (streamed)")
    return chosen


def check_summaries(data_dir: Path) -> None:
    """Read preprocess's summaries now, before any training: the outputs need the images it
    skipped, and an unreadable summary found at the end would cost the whole run."""
    try:
        summaries.read_skipped_test_ids(data_dir)
        summaries.read_split_counts(data_dir)
    except ValueError as exc:
        raise dataset.DatasetError(str(exc)) from exc


def choose_split_by(requested: str | None, sites: list[str]) -> str:
    """``requested``, else 'site' when the images come from two or more known sites, else 'random'."""
    has_sites = all(sites) and len(set(sites)) >= 2
    if requested is None:
        if has_sites:
            return "site"
        log.info("note: the training data has no camera sites; using a random validation split "
                 "(its score is optimistic for new sites)")
        return "random"
    return requested


def _train_files(data_dir: Path) -> list[Path]:
    """The train pickle(s); a folder with test data only is most likely one to predict."""
    try:
        return dataset.find_split_files(data_dir, "train")
    except FileNotFoundError:
        if not data_dir.is_dir() or not any(data_dir.glob("test_data*.pkl")):
            raise
        raise FileNotFoundError(
            f"no train data in {data_dir}, only test data: to classify these images with a trained model add "
            "--predict-only (--model-dir holding its model.pth); to train, preprocess labelled images "
            f"(train_labels.csv) into {data_dir}") from None


def _input_size(requested: int | None, stored_size: int, data_dir: Path) -> int:
    """The network input size: --image-size, else the stored size, which must be large enough."""
    if requested is None and stored_size < cli.MIN_IMAGE_SIZE:
        raise dataset.DatasetError(
            f"{data_dir}: the images are stored at {stored_size} px, below the {cli.MIN_IMAGE_SIZE} px ResNet18 "
            f"needs (it halves the image five times): re-run preprocess.py with --image-size {cli.MIN_IMAGE_SIZE} "
            f"or more, or pass --image-size {cli.MIN_IMAGE_SIZE} to upscale them")
    return requested or stored_size


def _read_split(data_dir: Path, name: str, streamed: bool) -> dict:
    return streaming.scan_split(data_dir, name) if streamed else dataset.load_split(data_dir, name)


def _read_optional_test(data_dir: Path, streamed: bool) -> dict | None:
    """The test split, or None when preprocess wrote train data only (training goes on without
    test predictions)."""
    try:
        return _read_split(data_dir, "test", streamed)
    except FileNotFoundError:
        log.info(f"note: no test_data.pkl in {data_dir}: training without test predictions "
                 "(test_predictions.csv is not written; use --predict-only on a folder with test data later)")
        return None


@dataclass
class TrainingData:
    """A run's splits (``dataset.load_split`` dicts; images a ``ShardedImages`` when streamed),
    how they are held (``memory_mode``: 'device', 'host' or 'stream'), the network input size in
    px, the validation split (``is_val``: bool (N,), True = validation) and the train split's
    ``sha256`` fingerprint. A context manager: leaving it closes every streamed view it placed."""

    train: dict
    test: dict | None
    memory_mode: str
    device: torch.device
    input_size: int
    split_by: str
    is_val: np.ndarray
    sha256: str
    _placed: list = field(default_factory=list)

    @property
    def labels(self) -> np.ndarray:
        return self.train["labels"]

    @property
    def class_names(self) -> list[str]:
        return list(self.train["class_names"])

    @property
    def num_classes(self) -> int:
        return len(self.train["class_names"])

    @property
    def train_index(self) -> np.ndarray:
        return np.flatnonzero(~self.is_val)

    @property
    def val_index(self) -> np.ndarray:
        return np.flatnonzero(self.is_val)

    @property
    def num_test_images(self) -> int:
        return len(self.test["ids"]) if self.test is not None else 0

    @property
    def stored_size(self) -> int:
        """Side of the stored images, px."""
        return int(self.train["images"].shape[1])

    @property
    def resize_policy(self) -> str:
        return str(self.train["info"].get("resize_policy", "squash"))

    @property
    def batch_source(self) -> str:
        """Where training batches are drawn from, which decides their order: 'stream' (shard by
        shard) or 'memory' (the whole split; --data-in-memory device and host draw alike)."""
        return "stream" if self.memory_mode == "stream" else "memory"

    @property
    def prior(self) -> np.ndarray:
        """float64 (C,): each class's share of the labelled training images (the prediction for a
        test image preprocess skipped)."""
        counts = np.bincount(self.labels, minlength=self.num_classes).astype(np.float64)
        return counts / counts.sum()

    def preprocessing(self) -> dict:
        """Stored in model.pth, so inference preprocesses images exactly as training did."""
        return {"image_size": self.input_size, "stored_image_size": self.stored_size,
                "resize_policy": self.resize_policy,
                "mean": list(loader.IMAGENET_MEAN), "std": list(loader.IMAGENET_STD), "channels": "RGB",
                "class_prior": self.prior.tolist()}

    def place(self, images, index: np.ndarray | None = None):
        """The rows ``index`` (all when None) of a split's images, ready to batch on the device:
        a ``ShardedImages`` view for streamed data, else a ``DeviceImages`` on the device ('device';
        pinned host memory when it does not fit) or in pinned host memory ('host')."""
        if isinstance(images, streaming.ShardedImages):
            view = (images if index is None else images.subset(index)).to_device(self.device)
            self._placed.append(view)
            return view
        chosen = images if index is None else images[index]
        return loader.DeviceImages(chosen, self.device, resident=False if self.memory_mode == "host" else None)

    def release(self, *views) -> None:
        """Stop the reader threads of these placed views now (a K-fold run's member is done with
        its views; the run goes on). Views that are not streamed have nothing to stop."""
        for view in views:
            if any(view is placed for placed in self._placed):
                view.close()
                self._placed[:] = [placed for placed in self._placed if placed is not view]

    def close(self) -> None:
        """Stop the reader thread of every streamed view placed."""
        for view in self._placed:
            view.close()
        self._placed.clear()

    def __enter__(self) -> TrainingData:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def load(settings: Settings, device: torch.device) -> TrainingData:
    """Read the splits in ``settings.data_dir`` as the settings ask: in memory or streamed
    (``data_in_memory``), the network input size (``image_size``) and the validation split
    (``split_by``, ``val_fraction``, ``seed``). Logs what it found."""
    data_dir = settings.data_dir
    split_bytes = sum(path.stat().st_size for path in _train_files(data_dir))
    check_summaries(data_dir)
    memory_mode = choose_memory_mode(settings.data_in_memory, split_bytes, settings.checkpoint_dir)
    streamed = memory_mode == "stream"
    train = _read_split(data_dir, "train", streamed)
    if train["labels"] is None:
        raise dataset.DatasetError(f"{data_dir}: the train split has no labels")
    test = _read_optional_test(data_dir, streamed)
    if test is not None:
        agreement.check_agreement(test, agreement.preprocessing_of(train), f"{data_dir} (test)", f"{data_dir} (train)")
    stored_size = int(train["images"].shape[1])
    input_size = _input_size(settings.image_size, stored_size, data_dir)
    log.info(f"data: {len(train['labels'])} train images, {len(test['ids']) if test is not None else 0} test images, "
             f"{len(train['class_names'])} classes, stored {stored_size} px, network input {input_size} px; "
             f"images in memory: {memory_mode} (train pickles {split_bytes / 2**20:.1f} MiB)")
    sha256 = fingerprint(train)
    split_by = choose_split_by(settings.split_by, train["sites"])
    if settings.folds > 1:  # the folds are made (and logged) by crossval.plan; no single split
        is_val = np.zeros(len(train["labels"]), dtype=bool)
    else:
        is_val = split.make_split(train["labels"], train["sites"], settings.val_fraction, settings.seed, split_by)
        log.info(f"split by {split_by}: {int((~is_val).sum())} train / {int(is_val.sum())} validation images")
    return TrainingData(train, test, memory_mode, device, input_size, split_by, is_val, sha256)
