"""The training loop and evaluation, written out (no framework).

``TrainLoop`` holds what every step needs (network, optimizer, schedule, scaler, loss,
augmentation, generator, batch size); ``train_one_epoch`` runs one pass with it. ``evaluate``
scores a network on the validation images with ``dss.models.prediction`` (how prediction runs).

Hot-loop rules: batches come from ``DeviceImages`` with a device-side permutation and are
augmented on the device; loss, accuracy and the non-finite check accumulate on the device
and are read back every ``sync_every`` steps (one host sync), not at every step.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dss.models import calibration, prediction
from dss import metrics
from dss.models.loader import DeviceImages, GpuAugment, num_train_batches

if TYPE_CHECKING:
    from dss.train.ema import WeightEMA

OPTIMIZERS = ("adamw", "adam", "sgd")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite. ``step`` is the global optimizer step
    (0-based, counted over the whole run) whose loss was first non-finite."""

    def __init__(self, step: int, epoch: int, message: str | None = None):
        self.step, self.epoch = int(step), int(epoch)
        super().__init__(message or (
            f"non-finite training loss at step {self.step} (epoch {self.epoch}); stopping without saving "
            f"these weights. Lower --learning-rate, or check the input data"))


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay, none on biases and BatchNorm), Adam (the prototype's;
    L2 ``weight_decay`` on every parameter) or SGD (momentum 0.9, Nesterov, no decay on biases/BN)."""
    params = [param for param in model.parameters() if param.requires_grad]
    on_cuda = bool(params) and all(param.is_cuda for param in params)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, **({"fused": True} if on_cuda else {}))
    decay = [param for param in params if param.ndim > 1]
    no_decay = [param for param in params if param.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, **({"fused": True} if on_cuda else {}))
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step learning-rate factor: linear warmup over ``warmup_steps`` (from 1/warmup to 1),
    then cosine decay to 0 at ``total_steps``."""
    total_steps = max(int(total_steps), 1)
    warmup_steps = max(min(int(warmup_steps), total_steps), 0)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def class_weights_balanced(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """float32 (num_classes,) weights n_samples / (n_present_classes * count), as sklearn's
    "balanced"; a class absent from ``labels`` gets weight 1."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    if counts.size > num_classes:
        raise ValueError(f"labels hold class index {counts.size - 1}, but num_classes is {num_classes}")
    present = counts > 0
    weights = np.ones(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


@dataclass
class TrainLoop:
    """What a training epoch needs besides the images and labels; fixed for a run.

    ``model`` is what the step calls (possibly torch.compile'd and/or DDP-wrapped); ``scheduler``
    is stepped after every optimizer step; ``scaler`` is a GradScaler for fp16 or None;
    ``generator`` (on the device) draws the batch order and the augmentation. ``batch_size`` is
    per process: under DDP (``world_size`` > 1) one step trains on ``batch_size * world_size``
    images, each rank its own slice. Loss, accuracy and the non-finite check are read back to the
    host every ``sync_every`` steps (one sync each). ``ema``: a ``dss.train.ema.WeightEMA`` of the
    network, updated after every optimizer step, or None.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    scaler: torch.amp.GradScaler | None
    loss_fn: Callable
    augment: GpuAugment
    generator: torch.Generator
    batch_size: int
    amp_dtype: torch.dtype | None = None
    rank: int = 0
    world_size: int = 1
    sync_every: int = 16
    progress: bool = True
    ema: WeightEMA | None = None


class _EpochTotals:
    """Running sums of an epoch kept on the device (float64 loss x images, int64 counts) and the
    first global step whose loss was not finite (-1: none), so the loop never waits for the host."""

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.seen = torch.zeros((), dtype=torch.int64, device=device)
        self.first_bad_step = torch.full((), -1, dtype=torch.int64, device=device)

    def add(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, step: int) -> None:
        detached = loss.detach()
        finite = torch.isfinite(detached)
        self.first_bad_step = torch.where(~finite & (self.first_bad_step < 0),
                                          torch.full_like(self.first_bad_step, step), self.first_bad_step)
        self.loss_sum += detached.double() * targets.numel()
        self.correct += (logits.detach().argmax(dim=1) == targets).sum()
        self.seen += targets.numel()

    def raise_if_non_finite(self, step: int, epoch: int, world_size: int) -> None:
        bad = self.first_bad_step.clone()
        if world_size > 1:
            # Every rank must stop together; a rank without a bad loss of its own reports the current step.
            flag = (bad >= 0).to(torch.int64)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            if flag.item() and bad.item() < 0:
                bad.fill_(step - 1)
        bad_step = int(bad.item())
        if bad_step >= 0:
            raise NonFiniteLossError(step=bad_step, epoch=epoch)

    def summed(self, world_size: int) -> tuple[float, float, int]:
        """(loss x images, correct, images) over every rank: the one routine host sync of the epoch."""
        loss_sum, correct, seen = self.loss_sum, self.correct, self.seen
        if world_size > 1:
            totals = torch.stack([loss_sum, correct.double(), seen.double()])
            torch.distributed.all_reduce(totals)
            loss_sum, correct, seen = totals[0], totals[1], totals[2]
        num_seen = int(seen.item())
        return float(loss_sum.item()), float(correct.item()), num_seen


def train_step(loop: TrainLoop, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on augmented float (B, 3, S, S) inputs; returns (logits (B, C), loss)."""
    with prediction.autocast(targets.device, loop.amp_dtype):
        logits = loop.model(inputs)
    loss = loop.loss_fn(logits.float(), targets)
    loop.optimizer.zero_grad(set_to_none=True)
    if loop.scaler is not None and loop.scaler.is_enabled():
        loop.scaler.scale(loss).backward()
        loop.scaler.step(loop.optimizer)
        loop.scaler.update()
    else:
        loss.backward()
        loop.optimizer.step()
    if loop.scheduler is not None:
        loop.scheduler.step()
    if loop.ema is not None:
        loop.ema.update(loop.model)
    return logits, loss


def train_one_epoch(loop: TrainLoop, images: DeviceImages, labels: torch.Tensor, epoch: int, start_step: int,
                    skip_batches: int = 0, stop_requested: Callable[[], bool] | None = None) -> dict:
    """One pass over the training images (drop_last batches of a fresh device-side permutation;
    ``images`` is a ``DeviceImages`` or a streamed ``ShardedImages``).

    ``labels``: int64 (N,) on the device. ``start_step``: the global optimizer step (0-based, over
    the whole run) of this call's first step. ``stop_requested`` is polled after every step (e.g. a
    SIGTERM flag); when it returns True the epoch ends early with ``stopped_early=True``.
    Non-finite losses raise ``NonFiniteLossError`` before this returns (checked every
    ``loop.sync_every`` steps and at the end; the failing step is recorded on the device, so the
    number is exact). ``skip_batches``: batches already trained in this epoch before an
    interruption; with the generator state from the epoch's start, the remaining batches and
    augmentations are exactly those of an uninterrupted run. Under DDP every rank draws the same
    permutation and the returned numbers are summed over ranks.
    """
    loop.model.train()
    global_batch = loop.batch_size * loop.world_size
    own = slice(loop.rank * loop.batch_size, (loop.rank + 1) * loop.batch_size) if loop.world_size > 1 else slice(None)
    totals = _EpochTotals(labels.device)
    step, steps_done, stopped_early = start_step, 0, False
    started = time.perf_counter()
    bar = tqdm(total=num_train_batches(len(images), global_batch), initial=skip_batches, desc=f"epoch {epoch}",
               leave=False, unit="batch", disable=not loop.progress or not sys.stderr.isatty() or loop.rank != 0)
    for batch_number, global_index in enumerate(images.train_batches(global_batch, loop.generator)):
        # Skipped batches draw their augmentation too, so the generator advances as in an uninterrupted epoch.
        draws = loop.augment.draw(global_index.numel(), loop.generator)
        if batch_number < skip_batches:
            continue
        index, draws = global_index[own], draws[own]
        targets = labels[index]
        logits, loss = train_step(loop, loop.augment.apply(images.gather(index), draws), targets)
        totals.add(loss, logits, targets, step)
        step += 1
        steps_done += 1
        bar.update(1)
        if steps_done % loop.sync_every == 0:
            totals.raise_if_non_finite(step, epoch, loop.world_size)
            if not bar.disable:
                bar.set_postfix(loss=f"{(totals.loss_sum / totals.seen).item():.4f}")
        if stop_requested is not None and stop_requested():
            stopped_early = True
            break
    bar.close()
    totals.raise_if_non_finite(step, epoch, loop.world_size)
    loss_sum, correct, num_seen = totals.summed(loop.world_size)
    seconds = time.perf_counter() - started
    return {
        "train_loss": loss_sum / max(num_seen, 1),
        "train_acc": correct / max(num_seen, 1),
        "images": num_seen,
        "seconds": seconds,
        "train_images_per_s": num_seen / seconds if seconds > 0 else 0.0,
        "steps": steps_done,
        "stopped_early": stopped_early,
        "lr": float(loop.optimizer.param_groups[0]["lr"]),
    }


def evaluate(model: nn.Module, images: DeviceImages, labels: np.ndarray, loss_fn: Callable, how: prediction.Inference) -> dict:
    """Validation numbers: ``val_loss`` (``loss_fn``, the training objective, on the predicted
    log-probabilities), ``val_logloss`` (plain clipped multiclass log loss: the competition
    metric), ``val_logloss_calibrated`` (the log loss after a temperature fitted on these rows),
    ``val_acc``, ``probs`` float64 (N, C) and ``logits`` float64 (N, C) (as
    ``predict_logits``: softmax(logits) == probs, for fitting a temperature). Under DDP every rank
    returns the same numbers for all N images."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(images),):
        raise ValueError(f"labels has shape {labels.shape}, expected ({len(images)},) to match the images")
    logits = prediction.eval_mode_logits(model, images, how)
    log_probs = prediction.log_probs(logits)
    targets = torch.from_numpy(labels).to(log_probs.device)
    with torch.inference_mode():
        # cross_entropy(log p) == cross_entropy(logits): log_softmax of log-probabilities is a no-op.
        val_loss = float(loss_fn(log_probs, targets).item())
    host_log_probs = prediction.log_probs(logits.double().cpu()).numpy()       # float64 (N, C), as predict_logits
    probs = np.exp(host_log_probs)
    return {
        "val_loss": val_loss,
        "val_logloss": metrics.log_loss(probs, labels),
        "val_logloss_calibrated": calibration.calibrated_log_loss(host_log_probs, labels),
        "val_acc": metrics.accuracy(probs, labels),
        "probs": probs,
        "logits": host_log_probs,
    }
