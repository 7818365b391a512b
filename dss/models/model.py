"""The network (a torchvision backbone from ``dss.models.backbones`` with a new head), its starting
weights, and the model artifact.

The artifact (``model.pth``) is a plain-data dict saved with ``torch.save`` and always read
with ``torch.load(weights_only=True)``: no pickled classes, so loading a file cannot run code.
It carries the preprocessing next to the weights (as timm does), so inference can never
disagree with training about image size or normalisation.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from dss.models import backbones, loader
from dss import fileio
from dss.models.backbones import ARCHITECTURES, DEFAULT_ARCH

MODEL_FILENAME = "model.pth"  # the artifact's name in the model dir
ARTIFACT_FORMAT = "dss-model"
ARTIFACT_VERSION = 1
# build_model and load_model_artifact record the architecture on the network under this
# attribute, so save_model_artifact can store it without being told.
_ARCH_ATTRIBUTE = "dss_arch"
# Prefixes that torch.compile and DistributedDataParallel add to parameter names.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


class WeightsError(RuntimeError):
    """Starting weights could not be obtained or do not fit the network."""


class ModelArtifactError(ValueError):
    """A model artifact is unreadable, unsafe or not in the expected format."""


def weights_help(arch: str = DEFAULT_ARCH) -> str:
    """What to do instead of ``--weights imagenet`` when the download fails."""
    return (f"use --weights PATH with a local torchvision {arch} state dict (.pth), "
            "or --weights none to train from random initialisation")


def build_model(num_classes: int, weights: str, arch: str = DEFAULT_ARCH) -> nn.Module:
    """``arch`` (one of ``ARCHITECTURES``) with ``num_classes`` outputs. ``weights``: "imagenet"
    (the torchvision weights named in ``dss.models.backbones``, downloaded once to torchvision's cache
    with their hash checked), "none" (random initialisation), or a path to a local state dict (a
    torchvision ``.pth`` of the same arch or a ``model.pth`` artifact of this pipeline); a head
    with another class count is replaced."""
    model = backbones.create(arch, num_classes)
    setattr(model, _ARCH_ATTRIBUTE, arch)
    if weights == "none":
        return model
    if weights == "imagenet":
        state_dict = _download_imagenet_weights(arch)
        source = f"torchvision {backbones.backbone(arch).weights}"
    else:
        state_dict = _read_state_dict_file(weights, arch)
        source = str(weights)
    _load_backbone(model, state_dict, source, arch)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain network inside torch.compile (``_orig_mod``) and DDP (``module``) wrappers, nested
    in any order (a wrapper's only child has one of those names)."""
    while len(model._modules) == 1:
        inner = model._modules.get("_orig_mod", model._modules.get("module"))
        if inner is None:
            break
        model = inner
    return model


def model_arch(model: nn.Module) -> str:
    """The architecture ``build_model``/``load_model_artifact`` recorded on ``model`` (through
    torch.compile and DDP wrappers); ``DEFAULT_ARCH`` for a network built elsewhere."""
    return str(vars(unwrap(model)).get(_ARCH_ATTRIBUTE, DEFAULT_ARCH))


def _download_imagenet_weights(arch: str) -> dict:
    try:
        return backbones.imagenet_weights(arch).get_state_dict(progress=False, check_hash=True)
    except Exception as error:  # network, DNS, proxy, HTTP, hash mismatch, disk: all mean "no weights"
        raise WeightsError(
            f"could not download the ImageNet weights for {arch} ({type(error).__name__}: {error}); "
            f"{weights_help(arch)}") from error


def _read_state_dict_file(path: str | os.PathLike, arch: str = DEFAULT_ARCH) -> dict:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path} (--weights takes imagenet, none, or PATH to a .pth file)")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise WeightsError(f"cannot read weights file {path}: {type(error).__name__}: {error}") from error
    if isinstance(loaded, dict) and loaded.get("format") == ARTIFACT_FORMAT:
        trained_as = loaded.get("arch", DEFAULT_ARCH)
        if trained_as != arch:
            raise WeightsError(f"weights file {path} is a {trained_as} model artifact; train with --arch {trained_as} "
                               f"to start from it, or pick weights for {arch}")
        loaded = loaded.get("state_dict")
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise WeightsError(f"weights file {path} does not hold a state dict (a mapping of names to tensors)")
    return strip_wrapper_prefixes(loaded)


def strip_wrapper_prefixes(state_dict: dict) -> dict:
    """A copy of ``state_dict`` named as the plain module names it: the prefixes that
    torch.compile (``_orig_mod.``) and DistributedDataParallel (``module.``) add are removed,
    nested in any order."""
    plain = OrderedDict(state_dict)
    while True:
        names = list(plain)
        for prefix in _WRAPPER_PREFIXES:
            consume_prefix_in_state_dict_if_present(plain, prefix)
        if list(plain) == names:
            return plain


def _load_backbone(model: nn.Module, state_dict: dict, source: str, arch: str) -> None:
    """Copy every tensor of ``state_dict`` into ``model``; the head (e.g. fc.*) is kept from
    ``state_dict`` only when its shape fits. Anything else that does not match is an error."""
    own = model.state_dict()
    head = backbones.head_prefix(arch)
    head_skipped = False
    usable = {}
    for name, tensor in state_dict.items():
        if name.startswith(head) and name in own and tensor.shape != own[name].shape:
            head_skipped = True
            continue
        usable[name] = tensor
    shape_mismatches = [f"{name}: file {tuple(tensor.shape)} vs model {tuple(own[name].shape)}"
                        for name, tensor in usable.items() if name in own and tensor.shape != own[name].shape]
    unexpected = sorted(set(usable) - set(own))
    missing = sorted(name for name in set(own) - set(usable) if not (head_skipped and name.startswith(head)))
    problems = []
    if shape_mismatches:
        problems.append("shape mismatch: " + "; ".join(shape_mismatches[:5]))
    if missing:
        problems.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:5])})")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensors (e.g. {', '.join(unexpected[:5])})")
    if problems:
        raise WeightsError(f"weights from {source} do not fit a torchvision {arch}: {'; '.join(problems)}")
    model.load_state_dict(usable, strict=False)


def _plain(value, where: str):
    """Convert to data that ``torch.load(weights_only=True)`` accepts; refuse anything else."""
    if isinstance(value, np.generic):  # before float: np.float64 is a float subclass
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, dict):
        return {str(key): _plain(item, f"{where}.{key}") for key, item in value.items()}
    raise TypeError(f"{where} is a {type(value).__name__}; the model artifact holds only plain data")


def save_model_artifact(path: str | os.PathLike, model: nn.Module, class_names: list[str], preprocessing: dict,
                        hyperparameters: dict, arch: str | None = None, other_members: Sequence[dict] = ()) -> None:
    """Write the model artifact atomically. ``preprocessing``: image_size (network input),
    stored_image_size, resize_policy, mean, std. ``arch``: None = what ``model_arch(model)``
    finds. ``other_members``: the state dicts of an ensemble's other members (--folds K: K - 1 of
    them, same arch), stored as "other_members"; ``model`` is the first. Loadable with
    ``torch.load(weights_only=True)``."""
    arch = backbones.backbone(arch or model_arch(model)).name
    required = ("image_size", "stored_image_size", "resize_policy", "mean", "std")
    absent = [key for key in required if key not in preprocessing]
    if absent:
        raise ValueError(f"preprocessing is missing {', '.join(absent)}")
    state_dict = _cpu_state(model.state_dict())
    payload = {
        "format": ARTIFACT_FORMAT,
        "version": ARTIFACT_VERSION,
        "arch": arch,
        "state_dict": state_dict,
        "class_names": [str(name) for name in class_names],
        "preprocessing": _plain(preprocessing, "preprocessing"),
        "hyperparameters": _plain(hyperparameters, "hyperparameters"),
        "other_members": [_cpu_state(member) for member in other_members],
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    fileio.write_bytes(path, buffer.getvalue())


def _cpu_state(state_dict: dict) -> dict:
    return {name: tensor.detach().cpu().clone() for name, tensor in strip_wrapper_prefixes(state_dict).items()}


def artifact_normalisation(artifact: dict) -> loader.Normalisation:
    """The input mean/std an artifact's network was trained with (its preprocessing)."""
    preprocessing = artifact["preprocessing"]
    return loader.Normalisation(preprocessing["mean"], preprocessing["std"])


def artifact_tta(artifact: dict) -> bool:
    """Whether the training run averaged each image with its flip (``--tta``); False in artifacts
    written before TTA existed."""
    return bool(artifact["hyperparameters"].get("tta", False))


def artifact_info(arch: str, class_names: list[str], preprocessing: dict, hyperparameters: dict, members: int) -> dict:
    """What ``load_ensemble`` returns of an artifact, for one not saved yet (a training run predicts
    its test images before it writes model.pth)."""
    return {"format": ARTIFACT_FORMAT, "version": ARTIFACT_VERSION, "arch": arch,
            "class_names": [str(name) for name in class_names], "preprocessing": dict(preprocessing),
            "hyperparameters": dict(hyperparameters), "members": int(members)}


def artifact_temperature(artifact: dict) -> float:
    """The temperature the training run fitted (``--temperature-scaling``); 1.0 in artifacts without one."""
    return float(artifact["hyperparameters"].get("temperature", 1.0))


def _read_artifact(path: str | os.PathLike, map_location) -> dict:
    """The checked payload of a model artifact (``torch.load(weights_only=True)``)."""
    path = Path(path)
    if not path.is_file():
        raise ModelArtifactError(f"model file not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise ModelArtifactError(
            f"refusing to load {path}: it is not a plain-data model artifact or it is damaged "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from error
    if not isinstance(payload, dict) or payload.get("format") != ARTIFACT_FORMAT:
        raise ModelArtifactError(f"{path} is not a {ARTIFACT_FORMAT} artifact (was it written by dss_train.py?)")
    arch = payload.setdefault("arch", DEFAULT_ARCH)
    if payload.get("version") != ARTIFACT_VERSION or arch not in ARCHITECTURES:
        raise ModelArtifactError(f"{path}: unsupported artifact version {payload.get('version')!r} / "
                                 f"arch {arch!r} (expected {ARTIFACT_VERSION} / one of {', '.join(ARCHITECTURES)})")
    payload.setdefault("other_members", [])  # artifacts of one model, and those written before --folds
    for key, kind in (("state_dict", dict), ("class_names", list), ("preprocessing", dict),
                      ("hyperparameters", dict), ("other_members", list)):
        if not isinstance(payload.get(key), kind):
            raise ModelArtifactError(f"{path}: field {key!r} is missing or not a {kind.__name__}")
    class_names = payload["class_names"]
    if not class_names or not all(isinstance(name, str) for name in class_names):
        raise ModelArtifactError(f"{path}: field 'class_names' must be a non-empty list of strings")
    return payload


def _info(payload: dict) -> dict:
    """Everything in an artifact but the weights, with "members": how many networks it holds."""
    info = {key: value for key, value in payload.items() if key not in ("state_dict", "other_members")}
    info["members"] = 1 + len(payload["other_members"])
    return info


def load_model_artifact(path: str | os.PathLike, map_location="cpu") -> tuple[nn.Module, dict]:
    """Read a model artifact -> (its (first) network in eval mode, dict of everything but the
    weights: format, version, arch, class_names, preprocessing, hyperparameters, members). An
    artifact without an ``arch`` field is a resnet18 (the only network before ``--arch``).

    Always ``weights_only=True``, explicitly, so TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 in the
    environment cannot switch the unpickler back to one that runs code."""
    payload = _read_artifact(path, map_location)
    return _member(payload["state_dict"], payload["arch"], len(payload["class_names"]), str(path)), _info(payload)


def _member(state_dict, arch: str, num_classes: int, where: str) -> nn.Module:
    """A network of ``arch`` in eval mode holding ``state_dict`` (refused when it does not fit)."""
    if not isinstance(state_dict, dict):
        raise ModelArtifactError(f"{where}: a member's weights are not a state dict")
    model = backbones.create(arch, num_classes)
    setattr(model, _ARCH_ATTRIBUTE, arch)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise ModelArtifactError(f"{where}: weights do not fit {arch} with {num_classes} classes: {error}") from error
    return model.eval()


def load_ensemble(path: str | os.PathLike, map_location="cpu") -> tuple[list[nn.Module], dict]:
    """Read a model artifact -> (its K member networks in eval mode, the info of
    ``load_model_artifact``, with "members": K). One member for a run without --folds."""
    payload = _read_artifact(path, map_location)
    states = [payload["state_dict"], *payload["other_members"]]
    members = [_member(state, payload["arch"], len(payload["class_names"]), f"{path}: member {index + 1}")
               for index, state in enumerate(states)]
    return members, _info(payload)
