"""An exponential moving average (EMA) of a network's weights, updated after every optimizer step.

    ema = WeightEMA(network, decay=0.999)       # a frozen copy of the plain network, eval mode
    ...optimizer.step(); ema.update(network)    # every step (network may be compiled or DDP-wrapped)
    engine.evaluate(ema.module, ...)            # evaluate, predict and save the averaged weights

The average after step n is ``avg = d_n * avg + (1 - d_n) * weights`` with
``d_n = min(decay, (1 + n) / (10 + n))`` when ``warmup`` is on (n = updates so far, from 0): early
on the average follows the weights closely instead of being dominated by the random
initialisation, which matters for short runs (10 epochs of 10,000 images at batch 256 are only
390 steps, fewer than the 1,000-step memory of decay 0.999).

Buffers are averaged too, with the same decay: BatchNorm's running statistics describe the
activations of recent weights, so averaging them over the same horizon as the weights keeps the
statistics matched to the averaged network (copying the latest statistics would pair averaged
weights with the activations of only the newest ones). Integer buffers (BatchNorm's
``num_batches_tracked``) are copied. This is what timm's ModelEmaV3 does.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dss.models.model import strip_wrapper_prefixes, unwrap


class WeightEMA:
    """EMA of ``model``'s parameters and buffers, kept in ``self.module`` (a copy of the plain
    network, same device, dtype and memory format; eval mode; no gradients).

    ``decay`` in [0, 1): the share of the average kept per step (0 = the latest weights).
    ``updates``: optimizer steps averaged so far (what the warm-up counts; saved in checkpoints).
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup, self.updates = float(decay), bool(warmup), 0
        self.module = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next ``update`` uses."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold ``model``'s current weights into the average (call after each optimizer step)."""
        decay = self.current_decay()
        source = strip_wrapper_prefixes(model.state_dict())
        averages, latest = [], []
        for name, average in self.module.state_dict().items():
            if average.is_floating_point():
                averages.append(average)
                latest.append(source[name].to(average.dtype))
            else:
                average.copy_(source[name])
        if averages:
            # avg += (1 - decay) * (weights - avg), all tensors in one fused call.
            torch._foreach_lerp_(averages, latest, 1.0 - decay)
        self.updates += 1

    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (e.g. the network a checkpoint or artifact is made of)."""
        unwrap(model).load_state_dict(self.module.state_dict())

    def state_dict(self) -> dict:
        """Plain data for a checkpoint (loadable with ``torch.load(weights_only=True)``)."""
        weights = {name: tensor.detach().clone() for name, tensor in self.module.state_dict().items()}
        return {"decay": self.decay, "warmup": self.warmup, "updates": self.updates, "weights": weights}

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()``: the average and the step count (decay and warm-up come from
        the settings, which a resumed run checks through its checkpoint fingerprint)."""
        self.module.load_state_dict(state["weights"])
        self.updates = int(state["updates"])
