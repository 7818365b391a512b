"""The networks ``--arch`` accepts: torchvision classification models, each with its ImageNet
weights, its input normalisation and the name of the head that is replaced for our classes.

One table (``_BACKBONES``) says everything that differs between architectures; ``dss.models.model``
builds, loads and saves networks through it. Every entry reduces its input 32 times (five
stride-2 stages), so every one needs at least ``dss.cli.MIN_IMAGE_SIZE`` px, which both scripts check.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

DEFAULT_ARCH = "resnet18"


@dataclass(frozen=True)
class Backbone:
    """``weights``: the torchvision ImageNet weights as ``EnumClass.MEMBER`` (pinned, not DEFAULT, so
    a torchvision upgrade cannot change them). ``head``: module path of the final ``nn.Linear``;
    its tensors are the ones a weights file may skip when its class count differs."""

    name: str
    weights: str
    head: str


_BACKBONES = {spec.name: spec for spec in (
    Backbone("resnet18", "ResNet18_Weights.IMAGENET1K_V1", "fc"),
    Backbone("resnet34", "ResNet34_Weights.IMAGENET1K_V1", "fc"),
    # V2: torchvision's newer recipe, 80.9% top-1 vs 76.1% for V1, same input normalisation.
    Backbone("resnet50", "ResNet50_Weights.IMAGENET1K_V2", "fc"),
    Backbone("convnext_tiny", "ConvNeXt_Tiny_Weights.IMAGENET1K_V1", "classifier.2"),
    Backbone("efficientnet_b0", "EfficientNet_B0_Weights.IMAGENET1K_V1", "classifier.1"),
    Backbone("efficientnet_v2_s", "EfficientNet_V2_S_Weights.IMAGENET1K_V1", "classifier.1"),
)}
ARCHITECTURES = tuple(_BACKBONES)


def backbone(arch: str) -> Backbone:
    """The table entry of ``arch``; an unknown name is a ValueError listing the known ones."""
    try:
        return _BACKBONES[arch]
    except (KeyError, TypeError):
        raise ValueError(f"unknown architecture {arch!r}; --arch takes one of {', '.join(ARCHITECTURES)}") from None


def create(arch: str, num_classes: int) -> nn.Module:
    """``arch`` with random weights and a ``num_classes``-way head (torchvision's own initialisation)."""
    import torchvision.models

    backbone(arch)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)


def imagenet_weights(arch: str):
    """The torchvision weights enum member of ``arch`` (e.g. ``ResNet18_Weights.IMAGENET1K_V1``);
    nothing is downloaded until its ``get_state_dict`` is called."""
    import torchvision.models

    enum_name, member = backbone(arch).weights.split(".")
    return getattr(getattr(torchvision.models, enum_name), member)


def normalisation(arch: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per RGB channel on the 0..1 scale, from the ImageNet weights' own transforms
    (what the weights were trained with; also used with ``--weights none`` so both agree)."""
    transforms = imagenet_weights(arch).transforms()
    return tuple(float(v) for v in transforms.mean), tuple(float(v) for v in transforms.std)


def imagenet_input_size(arch: str) -> int:
    """The input size (px) the ImageNet weights were evaluated at (224; 384 for efficientnet_v2_s)."""
    return int(imagenet_weights(arch).transforms().crop_size[0])


def head_prefix(arch: str) -> str:
    """State-dict name prefix of the head's tensors, e.g. ``"fc."``."""
    return backbone(arch).head + "."
