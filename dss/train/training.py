"""The parts of a training run that dss_train.py's ``train`` puts together, each built in one place:
the settings (flags with the paths resolved) and the three records derived from them (config.json,
the checkpoint fingerprint, the artifact's hyperparameters), the device and seeds, the network,
loss and schedule, and the per-epoch record and log lines (the stop flag: dss.stopping).
"""

from __future__ import annotations

import functools
import hashlib
import platform
import random
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from dss import distributed, stopping
from dss.cli import log
from dss.data import summaries
from dss.models import backbones, loader, prediction
from dss.models import model as model_lib
from dss.train import engine, outputs, previous_runs, tracking
from dss.train.ema import WeightEMA
from dss.train.training_args import Settings
from dss.train.training_data import TrainingData

if TYPE_CHECKING:
    from dss.train.checkpoint import TrainingState

# Seconds a socket operation of the ImageNet weights download may stall (not the whole download):
# torch.hub's urlopen has no timeout, so a network that drops packets would hang the job forever.
WEIGHTS_DOWNLOAD_TIMEOUT_S = 60.0
class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, no GPU when one was asked for...)."""

    @classmethod
    def non_finite(cls, exc: engine.NonFiniteLossError) -> TrainingError:
        return cls(f"non-finite loss at epoch {exc.epoch}, step {exc.step}: training stopped, no checkpoint or "
                   "model written from these weights; lower --learning-rate or check the data")


def recipe(settings: Settings, data: TrainingData) -> dict:
    """``settings.recipe`` with what the run resolved from the data and the machine: the split
    (site or random), the network input size, the device type, how batches are drawn
    (``data.batch_source``: streamed shard by shard, or from the whole split in memory) and, for a
    --weights file, its content (fine-tuning twice from one path may start from two models)."""
    return settings.recipe({"split_by": data.split_by, "image_size": data.input_size, "device": data.device.type,
                            "data_in_memory": data.batch_source, "weights": weights_identity(settings.weights)})


@functools.cache
def weights_identity(weights: str) -> str:
    """--weights as the fingerprint sees it: 'imagenet' and 'none' as given, a file as its path and sha256."""
    path = Path(weights)
    if weights in ("imagenet", "none") or not path.is_file():
        return weights  # a missing file fails where the network is built, with its own message
    with open(path, "rb") as handle:
        return f"{weights} (sha256 {hashlib.file_digest(handle, 'sha256').hexdigest()})"


def checkpoint_fingerprint(settings: Settings, data: TrainingData, context: distributed.Context,
                           fold: dict | None = None) -> dict:
    """What a checkpoint must have been made with to continue this run: the data, every setting
    that changes results (``recipe``) and the precision (``fold``: the member's
    ``crossval.Fold.fingerprint()``, nothing for K = 1)."""
    fingerprint = {"dataset_sha256": data.sha256, "num_classes": data.num_classes, "class_names": data.class_names,
                   "stored_image_size": data.stored_size, **recipe(settings, data),
                   "precision": precision_name(context.device), **(fold or {})}
    if context.enabled:
        # Another process count draws other batches: its checkpoints cannot continue this run.
        fingerprint["world_size"] = context.world_size
    return fingerprint


@dataclass(frozen=True)
class Schedule:
    """Optimizer steps per epoch, of linear warm-up and in all. ``--batch-size`` is per process
    (as in torchvision's references): one step trains on batch_size * world_size images."""

    steps_per_epoch: int
    warmup_steps: int
    total_steps: int

    @classmethod
    def of(cls, settings: Settings, num_train_images: int, world_size: int) -> Schedule:
        steps_per_epoch = loader.num_train_batches(num_train_images, settings.batch_size * world_size)
        return cls(steps_per_epoch, int(round(settings.warmup_epochs * steps_per_epoch)),
                   steps_per_epoch * settings.epochs)


def run_config(settings: Settings, data: TrainingData, context: distributed.Context, schedule: Schedule,
               resumed_from: Path | None) -> dict:
    """config.json: every flag (num_threads: the count in use, also when it was the default), then
    what this run resolved from them (saved next to the model), and the run's identity: ``run_key``
    (the data and every setting that changes results; dss.train.previous_runs) and ``run_id``."""
    key = previous_runs.run_key(data.sha256, recipe(settings, data))
    return {
        **settings.flags(), "num_threads": torch.get_num_threads(), "run_id": previous_runs.new_run_id(key),
        "run_key": key,
        "split_by": data.split_by, "image_size": data.input_size, "stored_image_size": data.stored_size,
        "resize_policy": data.resize_policy, "device": str(context.device),
        "precision": precision_name(context.device), "torch_version": torch.__version__,
        "python_version": platform.python_version(), "data_sha256": data.sha256, "class_names": data.class_names,
        "num_train_images": int(len(data.train_index)), "num_val_images": int(len(data.val_index)),
        "num_test_images": data.num_test_images, "steps_per_epoch": schedule.steps_per_epoch,
        "warmup_steps": schedule.warmup_steps, "resumed_from": str(resumed_from) if resumed_from else None,
        "memory_mode": data.memory_mode, "world_size": context.world_size,
        "global_batch_size": settings.batch_size * context.world_size,
    }


def start_tracking(tracker_settings: tracking.TrackingSettings, settings: Settings, state: TrainingState,
                   data: TrainingData, config: dict, context: distributed.Context) -> tracking.RunTracker:
    """This run's MLflow run (rank 0 only; a tracker that does nothing elsewhere or when not asked
    for): a resumed run continues the MLflow run its checkpoint names. Logs ``config`` as params and
    the data's fingerprint and preprocess counts as tags."""
    if not context.is_main:
        return tracking.RunTracker.disabled()
    tracker = tracking.RunTracker.start(tracker_settings, run_name=run_name(settings, config["run_id"]),
                                        resume_run_id=state.tracking_run_id)
    tracker.interruptions = (stopping.TrainingInterrupted, KeyboardInterrupt)
    if not tracker.active:
        return tracker
    state.tracking_run_id = tracker.run_id
    tracker.log_params(config)
    try:
        counts = summaries.read_split_counts(settings.data_dir)
    except ValueError as exc:  # an unreadable summary must not cost the run; it only lacks these tags
        log.warning(f"warning: no preprocess counts for MLflow: {exc}")
        counts = {}
    tracker.set_tags({"data_sha256": data.sha256, "stored_image_size": data.stored_size,
                      **{f"preprocess.{name}": count for name, count in counts.items()}})
    return tracker


def run_name(settings: Settings, run_id: str) -> str:
    """The MLflow run's name, so ten runs into one model dir can be told apart: the model dir, the
    main settings and the run id (start time), e.g. ``models resnet18 e10 lr0.001 b32 20261208-031502-ab12cd``."""
    folds = f" k{settings.folds}" if settings.folds > 1 else ""
    return (f"{settings.model_dir.name or 'dss-train'} {settings.arch} e{settings.epochs} lr{settings.learning_rate:g} "
            f"b{settings.batch_size}{folds} {run_id}")


# --------------------------------------------------------------------------- device, seeds, files
def precision_name(device: torch.device) -> str:
    amp_dtype, _ = prediction.select_precision(device)
    return str(amp_dtype).replace("torch.", "") if amp_dtype is not None else "float32"


def describe_device(context: distributed.Context, batch_size: int) -> str:
    device = context.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    text = f"device: {device} ({name}), precision: {precision_name(device)}, torch {torch.__version__}"
    if context.enabled:
        text += (f"; DDP: {context.world_size} processes ({context.backend}), global batch "
                 f"{batch_size * context.world_size}")
    return text


def seed_everything(seed: int, device: torch.device) -> torch.Generator:
    """Seed torch, numpy and python; return the generator (on ``device``) that draws batches and augmentation."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


# --------------------------------------------------------------------------- network and loss
def build_network(num_classes: int, settings: Settings,
                  download_timeout_s: float = WEIGHTS_DOWNLOAD_TIMEOUT_S) -> torch.nn.Module:
    """dss.models.model.build_model (``settings.weights``, ``settings.arch``) with a socket timeout while
    torchvision may download weights."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(download_timeout_s)
    try:
        return model_lib.build_model(num_classes, settings.weights, settings.arch)
    finally:
        socket.setdefaulttimeout(previous)


def make_ema(network: torch.nn.Module, decay: float) -> WeightEMA | None:
    """``--ema-decay``: the average of ``network``'s weights (None when 0, off)."""
    return WeightEMA(network, decay) if decay > 0.0 else None


def normalisation(arch: str) -> loader.Normalisation:
    """The input mean/std ``arch``'s weights were trained with (also for --weights none)."""
    return loader.Normalisation(*backbones.normalisation(arch))


def artifact_info(settings: Settings, data: TrainingData, members: int = 1) -> dict:
    """The model artifact this run will save, as ``dss.models.model.load_ensemble`` would read it
    back (weights and temperature aside): arch, classes, preprocessing (with the arch's
    normalisation), and every setting that changes results as its hyperparameters."""
    norm = normalisation(settings.arch)
    preprocessing = {**data.preprocessing(), "mean": list(norm.mean), "std": list(norm.std)}
    return model_lib.artifact_info(settings.arch, data.class_names, preprocessing, recipe(settings, data), members)


def inference(settings: Settings, data: TrainingData, context: distributed.Context) -> prediction.Inference:
    """How the run evaluates and predicts: ``prediction.spec_from_artifact`` of the artifact it will
    save (as --predict-only and hosting configure it), with --eval-batch-size and this rank's share."""
    return prediction.spec_from_artifact(artifact_info(settings, data), context.device, settings.eval_batch_size,
                                         rank=context.rank, world_size=context.world_size).inference


def augment(settings: Settings, data: TrainingData, norm: loader.Normalisation) -> loader.GpuAugment:
    """The training augmentation: random resized crops of --crop-scale..1 of the area (none at 1),
    flips, random grey, brightness and contrast, then ``norm``."""
    no_crop = settings.crop_scale >= 1.0
    return loader.GpuAugment(data.input_size, scale=(settings.crop_scale, 1.0),
                             ratio=(1.0, 1.0) if no_crop else (3 / 4, 4 / 3), normalisation=norm)


def to_device(network: torch.nn.Module, context: distributed.Context) -> torch.nn.Module:
    network = network.to(context.device)
    # DDP also on the CPU: its gradient buckets take the parameters' layout, which must match the
    # channels_last gradients that channels_last batches produce.
    if context.device.type == "cuda" or context.enabled:
        network = network.to(memory_format=torch.channels_last)
    return network


def wrap(network: torch.nn.Module, compile_model: bool, context: distributed.Context
         ) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(what the training steps call, what evaluation calls): ``network`` torch.compile'd when
    asked; under DDP the first is wrapped in DistributedDataParallel, while evaluation runs the
    module itself (the ranks predict different numbers of batches, and a DDP forward would wait
    for the others). Both share ``network``'s parameters."""
    if compile_model:
        network = torch.compile(network)
    if not context.enabled:
        return network, network
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(network, device_ids=device_ids), network


def make_loss(labels: np.ndarray, num_classes: int, class_weights: str, label_smoothing: float,
              device: torch.device) -> torch.nn.Module:
    """Cross-entropy; ``class_weights='balanced'`` weights it by inverse class frequency in ``labels``."""
    weight = None
    if class_weights == "balanced":
        weight = torch.as_tensor(engine.class_weights_balanced(labels, num_classes), dtype=torch.float32,
                                 device=device)
    return torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)


# --------------------------------------------------------------------------- per-epoch records
def epoch_record(epoch: int, train_stats: dict, eval_stats: dict, lr: float, epoch_seconds: float) -> dict:
    """One row of metrics.csv (``outputs.EPOCH_FIELDS``, in that order), and
    ``val_logloss_calibrated`` (metrics.json only; what --best-epoch-by calibrated-logloss compares)."""
    return {
        "epoch": epoch,
        "train_loss": float(train_stats["train_loss"]),
        "train_acc": float(train_stats["train_acc"]),
        "val_loss": float(eval_stats["val_loss"]),
        "val_logloss": float(eval_stats["val_logloss"]),
        "val_logloss_calibrated": float(eval_stats["val_logloss_calibrated"]),
        "val_acc": float(eval_stats["val_acc"]),
        "lr": float(lr),
        "epoch_seconds": float(epoch_seconds),
        "train_images_per_s": float(train_stats["train_images_per_s"]),
    }


def epoch_lines(record: dict, epochs: int, improved: bool, fold: str = "") -> list[str]:
    """The log lines of an epoch: a summary (after ``fold``, e.g. "fold 2/5 ", with --folds K > 1),
    the per-class F1 scores and the [METRICS] line."""
    summary = (f"{fold}epoch {record['epoch']}/{epochs}: train_loss {record['train_loss']:.4f} "
               f"acc {record['train_acc']:.4f} | val_loss {record['val_loss']:.4f} "
               f"logloss {record['val_logloss']:.4f} (calibrated {record['val_logloss_calibrated']:.4f}) "
               f"acc {record['val_acc']:.4f} | lr {record['lr']:.2e} | "
               f"{record['epoch_seconds']:.1f} s, {record['train_images_per_s']:.0f} img/s"
               + (" | best" if improved else ""))
    per_class = "per-class F1: " + ", ".join(f"{entry['class']} {entry['f1']:.2f}" for entry in record["per_class"])
    return [summary, per_class, outputs.metrics_line(record)]
