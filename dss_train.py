"""Fine-tune a torchvision ResNet18 on preprocess.py's pickles; write the model, metrics, plots
and test predictions. Also the SageMaker script-mode entry point and hosting script.

Local runs (after ``python preprocess.py --output-dir ./output``):

    python dss_train.py --data-dir ./output --model-dir ./models --epochs 10 --batch-size 32 --learning-rate 0.001
    python dss_train.py --data-dir ./output --model-dir ./models --weights none --epochs 3      # offline
    python dss_train.py --data-dir ./output --model-dir ./models --checkpoint-dir ./checkpoints  # resumable
    python dss_train.py --data-dir ./new_deployment --model-dir ./models --predict-only          # classify new images

Outputs. Model dir: ``model.pth`` (weights + class names + preprocessing, loadable with
``torch.load(weights_only=True)``), ``config.json`` (the resolved configuration). Output dir
(``--output-dir``; default the model dir, ``SM_OUTPUT_DATA_DIR`` under SageMaker): metrics.json,
metrics.csv, splits.csv, val_predictions.csv, test_predictions.csv (only when the data dir has a
test split), training_curves.png, confusion_matrix.png. A re-run replaces all of them together once
they are all written; a run that fails leaves the previous run's files as they were. Each epoch
prints a per-class F1 line and one line for SageMaker ``metric_definitions``:

    [METRICS] epoch=3 train_loss=0.4123 train_acc=0.8512 val_loss=0.5000 val_acc=0.8000 val_logloss=0.5100

SageMaker (PyTorch estimator, ``entry_point="dss_train.py"``): hyperparameters arrive as
``--key value`` strings with the key exactly as written in the estimator's ``hyperparameters``
dict, so use the dashed names: ``{"epochs": 10, "batch-size": 64, "weights": "imagenet"}``.
Unknown names are an error. Paths default from SM_CHANNEL_TRAINING/SM_CHANNEL_TRAIN, SM_MODEL_DIR
and SM_OUTPUT_DATA_DIR; checkpoints go to /opt/ml/checkpoints (set ``checkpoint_s3_uri`` for spot
training) and a restarted job resumes from the newest valid one. A failure's reason is written to
``$SM_OUTPUT_DIR/failure``. ``model_fn``/``input_fn``/``predict_fn``/``output_fn`` below serve the
model after ``estimator.deploy()``.

Exit status: 0 success; 1 error (message on stderr); 2 bad arguments; 143 stopped by SIGTERM
after saving a checkpoint (re-run with the same --checkpoint-dir to continue).
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import random
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from dss import checkpoint as checkpoint_lib
from dss import cli, dataset, distributed, engine, fileio, loader, metrics, outputs, reporting, sagemaker, split
from dss import model as model_lib
from dss.serve import MODEL_FILENAME, input_fn, model_fn, output_fn, predict_fn  # noqa: F401 - SageMaker hosting handlers

SIGTERM_EXIT_CODE = 128 + signal.SIGTERM
# Seconds a socket operation of the ImageNet weights download may stall (not the whole download):
# torch.hub's urlopen has no timeout, so a network that drops packets would hang the job forever.
WEIGHTS_DOWNLOAD_TIMEOUT_S = 60.0


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, no GPU when one was asked for...)."""


class TrainingInterrupted(Exception):
    """SIGTERM arrived; a checkpoint was saved when there is a checkpoint dir."""


# False on DDP ranks other than 0: one copy of each log line and [METRICS] line per run.
_log_enabled = True


def log(message: str) -> None:
    if _log_enabled:
        print(message, flush=True)


def set_logging(enabled: bool) -> None:
    global _log_enabled
    _log_enabled = bool(enabled)


# --------------------------------------------------------------------------- arguments
class _ArgumentParser(argparse.ArgumentParser):
    """An argument error is a failed job too: SageMaker shows the reason from the failure file."""

    def error(self, message: str):
        sagemaker.write_failure(f"invalid arguments: {message}")
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        description="Fine-tune ResNet18 on preprocess.py pickles (also the SageMaker entry point).",
        formatter_class=cli.HelpFormatter,
        allow_abbrev=False,
    )
    paths = parser.add_argument_group("paths")
    paths.add_argument("--data-dir", default=None,
                       help="folder with train_data.pkl/test_data.pkl (or their shards) "
                            "[default: $SM_CHANNEL_TRAINING, else $SM_CHANNEL_TRAIN, else ./output]")
    paths.add_argument("--model-dir", default=None,
                       help="where model.pth and config.json go [default: $SM_MODEL_DIR, else ./models]")
    paths.add_argument("--output-dir", default=None,
                       help="where metrics, predictions and plots go "
                            "[default: $SM_OUTPUT_DATA_DIR under SageMaker, else the model dir]")
    paths.add_argument("--checkpoint-dir", default=None,
                       help="resume from / save per-epoch checkpoints here "
                            "[default: none locally; /opt/ml/checkpoints under SageMaker]")

    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=cli.positive_int, default=10, help="passes over the training split")
    train.add_argument("--batch-size", type=cli.positive_int, default=32,
                       help="training images per optimizer step (on a GPU use 256 or more for throughput)")
    train.add_argument("--learning-rate", type=float, default=1e-3, help="peak learning rate after warm-up")
    train.add_argument("--optimizer", choices=("adamw", "adam", "sgd"), default="adamw", help="optimizer")
    train.add_argument("--weight-decay", type=float, default=0.01, help="weight decay (decoupled for adamw)")
    train.add_argument("--warmup-epochs", type=float, default=0.5,
                       help="epochs of linear learning-rate warm-up before the cosine decay (may be fractional)")
    train.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing of the loss, 0..1")
    train.add_argument("--class-weights", choices=("none", "balanced"), default="none",
                       help="'balanced' weights the loss by inverse class frequency")
    train.add_argument("--patience", type=cli.non_negative_int, default=0,
                       help="stop after this many epochs without a better val_logloss (0 = never)")
    train.add_argument("--weights", default="imagenet",
                       help="initial weights: 'imagenet' (torchvision download/cache), 'none' (random) "
                            "or a PATH to a state dict / model.pth")
    train.add_argument("--image-size", type=cli.positive_int, default=None,
                       help="network input size in px [default: the size stored in the pickles]")
    train.add_argument("--seed", type=int, default=0, help="seed for the split, initialisation and batches")

    split_group = parser.add_argument_group("validation split")
    split_group.add_argument("--val-fraction", type=cli.fraction, default=0.25,
                             help="share of the labelled images held out for validation")
    split_group.add_argument("--split-by", choices=split.SPLIT_CHOICES, default=None,
                             help="'site' keeps every camera site on one side (what the test set needs); "
                                  "[default: site when the data has sites, else random]")

    run = parser.add_argument_group("run")
    run.add_argument("--predict-only", type=cli.str2bool, nargs="?", const=True, default=False,
                     help="no training: load model.pth from --model-dir and write test_predictions.csv "
                          "for --data-dir (true/false; the flag alone means true)")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                     help="'auto' uses the GPU when there is one")
    run.add_argument("--compile", type=cli.str2bool, default=False,
                     help="torch.compile the model (true/false; ~20 s compile, faster epochs on GPU)")
    run.add_argument("--tta", type=cli.str2bool, default=False,
                     help="average predictions over the image and its horizontal flip (true/false)")
    run.add_argument("--data-in-memory", choices=loader.MEMORY_MODES, default="auto",
                     help="where the images live while training: 'device' (all on the GPU; pinned host memory "
                          "when they do not fit), 'host' (pinned host memory, batches copied), 'stream' (read "
                          "shard by shard from --data-dir with double buffering: data bigger than memory); "
                          f"'auto' streams when the train pickles exceed {loader.HOST_MEMORY_SHARE * 100:.0f}%% of the "
                          "available host memory, else 'device'")
    run.add_argument("--eval-batch-size", type=cli.positive_int, default=256,
                     help="images per forward pass when evaluating and predicting")
    run.add_argument("--num-threads", type=cli.positive_int, default=None,
                     help="CPU threads for torch [default: torch's choice]")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # parse_args (not parse_known_args): a misspelt SageMaker hyperparameter must stop the job.
    return build_parser().parse_args(argv)


def resolve_paths(args: argparse.Namespace) -> dict:
    """Flags win; then SageMaker's SM_* variables; then the local defaults."""
    data_dir = args.data_dir or sagemaker.training_channel() or "./output"
    model_dir = args.model_dir or sagemaker.model_dir() or "./models"
    sagemaker_output = sagemaker.output_data_dir() if sagemaker.under_sagemaker() else None
    output_dir = args.output_dir or sagemaker_output or model_dir
    checkpoint_dir = args.checkpoint_dir or sagemaker.checkpoint_dir()
    return {"data_dir": Path(data_dir), "model_dir": Path(model_dir), "output_dir": Path(output_dir),
            "checkpoint_dir": Path(checkpoint_dir) if checkpoint_dir else None}


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda was given but torch sees no GPU; use --device auto or cpu")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def seed_everything(seed: int, device: torch.device) -> torch.Generator:
    """Seed torch, numpy and python; return the generator (on ``device``) that draws batches and augmentation."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


class StopFlag:
    """Set by SIGTERM (SageMaker spot interruption, ``docker stop``); training stops at the next step."""

    def __init__(self):
        self.event = threading.Event()
        self.previous = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)

    def uninstall(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None

    def _handle(self, signum, frame) -> None:
        log("SIGTERM received: stopping at the next step and saving a checkpoint")
        self.event.set()

    def __call__(self) -> bool:
        return self.event.is_set()


def data_fingerprint(data: dict) -> str:
    """sha256 identifying a train split for checkpoints. A streamed split's pixels were hashed
    shard by shard while scanning, so its fingerprint differs from the loaded split's (a checkpoint
    is resumed in the memory mode that wrote it)."""
    images = data["images"]
    if isinstance(images, loader.ShardedImages):
        empty = np.zeros((0, images.height, images.width, 3), dtype=np.uint8)
        rest = checkpoint_lib.dataset_fingerprint(empty, data["ids"], data["labels"], data["class_names"],
                                                  data["sites"])
        return hashlib.sha256(f"stream:{data['images_sha256']}:{rest}".encode()).hexdigest()
    return checkpoint_lib.dataset_fingerprint(images, data["ids"], data["labels"], data["class_names"],
                                              data["sites"])


def make_stop_check(stop_flag: StopFlag, context: distributed.Context, every_steps: int = 8):
    """The ``stop_requested`` poll for the training loop. Under DDP all ranks must stop at the same
    step, so every ``every_steps`` calls the ranks agree (one small all-reduce) whether any of them
    got SIGTERM; the loop calls it once per step on every rank, so the ranks count alike."""
    if not context.enabled:
        return stop_flag
    calls = 0

    def stop_requested() -> bool:
        nonlocal calls
        calls += 1
        return calls % every_steps == 0 and distributed.any_rank(context, stop_flag())

    return stop_requested


# --------------------------------------------------------------------------- training
def class_prior(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Share of each class among the labelled training images (used for skipped test images)."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    return counts / counts.sum()


def choose_split_by(requested: str | None, sites: list[str]) -> str:
    has_sites = all(sites) and len(set(sites)) >= 2
    if requested is None:
        if has_sites:
            return "site"
        log("note: the training data has no camera sites; using a random validation split "
            "(its score is optimistic for new sites)")
        return "random"
    return requested


def build_network(num_classes: int, weights: str, download_timeout_s: float = WEIGHTS_DOWNLOAD_TIMEOUT_S
                  ) -> torch.nn.Module:
    """dss.model.build_model with a socket timeout while torchvision may download weights."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(download_timeout_s)
    try:
        return model_lib.build_model(num_classes, weights)
    finally:
        socket.setdefaulttimeout(previous)


def host_state_dict(network: torch.nn.Module) -> dict:
    """A CPU copy of the weights (the best epoch's are kept while training continues)."""
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in network.state_dict().items()}


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The module itself inside torch.compile and DistributedDataParallel wrappers (state dict
    names stay plain)."""
    while True:
        if isinstance(network, torch.nn.parallel.DistributedDataParallel):
            network = network.module
        elif hasattr(network, "_orig_mod"):
            network = network._orig_mod
        else:
            return network


def make_loss(labels: np.ndarray, num_classes: int, class_weights: str, label_smoothing: float,
              device: torch.device) -> torch.nn.Module:
    weight = None
    if class_weights == "balanced":
        weight = torch.as_tensor(engine.class_weights_balanced(labels, num_classes), dtype=torch.float32,
                                 device=device)
    return torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)


def merge_epoch_parts(partial: dict | None, stats: dict) -> dict:
    """Running sums of one epoch over its parts (an epoch interrupted by SIGTERM and resumed is
    two parts), so its train_loss/train_acc cover every batch, as in an uninterrupted run."""
    partial = partial or {"loss_sum": 0.0, "correct": 0, "images": 0, "seconds": 0.0}
    images = int(stats["images"])
    return {"loss_sum": partial["loss_sum"] + float(stats["train_loss"]) * images,
            "correct": partial["correct"] + int(round(float(stats["train_acc"]) * images)),
            "images": partial["images"] + images, "seconds": partial["seconds"] + float(stats["seconds"])}


def epoch_train_stats(parts: dict) -> dict:
    images = max(parts["images"], 1)
    return {"train_loss": parts["loss_sum"] / images, "train_acc": parts["correct"] / images,
            "train_images_per_s": parts["images"] / parts["seconds"] if parts["seconds"] > 0 else 0.0}


def per_epoch_fields(epoch: int, train_stats: dict, eval_stats: dict, lr: float, epoch_seconds: float) -> dict:
    return {
        "epoch": epoch,
        "train_loss": float(train_stats["train_loss"]),
        "train_acc": float(train_stats["train_acc"]),
        "val_loss": float(eval_stats["val_loss"]),
        "val_logloss": float(eval_stats["val_logloss"]),
        "val_acc": float(eval_stats["val_acc"]),
        "lr": float(lr),
        "epoch_seconds": float(epoch_seconds),
        "train_images_per_s": float(train_stats["train_images_per_s"]),
    }


def run_training(args: argparse.Namespace, paths: dict) -> None:
    """Train in this process; under torchrun (WORLD_SIZE > 1) as one rank of a DDP job."""
    context = distributed.setup(resolve_device(args.device))
    set_logging(context.is_main)
    try:
        train_model(args, paths, context)
        distributed.barrier(context)  # rank 0 has written every output
    finally:
        distributed.teardown(context)
        set_logging(True)


def train_model(args: argparse.Namespace, paths: dict, context: distributed.Context) -> None:
    started = time.monotonic()
    device = context.device
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    if context.is_main:
        sweep_leftovers([paths["model_dir"], paths["output_dir"]])
    amp_dtype, use_scaler = engine.select_precision(device)
    precision = str(amp_dtype).replace("torch.", "") if amp_dtype is not None else "float32"
    log(f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'}), "
        f"precision: {precision}, torch {torch.__version__}"
        + (f"; DDP: {context.world_size} processes ({context.backend}), global batch "
           f"{args.batch_size * context.world_size}" if context.enabled else ""))

    # ---- data
    split_bytes = sum(path.stat().st_size for path in dataset.find_split_files(paths["data_dir"], "train"))
    memory_mode = loader.choose_memory_mode(args.data_in_memory, split_bytes)
    streamed = memory_mode == "stream"
    train_data = loader.scan_split(paths["data_dir"], "train") if streamed else dataset.load_split(paths["data_dir"], "train")
    if train_data["labels"] is None:
        raise dataset.DatasetError(f"{paths['data_dir']}: the train split has no labels")
    test_data = load_optional_test_split(paths["data_dir"], streamed)
    class_names = train_data["class_names"]
    num_classes = len(class_names)
    stored_size = int(train_data["images"].shape[1])
    if test_data is not None:
        if test_data["class_names"] and test_data["class_names"] != class_names:
            raise dataset.DatasetError(f"{paths['data_dir']}: train and test pickles disagree on class_names: "
                                       f"{class_names} vs {test_data['class_names']}")
        if test_data["images"].shape[1:] != train_data["images"].shape[1:]:
            raise dataset.DatasetError(f"{paths['data_dir']}: train images are {train_data['images'].shape[1:3]} "
                                       f"but test images are {test_data['images'].shape[1:3]}; re-run preprocess.py")
    num_test_images = len(test_data["ids"]) if test_data is not None else 0
    input_size = args.image_size or stored_size
    resize_policy = str(train_data["info"].get("resize_policy", "squash"))
    labels = train_data["labels"]
    log(f"data: {len(labels)} train images, {num_test_images} test images, {num_classes} classes, "
        f"stored {stored_size} px, network input {input_size} px; images in memory: {memory_mode} "
        f"(train pickles {split_bytes / 2**20:.1f} MiB)")
    data_hash = data_fingerprint(train_data)

    # ---- split
    split_by = choose_split_by(args.split_by, train_data["sites"])
    is_val = split.make_split(labels, train_data["sites"], args.val_fraction, args.seed, split_by)
    train_index = np.flatnonzero(~is_val)
    val_index = np.flatnonzero(is_val)
    log(f"split by {split_by}: {len(train_index)} train / {len(val_index)} validation images")

    # ---- model, optimiser, schedule
    generator = seed_everything(args.seed, device)
    network = build_network(num_classes, args.weights).to(device)
    # DDP also on the CPU: its gradient buckets take the parameters' layout, which must match the
    # channels_last gradients that channels_last batches produce.
    if device.type == "cuda" or context.enabled:
        network = network.to(memory_format=torch.channels_last)
    optimizer = engine.build_optimizer(network, args.optimizer, args.learning_rate, args.weight_decay)
    # --batch-size is per process (as in torchvision's references): one step trains on
    # batch_size * world_size images, each rank its own slice.
    steps_per_epoch = loader.num_train_batches(len(train_index), args.batch_size * context.world_size)
    total_steps = steps_per_epoch * args.epochs
    warmup_steps = int(round(args.warmup_epochs * steps_per_epoch))
    scheduler = engine.build_scheduler(optimizer, total_steps, warmup_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    loss_fn = make_loss(labels[train_index], num_classes, args.class_weights, args.label_smoothing, device)
    augment = loader.GpuAugment(input_size)
    train_images = loader.place_images(train_data["images"], train_index, device, memory_mode)
    val_images = loader.place_images(train_data["images"], val_index, device, memory_mode)
    train_labels = torch.as_tensor(labels[train_index], device=device)
    val_labels = labels[val_index]

    fingerprint = {
        "dataset_sha256": data_hash, "num_classes": num_classes, "class_names": list(class_names),
        "stored_image_size": stored_size, "image_size": input_size, "epochs": args.epochs,
        "batch_size": args.batch_size, "learning_rate": args.learning_rate, "optimizer": args.optimizer,
        "weight_decay": args.weight_decay, "warmup_epochs": args.warmup_epochs,
        "label_smoothing": args.label_smoothing, "class_weights": args.class_weights,
        "weights": args.weights, "seed": args.seed, "val_fraction": args.val_fraction, "split_by": split_by,
    }
    if context.enabled:
        # Another process count draws other batches: its checkpoints cannot continue this run.
        fingerprint["world_size"] = context.world_size

    # ---- resume
    history: list[dict] = []
    best: dict | None = None
    best_state: dict | None = None
    best_val_probs: np.ndarray | None = None
    # start_epoch: epochs finished; start_step: batches of the next epoch already trained.
    start_epoch, start_step, global_step, early_stopped = 0, 0, 0, False
    partial_epoch = None  # running sums of an epoch interrupted by SIGTERM (see merge_epoch_parts)
    manager = None
    resumed_from = None
    if paths["checkpoint_dir"] is not None:
        manager = checkpoint_lib.CheckpointManager(paths["checkpoint_dir"], keep=2, log=log)
        # Rank 0 reads the checkpoint and sends it to every rank (other nodes may not see its disk).
        found = manager.load_latest(fingerprint, map_location="cpu") if context.is_main else None
        found = distributed.broadcast_from_main(context, found)
        if found is not None:
            state, resumed_from = found
            unwrap(network).load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            checkpoint_lib.restore_rng_state(state["rng"], generator)
            history = list(state["history"])
            best = state["best"]
            best_state = state["best_model"]
            best_val_probs = state["best_val_probs"].numpy() if state["best_val_probs"] is not None else None
            start_epoch, start_step = int(state["epoch"]), int(state["step_in_epoch"])
            global_step, early_stopped = int(state["step"]), bool(state["early_stopped"])
            partial_epoch = state["partial_epoch"]
            position = f"epoch {start_epoch + 1} step {start_step}" if start_step else f"end of epoch {start_epoch}"
            log(f"resuming from {resumed_from} ({position}, {len(history)} epochs of history)")
        else:
            log(f"no checkpoint in {paths['checkpoint_dir']}: starting fresh")

    if args.compile:
        network = torch.compile(network)
    # Evaluation runs the module itself: under DDP the ranks predict different numbers of batches,
    # and a DDP forward would wait for the others.
    eval_network = network
    if context.enabled:
        network = torch.nn.parallel.DistributedDataParallel(
            network, device_ids=[device.index] if device.type == "cuda" else None)
    stop_flag = StopFlag()
    stop_requested = make_stop_check(stop_flag, context)

    def save_checkpoint(epoch_done: int, step_in_epoch: int, epoch_start_rng: dict | None) -> None:
        if manager is None:
            return
        if not context.is_main:
            distributed.barrier(context)
            return
        state = {
            "model": unwrap(network).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            # Mid-epoch the batch order must be redrawn as it was at the start of the epoch.
            "rng": epoch_start_rng if epoch_start_rng is not None else checkpoint_lib.capture_rng_state(generator),
            "history": history, "best": best, "best_model": best_state,
            "best_val_probs": torch.from_numpy(best_val_probs) if best_val_probs is not None else None,
            "step_in_epoch": step_in_epoch, "early_stopped": early_stopped, "partial_epoch": partial_epoch,
        }
        path = manager.save(state, epoch_done, global_step, fingerprint)
        log(f"checkpoint saved: {path}")
        distributed.barrier(context)

    # ---- epochs
    stop_flag.install()
    try:
        epochs_without_improvement = history[-1]["epoch"] - best["epoch"] if history and best else 0
        for epoch_index in range(start_epoch, args.epochs):
            if early_stopped:
                break
            epoch = epoch_index + 1
            # After a mid-epoch resume the generator is back at this epoch's start, as saved.
            epoch_start_rng = checkpoint_lib.capture_rng_state(generator)
            tick = time.monotonic()
            network.train()
            try:
                train_stats = engine.train_one_epoch(
                    network, optimizer, scheduler, scaler, train_images, train_labels, args.batch_size, augment,
                    loss_fn, generator, amp_dtype, epoch, start_step=global_step, stop_requested=stop_requested,
                    progress=sys.stderr.isatty(), skip_batches=start_step, rank=context.rank,
                    world_size=context.world_size)
            except engine.NonFiniteLossError as exc:
                raise TrainingError(
                    f"non-finite loss at epoch {exc.epoch}, step {exc.step}: training stopped, no checkpoint or "
                    "model written from these weights; lower --learning-rate or check the data") from exc
            global_step += int(train_stats["steps"])
            partial_epoch = merge_epoch_parts(partial_epoch, train_stats)
            if train_stats["stopped_early"]:
                save_checkpoint(epoch_index, start_step + int(train_stats["steps"]), epoch_start_rng)
                saved = ("checkpoint saved, re-run with the same --checkpoint-dir to resume" if manager is not None
                         else "nothing saved: no --checkpoint-dir was given")
                raise TrainingInterrupted(f"stopped by SIGTERM in epoch {epoch} at step "
                                          f"{start_step + int(train_stats['steps'])} of {steps_per_epoch}; {saved}")
            train_stats = epoch_train_stats(partial_epoch)
            start_step, partial_epoch = 0, None
            network.eval()
            distributed.broadcast_buffers(unwrap(network), context)  # rank 0's BatchNorm statistics
            eval_stats = engine.evaluate(eval_network, val_images, val_labels, loss_fn, args.eval_batch_size,
                                         input_size, amp_dtype, tta=args.tta, rank=context.rank,
                                         world_size=context.world_size)
            lr = optimizer.param_groups[0]["lr"]
            record = per_epoch_fields(epoch, train_stats, eval_stats, lr, time.monotonic() - tick)
            matrix = metrics.confusion_matrix(val_labels, np.argmax(eval_stats["probs"], axis=1), num_classes)
            # Only in metrics.json: metrics.csv and the [METRICS] line keep their fixed EPOCH_FIELDS.
            record["per_class"] = metrics.per_class_report(matrix, class_names)
            history.append(record)
            improved = best is None or record["val_logloss"] < best["val_logloss"]
            if improved:
                best = {key: record[key] for key in ("epoch", "val_loss", "val_logloss", "val_acc", "per_class")}
                best["confusion_matrix"] = np.asarray(matrix).tolist()
                best_state = host_state_dict(unwrap(network))
                best_val_probs = np.asarray(eval_stats["probs"], dtype=np.float64)
                epochs_without_improvement = 0
            else:
                epochs_without_improvement += 1
            log(f"epoch {epoch}/{args.epochs}: train_loss {record['train_loss']:.4f} acc {record['train_acc']:.4f} | "
                f"val_loss {record['val_loss']:.4f} logloss {record['val_logloss']:.4f} acc {record['val_acc']:.4f} | "
                f"lr {lr:.2e} | {record['epoch_seconds']:.1f} s, {record['train_images_per_s']:.0f} img/s"
                + (" | best" if improved else ""))
            log("per-class F1: " + ", ".join(f"{entry['class']} {entry['f1']:.2f}" for entry in record["per_class"]))
            log(outputs.metrics_line(record))
            if args.patience and epochs_without_improvement >= args.patience:
                early_stopped = True
                log(f"early stopping: no better val_logloss for {args.patience} epochs (best: epoch {best['epoch']})")
            save_checkpoint(epoch, 0, None)
    finally:
        stop_flag.uninstall()

    if best is None:
        raise TrainingError("no epoch finished, nothing to save")
    # ---- final model and outputs (from the best epoch)
    unwrap(network).load_state_dict(best_state)
    network.eval()
    test_probs, test_info = None, {"skipped": f"no test_data.pkl in {paths['data_dir']}"}
    if test_data is not None:
        test_seconds = time.monotonic()
        test_images = loader.place_images(test_data["images"], None, device, memory_mode)
        test_probs = engine.predict_probs(eval_network, test_images, args.eval_batch_size, input_size, amp_dtype,
                                          tta=args.tta, rank=context.rank, world_size=context.world_size)
        test_info = {"tta": bool(args.tta), "seconds": time.monotonic() - test_seconds}
    prior = class_prior(labels, num_classes)
    preprocessing = {
        "image_size": input_size, "stored_image_size": stored_size, "resize_policy": resize_policy,
        "mean": list(loader.IMAGENET_MEAN), "std": list(loader.IMAGENET_STD), "channels": "RGB",
        "class_prior": prior.tolist(),
    }
    resolved = {
        **{key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()},
        **{key: (str(value) if value is not None else None) for key, value in paths.items()},
        "split_by": split_by, "image_size": input_size, "stored_image_size": stored_size,
        "resize_policy": resize_policy, "device": str(device), "precision": precision,
        "torch_version": torch.__version__, "python_version": platform.python_version(),
        "data_sha256": data_hash, "class_names": list(class_names), "num_train_images": int(len(train_index)),
        "num_val_images": int(len(val_index)), "num_test_images": num_test_images,
        "steps_per_epoch": steps_per_epoch, "warmup_steps": warmup_steps,
        "resumed_from": str(resumed_from) if resumed_from else None,
        "memory_mode": memory_mode, "world_size": context.world_size, "global_batch_size": args.batch_size * context.world_size,
    }
    if not context.is_main:
        return
    write_all_outputs(paths, history, best, best_state, best_val_probs, val_index, is_val, train_data,
                      test_data, test_probs, prior, class_names, preprocessing, resolved,
                      test_info)
    log(f"done in {time.monotonic() - started:.1f} s: best epoch {best['epoch']} "
        f"(val_logloss {best['val_logloss']:.4f}, val_acc {best['val_acc']:.4f}); model in {paths['model_dir']}, "
        f"outputs in {paths['output_dir']}")


def load_optional_test_split(data_dir: Path, streamed: bool = False) -> dict | None:
    """The test split (its images left on disk when ``streamed``), or None when preprocess wrote
    train data only (training goes on without test predictions)."""
    try:
        return loader.scan_split(data_dir, "test") if streamed else dataset.load_split(data_dir, "test")
    except FileNotFoundError:
        log(f"note: no test_data.pkl in {data_dir}: training without test predictions "
            "(test_predictions.csv is not written; use --predict-only on a folder with test data later)")
        return None


def sweep_leftovers(folders: list[Path]) -> None:
    """Temp files and staging folders left in the output folders by runs that were killed."""
    for folder in dict.fromkeys(folders):
        for path in fileio.sweep_stale(folder):
            log(f"removed {path} (left by a run that was killed)")


def write_test_predictions(path: Path, data_dir: Path, test_data: dict, test_probs: np.ndarray,
                           prior: np.ndarray, class_names: list[str]) -> dict:
    """Write test_predictions.csv to ``path`` (every test id, skipped ones filled with ``prior``);
    returns a summary."""
    skipped = reporting.read_skipped_test_ids(data_dir)
    written = set(test_data["ids"])
    skipped = [entry for entry in skipped if entry["id"] not in written]
    csv_rows = outputs.csv_rows_from_meta(test_data["meta"])
    order = outputs.submission_row_order(test_data["ids"], csv_rows, skipped)
    probs = outputs.assemble_test_predictions(test_data["ids"], test_probs, order, prior)
    outputs.write_probabilities(path, {"id": order}, probs, class_names)
    if skipped:
        log(f"warning: {len(skipped)} test image(s) skipped by preprocess got the training class prior: "
            + ", ".join(f"{entry['id']} ({entry['reason']})" for entry in skipped[:10])
            + (" ..." if len(skipped) > 10 else ""))
    return {"num_images": len(order), "num_predicted": len(test_data["ids"]),
            "filled_with_prior": [entry["id"] for entry in skipped],
            "row_order": "test_features.csv" if csv_rows is not None else "sorted ids"}


def write_all_outputs(paths: dict, history: list[dict], best: dict, best_state: dict, best_val_probs: np.ndarray,
                      val_index: np.ndarray, is_val: np.ndarray, train_data: dict, test_data: dict | None,
                      test_probs: np.ndarray | None, prior: np.ndarray, class_names: list[str], preprocessing: dict,
                      resolved: dict, test_info: dict) -> None:
    """Every output, rendered into staging folders first and published together only when all of
    them were written: a failure here leaves the previous run's files as they were."""
    model_dir, output_dir = paths["model_dir"], paths["output_dir"]
    model_dir.mkdir(parents=True, exist_ok=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    with outputs.StagedFiles() as stage:
        outputs.write_splits(stage.path(output_dir / "splits.csv"), train_data["ids"], train_data["sites"], is_val)
        val_labels = train_data["labels"][val_index]
        outputs.write_probabilities(
            stage.path(output_dir / "val_predictions.csv"),
            {"id": [train_data["ids"][i] for i in val_index], "site": [train_data["sites"][i] for i in val_index],
             "label": [class_names[int(k)] for k in val_labels]},
            best_val_probs, class_names)
        test_path = output_dir / "test_predictions.csv"
        if test_data is not None:
            test_summary = write_test_predictions(stage.path(test_path), paths["data_dir"], test_data, test_probs,
                                                  prior, class_names)
        else:
            # An earlier run's submission beside this run's model would be taken for this model's.
            stage.remove(test_path)
            test_summary = {}
        test_summary.update(test_info)
        outputs.write_metrics(stage.path(output_dir / "metrics.json"), stage.path(output_dir / "metrics.csv"),
                              history, best, test_summary)
        metrics.plot_training_curves(history, stage.path(output_dir / "training_curves.png"))
        metrics.plot_confusion_matrix(np.asarray(best["confusion_matrix"]), class_names,
                                      stage.path(output_dir / "confusion_matrix.png"))
        fileio.write_json(stage.path(model_dir / "config.json"), resolved)
        network = model_lib.build_model(len(class_names), "none")
        network.load_state_dict(best_state)
        hyperparameters = {key: resolved[key] for key in (
            "epochs", "batch_size", "learning_rate", "optimizer", "weight_decay", "warmup_epochs", "label_smoothing",
            "class_weights", "weights", "seed", "val_fraction", "split_by", "tta")}
        hyperparameters["best_epoch"] = best["epoch"]
        # model.pth staged (so published) last: its presence means the whole run succeeded.
        model_lib.save_model_artifact(stage.path(model_dir / MODEL_FILENAME), network, class_names, preprocessing,
                                      hyperparameters)
        for removed in stage.publish():
            log(f"removed {removed} (from an earlier run; this data has no test split)")
    if test_data is not None:
        log(f"test predictions: {test_summary['num_images']} rows -> {test_path}")


# --------------------------------------------------------------------------- predict only
def run_predict_only(args: argparse.Namespace, paths: dict) -> None:
    device = resolve_device(args.device)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    model_path = paths["model_dir"] / MODEL_FILENAME
    if not model_path.is_file():
        raise FileNotFoundError(f"--predict-only needs {model_path}; train first or point --model-dir at a trained model")
    network, artifact = model_lib.load_model_artifact(model_path, map_location=device)
    network.to(device).eval()
    class_names = list(artifact["class_names"])
    preprocessing = artifact["preprocessing"]
    test_data = dataset.load_split(paths["data_dir"], "test")
    stored_size = int(test_data["images"].shape[1])
    trained_size = int(preprocessing["stored_image_size"])
    problems = []
    if stored_size != trained_size:
        problems.append(f"images are stored at {stored_size} px but the model was trained on {trained_size} px images "
                        f"(re-run preprocess.py with --image-size {trained_size})")
    policy = test_data["info"].get("resize_policy")
    if policy is not None and policy != preprocessing.get("resize_policy", policy):
        problems.append(f"resize policy is {policy!r} but the model was trained with {preprocessing['resize_policy']!r}")
    if test_data["class_names"] and list(test_data["class_names"]) != class_names:
        problems.append(f"class names {test_data['class_names']} differ from the model's {class_names}")
    if problems:
        raise dataset.DatasetError(f"{paths['data_dir']} does not match {model_path}: " + "; ".join(problems))
    amp_dtype, _ = engine.select_precision(device)
    input_size = int(preprocessing["image_size"])
    images = loader.DeviceImages(test_data["images"], device)
    probs = engine.predict_probs(network, images, args.eval_batch_size, input_size, amp_dtype, tta=args.tta)
    prior = np.asarray(preprocessing.get("class_prior") or np.full(len(class_names), 1.0 / len(class_names)))
    test_path = paths["output_dir"] / "test_predictions.csv"
    summary = write_test_predictions(test_path, paths["data_dir"], test_data, probs, prior, class_names)
    log(f"test predictions: {summary['num_images']} rows -> {test_path}")


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        paths = resolve_paths(args)
        if args.predict_only:
            # Under torchrun the other ranks have nothing to do: one process writes the predictions.
            if distributed.ranks_from_env()[0] == 0:
                run_predict_only(args, paths)
        else:
            run_training(args, paths)
        return 0
    except TrainingInterrupted as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sagemaker.write_failure(str(exc))
        return SIGTERM_EXIT_CODE
    except Exception as exc:  # noqa: BLE001 - every failure must reach stderr and SageMaker's failure file
        expected = (dataset.DatasetError, FileNotFoundError, model_lib.WeightsError,
                    checkpoint_lib.CheckpointMismatchError, TrainingError, distributed.DistributedSetupError,
                    ValueError, OSError)
        if not isinstance(exc, expected):
            traceback.print_exc()
        reason = f"{type(exc).__name__}: {exc}"
        print(f"error: {reason}", file=sys.stderr, flush=True)
        sagemaker.write_failure(reason)
        return 1


if __name__ == "__main__":
    sys.exit(main())
