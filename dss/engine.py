"""The training loop, evaluation and batched prediction, written out (no framework).

Hot-loop rules: batches come from ``DeviceImages`` with a device-side permutation and are
augmented on the device; loss, accuracy and the non-finite check accumulate on the device
and are read back every ``sync_every`` steps (one host sync), not at every step.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dss import distributed, metrics
from dss.loader import DeviceImages, GpuAugment, eval_transform, num_train_batches

OPTIMIZERS = ("adamw", "adam", "sgd")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite. ``step`` is the global optimizer step
    (0-based, counted over the whole run) whose loss was first non-finite."""

    def __init__(self, step: int, epoch: int, message: str | None = None):
        self.step, self.epoch = int(step), int(epoch)
        super().__init__(message or (
            f"non-finite training loss at step {self.step} (epoch {self.epoch}); stopping without saving "
            f"these weights. Lower --learning-rate, or check the input data"))


def select_precision(device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, use GradScaler). bf16 on GPUs with native bf16
    (compute capability >= 8), fp16 + GradScaler on older GPUs, fp32 on the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None, False
    major, _ = torch.cuda.get_device_capability(device)
    if major >= 8:
        return torch.bfloat16, False
    return torch.float16, True


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


def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, scaler,
                    images: DeviceImages, labels: torch.Tensor, batch_size: int, augment: GpuAugment,
                    loss_fn: Callable, generator: torch.Generator, amp_dtype: torch.dtype | None, epoch: int,
                    start_step: int, stop_requested: Callable[[], bool] | None = None, progress: bool = True,
                    sync_every: int = 16, skip_batches: int = 0, rank: int = 0, world_size: int = 1) -> dict:
    """One pass over the training images (drop_last batches of a fresh device-side permutation;
    ``images`` is a ``DeviceImages`` or a streamed ``ShardedImages``).

    ``labels``: int64 (N,) on the device. ``scheduler`` is stepped after every optimizer step.
    ``stop_requested`` is polled after every step (e.g. a SIGTERM flag); when it returns True the
    epoch ends early with ``stopped_early=True``. Non-finite losses raise ``NonFiniteLossError``
    before this returns (checked every ``sync_every`` steps and at the end; the failing step is
    recorded on the device, so the number is exact).
    ``skip_batches``: batches already trained in this epoch before an interruption; with the
    generator state from the epoch's start, the remaining batches and augmentations are exactly
    those of an uninterrupted run. With ``world_size > 1`` (DDP) every rank draws the same
    permutation, takes its own slice of each global batch of ``batch_size * world_size``, and
    the returned numbers are summed over ranks.
    """
    device = labels.device
    model.train()
    use_scaler = scaler is not None and scaler.is_enabled()
    global_batch = batch_size * world_size
    total_batches = num_train_batches(len(images), global_batch)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = torch.zeros((), dtype=torch.int64, device=device)
    first_bad_step = torch.full((), -1, dtype=torch.int64, device=device)
    step = start_step
    steps_done = 0
    stopped_early = False
    started = time.perf_counter()
    bar = tqdm(total=total_batches, initial=skip_batches, desc=f"epoch {epoch}", leave=False, unit="batch",
               disable=not progress or not sys.stderr.isatty() or rank != 0)
    for batch_number, global_index in enumerate(images.train_batches(global_batch, generator)):
        draws = augment.draw(global_index.numel(), generator)
        if batch_number < skip_batches:
            continue
        own = slice(rank * batch_size, (rank + 1) * batch_size) if world_size > 1 else slice(None)
        index, draws = global_index[own], draws[own]
        inputs = augment.apply(images.gather(index), draws)
        targets = labels[index]
        with _autocast(device, amp_dtype):
            logits = model(inputs)
        loss = loss_fn(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        if use_scaler:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()

        detached = loss.detach()
        finite = torch.isfinite(detached)
        first_bad_step = torch.where(~finite & (first_bad_step < 0), torch.full_like(first_bad_step, step),
                                     first_bad_step)
        loss_sum += detached.double() * targets.numel()
        correct += (logits.detach().argmax(dim=1) == targets).sum()
        seen += targets.numel()
        step += 1
        steps_done += 1
        bar.update(1)
        if steps_done % sync_every == 0:
            _raise_if_non_finite(first_bad_step, step, epoch, world_size)
            if not bar.disable:
                bar.set_postfix(loss=f"{(loss_sum / seen).item():.4f}")
        if stop_requested is not None and stop_requested():
            stopped_early = True
            break
    bar.close()
    _raise_if_non_finite(first_bad_step, step, epoch, world_size)
    if world_size > 1:
        totals = torch.stack([loss_sum, correct.double(), seen.double()])
        torch.distributed.all_reduce(totals)
        loss_sum, correct, seen = totals[0], totals[1], totals[2]
    num_seen = int(seen.item())                 # the one routine host sync of the epoch
    seconds = time.perf_counter() - started
    return {
        "train_loss": float(loss_sum.item()) / max(num_seen, 1),
        "train_acc": float(correct.item()) / max(num_seen, 1),
        "images": num_seen,
        "seconds": seconds,
        "train_images_per_s": num_seen / seconds if seconds > 0 else 0.0,
        "steps": steps_done,
        "stopped_early": stopped_early,
        "lr": float(optimizer.param_groups[0]["lr"]),
    }


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """Mixed-precision context for the forward pass; a no-op for fp32."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


def _raise_if_non_finite(first_bad_step: torch.Tensor, step: int, epoch: int, world_size: int) -> None:
    bad = first_bad_step.clone()
    if world_size > 1:
        # Every rank must stop together; a rank without a bad loss of its own reports the current step.
        flag = (bad >= 0).to(torch.int64)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and bad.item() < 0:
            bad.fill_(step - 1)
    bad_step = int(bad.item())
    if bad_step >= 0:
        raise NonFiniteLossError(step=bad_step, epoch=epoch)


def _predict_logits(model: nn.Module, images: DeviceImages, batch_size: int, out_size: int,
                    amp_dtype: torch.dtype | None, tta: bool, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """float32 logits on the device: (N, C), or (N, 2, C) with TTA (original, horizontal flip).

    With ``world_size > 1`` each rank predicts its contiguous share of the images and the shares
    are gathered, so every rank returns all N rows in image order. ``model`` must then be the
    plain (not DDP-wrapped) module: the ranks run different numbers of forward passes."""
    sharded = world_size > 1 and len(images) >= world_size
    first, last = distributed.shard_bounds(len(images), rank, world_size) if sharded else (0, len(images))
    outputs = []
    device = images.device
    with torch.inference_mode():
        for start in range(first, last, batch_size):
            inputs = eval_transform(images.slice(start, min(start + batch_size, last)), out_size)
            with _autocast(device, amp_dtype):
                logits = model(inputs).float()
                if tta:
                    logits = torch.stack([logits, model(inputs.flip(3)).float()], dim=1)
            outputs.append(logits)
        local = torch.cat(outputs)
        if sharded:
            return distributed.all_gather_rows(local, len(images), world_size)
    return local


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log of the predicted probabilities (N, C); with TTA the log of the mean of the two softmaxes."""
    if logits.ndim == 3:
        return torch.logsumexp(F.log_softmax(logits, dim=-1), dim=1) - math.log(logits.shape[1])
    return F.log_softmax(logits, dim=-1)


def _eval_mode_logits(model: nn.Module, images: DeviceImages, batch_size: int, out_size: int,
                      amp_dtype: torch.dtype | None, tta: bool, rank: int, world_size: int) -> torch.Tensor:
    """``_predict_logits`` with the model in eval mode; its previous mode is restored."""
    was_training = model.training
    model.eval()
    try:
        return _predict_logits(model, images, batch_size, out_size, amp_dtype, tta, rank, world_size)
    finally:
        model.train(was_training)


def predict_probs(model: nn.Module, images: DeviceImages, batch_size: int, out_size: int,
                  amp_dtype: torch.dtype | None, tta: bool = False, rank: int = 0, world_size: int = 1
                  ) -> np.ndarray:
    """Softmax probabilities float64 (N, C), rows in image order, computed in large batches
    with the model in eval mode (its previous mode is restored). ``tta``: average with the
    horizontally flipped image. ``world_size > 1``: sharded over the ranks and gathered (every
    rank must call it and gets all rows)."""
    if len(images) == 0:
        raise ValueError("no images to predict")
    logits = _eval_mode_logits(model, images, batch_size, out_size, amp_dtype, tta, rank, world_size)
    return _log_probs(logits.double().cpu()).exp().numpy()


def evaluate(model: nn.Module, images: DeviceImages, labels: np.ndarray, loss_fn: Callable, batch_size: int,
             out_size: int, amp_dtype: torch.dtype | None, tta: bool = False, rank: int = 0,
             world_size: int = 1) -> dict:
    """Validation numbers: ``val_loss`` (``loss_fn``, the training objective, on the predicted
    log-probabilities), ``val_logloss`` (plain clipped multiclass log loss: the competition
    metric), ``val_acc``, and ``probs`` float64 (N, C). ``world_size > 1``: predictions sharded
    over the ranks and gathered, so every rank returns the same numbers for all N images."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(images),):
        raise ValueError(f"labels has shape {labels.shape}, expected ({len(images)},) to match the images")
    logits = _eval_mode_logits(model, images, batch_size, out_size, amp_dtype, tta, rank, world_size)
    log_probs = _log_probs(logits)
    targets = torch.from_numpy(labels).to(log_probs.device)
    with torch.inference_mode():
        # cross_entropy(log p) == cross_entropy(logits): log_softmax of log-probabilities is a no-op.
        val_loss = float(loss_fn(log_probs, targets).item())
    probs = _log_probs(logits.double().cpu()).exp().numpy()
    return {
        "val_loss": val_loss,
        "val_logloss": metrics.log_loss(probs, labels),
        "val_acc": metrics.accuracy(probs, labels),
        "probs": probs,
    }
