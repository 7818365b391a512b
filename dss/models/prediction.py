"""How a trained network predicts images in order, the same in training (validation, test) as in
--predict-only and hosting: ``Inference`` (batch size, network input size, precision, TTA, this
rank's share, normalisation), ``select_precision`` for a device, and the predictions: logits whose
softmax is the served probabilities, and the mean of an ensemble's members at a temperature.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dss import distributed
from dss.models import calibration
from dss.models import model as model_lib
from dss.models.loader import DeviceImages, Normalisation, eval_transform


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


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """Mixed-precision context for the forward pass; a no-op for fp32."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


@dataclass(frozen=True)
class Inference:
    """How to run a network over images in order: ``batch_size`` images per forward pass, resized
    to ``image_size`` px (the network input), autocast to ``amp_dtype`` (None: float32), with
    ``tta`` the mean over the image and its horizontal flip. ``world_size`` > 1 (DDP): each
    ``rank`` predicts its contiguous share and the shares are gathered, so every rank gets all rows
    (every rank must call; the model must then be the plain module, not the DDP wrapper: the ranks
    run different numbers of forward passes). ``normalisation``: the network's input statistics
    (None = ImageNet's; pass ``loader.Normalisation(*backbones.normalisation(arch))``)."""

    batch_size: int
    image_size: int
    amp_dtype: torch.dtype | None = None
    tta: bool = False
    rank: int = 0
    world_size: int = 1
    normalisation: Normalisation | None = None


def _logits_in_order(model: nn.Module, images: DeviceImages, how: Inference) -> torch.Tensor:
    """float32 logits on the device: (N, C), or (N, 2, C) with TTA (original, horizontal flip)."""
    sharded = how.world_size > 1 and len(images) >= how.world_size
    first, last = distributed.shard_bounds(len(images), how.rank, how.world_size) if sharded else (0, len(images))
    outputs = []
    with torch.inference_mode():
        for start in range(first, last, how.batch_size):
            inputs = eval_transform(images.slice(start, min(start + how.batch_size, last)), how.image_size,
                                    how.normalisation)
            with autocast(images.device, how.amp_dtype):
                logits = model(inputs).float()
                if how.tta:
                    logits = torch.stack([logits, model(inputs.flip(3)).float()], dim=1)
            outputs.append(logits)
        local = torch.cat(outputs)
        if sharded:
            return distributed.all_gather_rows(local, len(images), how.world_size)
    return local


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log of the predicted probabilities (N, C); with TTA the log of the mean of the two softmaxes."""
    if logits.ndim == 3:
        return torch.logsumexp(F.log_softmax(logits, dim=-1), dim=1) - math.log(logits.shape[1])
    return F.log_softmax(logits, dim=-1)


def eval_mode_logits(model: nn.Module, images: DeviceImages, how: Inference) -> torch.Tensor:
    """``_predict_logits`` with the model in eval mode; its previous mode is restored."""
    was_training = model.training
    model.eval()
    try:
        return _logits_in_order(model, images, how)
    finally:
        model.train(was_training)


def predict_probs(model: nn.Module, images: DeviceImages, how: Inference, temperature: float = 1.0) -> np.ndarray:
    """Softmax probabilities float64 (N, C), rows in image order, computed in batches with the
    model in eval mode (its previous mode is restored). ``temperature`` (T != 1): softmax of
    ``predict_logits`` / T, as ``calibration.apply_temperature`` (the run's fitted temperature)."""
    if len(images) == 0:
        raise ValueError("no images to predict")
    rows = log_probs(eval_mode_logits(model, images, how).double().cpu())
    if temperature != 1.0:
        rows = F.log_softmax(rows / float(temperature), dim=-1)
    return rows.exp().numpy()


def predict_logits(model: nn.Module, images: DeviceImages, how: Inference) -> np.ndarray:
    """float64 (N, C) logits whose softmax is exactly ``predict_probs``: the log-probabilities
    (the network's logits shifted by a per-row constant, which neither softmax nor a temperature
    sees), with TTA the log of the mean of the two flips' probabilities. Averaged probabilities,
    not averaged logits, keep TTA's prediction unchanged at temperature 1, so a temperature fitted
    on these rows (``dss.models.calibration``) calibrates exactly what is served."""
    if len(images) == 0:
        raise ValueError("no images to predict")
    return log_probs(eval_mode_logits(model, images, how).double().cpu()).numpy()


def predict_ensemble_probs(networks: list[nn.Module], images: DeviceImages, how: Inference,
                           temperature: float = 1.0) -> np.ndarray:
    """float64 (N, C): the mean over ``networks`` (an ensemble's members, or one network) of their
    probabilities at ``temperature``, ``calibration.ensemble_probs`` of their ``predict_logits``:
    the computation of a training run's test predictions, so predict-only and hosting match them."""
    return calibration.ensemble_probs(np.stack([predict_logits(network, images, how) for network in networks]),
                                      temperature)


# --------------------------------------------------------------------------- from a model artifact
@dataclass(frozen=True)
class PredictionSpec:
    """Everything a model artifact's networks need to predict as their training run did: the
    classes, the arch, the stored and network input sizes in px and the resize policy preprocess
    used, how many members are averaged, the fitted temperature, and ``inference`` (batch size,
    input size, precision, TTA, this rank's share, normalisation)."""

    arch: str
    class_names: list[str]
    stored_size: int
    input_size: int
    resize_policy: str
    members: int
    temperature: float
    inference: Inference

    @property
    def tta(self) -> bool:
        return self.inference.tta


def spec_from_artifact(artifact: dict, device: torch.device, batch_size: int, tta: bool | None = None,
                       rank: int = 0, world_size: int = 1) -> PredictionSpec:
    """The one place inference is configured, for training's test predictions, --predict-only and
    hosting alike. ``artifact``: model.pth's info (``dss.models.model.load_ensemble``) or, in a
    training run, the info of the artifact it will save (``dss.models.model.artifact_info``).
    ``tta`` None: the artifact's own (its temperature was fitted with it)."""
    preprocessing = artifact["preprocessing"]
    amp_dtype, _ = select_precision(device)
    chosen_tta = model_lib.artifact_tta(artifact) if tta is None else bool(tta)
    how = Inference(int(batch_size), int(preprocessing["image_size"]), amp_dtype, chosen_tta, rank, world_size,
                    model_lib.artifact_normalisation(artifact))
    return PredictionSpec(arch=str(artifact["arch"]), class_names=list(artifact["class_names"]),
                          stored_size=int(preprocessing["stored_image_size"]),
                          input_size=int(preprocessing["image_size"]),
                          resize_policy=str(preprocessing["resize_policy"]), members=int(artifact.get("members", 1)),
                          temperature=model_lib.artifact_temperature(artifact), inference=how)
