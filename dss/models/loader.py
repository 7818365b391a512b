"""Batches straight from device memory, augmented on the device.

The whole uint8 split goes to the device in one copy (``DeviceImages``), batches are drawn
with a device-side ``randperm`` and augmented with a few batched tensor ops (``GpuAugment``):
no DataLoader workers, no per-sample Python, no host round trip per batch. When the split
does not fit the free device memory it stays in pinned host memory and each batch is copied
asynchronously. The same code runs on a CPU (the "device" is then the host).

Shapes: images are stored as (N, H, W, 3) uint8, exactly as in the pickle, so loading is one
copy with no transpose. ``gather`` returns (B, 3, H, W) as a permuted view of the NHWC batch:
that is the channels_last memory layout, which is what the convolutions want anyway.

Every random draw comes from the ``torch.Generator`` passed in (it lives on the device), so a
run is reproducible for a seed.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale uses.
_GREY_WEIGHTS = (0.299, 0.587, 0.114)

# Keep this share of the free device memory for the model, activations and the allocator.
_RESIDENT_MEMORY_SHARE = 0.6


class DeviceImages:
    """A uint8 image split (N, H, W, 3) held where batches are cheap to gather.

    ``resident=None`` decides by size: on the device when it fits in 60% of the free device
    memory, else in pinned host memory (batches then copied with ``non_blocking=True``).
    On a CPU device the array is used in place (no copy).
    """

    def __init__(self, images: np.ndarray, device: torch.device, resident: bool | None = None):
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
            shape = getattr(images, "shape", None)
            dtype = getattr(images, "dtype", type(images).__name__)
            raise ValueError(f"images must be a uint8 array of shape (N, H, W, 3), got {dtype} {shape}")
        self.device = torch.device(device)
        self.height, self.width = int(images.shape[1]), int(images.shape[2])
        host = _as_tensor(images)
        if self.device.type == "cpu":
            self.resident = True
            self.storage = host
        else:
            if resident is None:
                resident = _fits_on_device(host.numel(), self.device)
            self.resident = bool(resident)
            # One host->device copy of the whole split, or one copy into pinned host memory.
            self.storage = host.to(self.device) if self.resident else host.pin_memory()

    def __len__(self) -> int:
        return int(self.storage.shape[0])

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """Images at ``index`` (LongTensor (B,), any device) as uint8 (B, 3, H, W) on the device,
        channels_last in memory."""
        if self.resident:
            batch = self.storage.index_select(0, index.to(self.storage.device))
        else:
            host_index = index.cpu()
            # Pinned staging buffer from torch's caching host allocator: it records the pending
            # copy, so the buffer is not reused before the asynchronous copy has finished.
            staging = torch.empty((host_index.numel(), self.height, self.width, 3), dtype=torch.uint8,
                                  pin_memory=True)
            torch.index_select(self.storage, 0, host_index, out=staging)
            batch = staging.to(self.device, non_blocking=True)
        return batch.permute(0, 3, 1, 2)

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        """Index batches of one epoch from a device-side permutation (see ``train_batch_indices``)."""
        return train_batch_indices(len(self), batch_size, generator, generator.device)

    def slice(self, start: int, stop: int) -> torch.Tensor:
        """Images ``start:stop`` in order (prediction), uint8 (B, 3, H, W) on the device."""
        if self.resident:
            batch = self.storage[start:stop]
        else:
            batch = self.storage[start:stop].to(self.device, non_blocking=True)
        return batch.permute(0, 3, 1, 2)


def _as_tensor(images: np.ndarray) -> torch.Tensor:
    images = np.ascontiguousarray(images)
    with warnings.catch_warnings():
        # Arrays loaded from a pickle may be read-only; we never write to them.
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(images)


def _fits_on_device(num_bytes: int, device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    free_bytes, _ = torch.cuda.mem_get_info(device)
    return num_bytes <= _RESIDENT_MEMORY_SHARE * free_bytes


def train_batch_indices(num_items: int, batch_size: int, generator: torch.Generator, device: torch.device,
                        drop_last: bool = True) -> Iterator[torch.Tensor]:
    """Shuffled index batches (LongTensor (B,) on ``device``) from one device-side ``randperm``.

    ``drop_last`` drops an incomplete final batch (stable shapes for torch.compile, no
    batch-of-one BatchNorm) unless it would be the only batch.
    """
    if num_items < 1 or batch_size < 1:
        raise ValueError(f"need num_items >= 1 and batch_size >= 1, got {num_items} and {batch_size}")
    order = torch.randperm(num_items, generator=generator, device=device)
    stop = num_items
    if drop_last and num_items >= batch_size:
        stop = num_items - num_items % batch_size
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]


def num_train_batches(num_items: int, batch_size: int, drop_last: bool = True) -> int:
    """How many batches ``train_batch_indices`` yields (for schedulers and progress bars)."""
    if drop_last and num_items >= batch_size:
        return num_items // batch_size
    return math.ceil(num_items / batch_size)


@dataclass(frozen=True)
class Normalisation:
    """Per-channel (R, G, B) ``mean`` and ``std`` on the 0..1 scale: what the network's weights were
    trained with (``dss.models.backbones.normalisation(arch)``; stored in model.pth's preprocessing).
    Lists are accepted and kept as tuples."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        mean, std = tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0.0:
            raise ValueError(f"normalisation needs 3 means and 3 positive stds, got {mean} and {std}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)


def _normalise(batch: torch.Tensor, normalisation: Normalisation | None = None) -> torch.Tensor:
    """float (B, 3, H, W) in 0..255 -> normalised (ImageNet statistics when None), channels_last."""
    normalisation = normalisation or Normalisation()
    mean = torch.tensor(normalisation.mean, device=batch.device).view(1, 3, 1, 1) * 255.0
    inv_std = 1.0 / (torch.tensor(normalisation.std, device=batch.device).view(1, 3, 1, 1) * 255.0)
    out = torch.empty_like(batch, memory_format=torch.channels_last)
    torch.mul(batch - mean, inv_std, out=out)
    return out


def resize_antialiased(images: torch.Tensor, out_size: int) -> torch.Tensor:
    """float (B, 3, H, W) in 0..255 -> (B, 3, out, out): bilinear with antialiasing (a triangle filter
    as wide as the downscale; plain bilinear when enlarging), unchanged at the same size. The one
    resampling of training (``GpuAugment``) and of evaluation and serving (``eval_transform``)."""
    if images.shape[-2:] == (out_size, out_size):
        return images
    return F.interpolate(images, size=(out_size, out_size), mode="bilinear", align_corners=False,
                         antialias=True).clamp_(0.0, 255.0)


def _crop_weights(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int,
                  flip: torch.Tensor) -> torch.Tensor:
    """Per-sample 1-D resampling matrices (B, out, in) of the crops [start, start + length) (source
    pixels, (B,) floats): ``resize_antialiased``'s filter (F.interpolate's antialiased bilinear, as
    PIL) laid over each crop, using the real pixels beyond a crop's edge and renormalised at the
    image's. Rows are reversed where ``flip`` (B,) bool, mirroring the crop."""
    scale = (length / out_size).view(-1, 1, 1)                        # source px per output px
    support = scale.clamp(min=1.0)                                    # triangle half-width, source px
    centre = start.view(-1, 1, 1) + scale * (torch.arange(out_size, device=start.device).view(1, -1, 1) + 0.5)
    pixel_centre = torch.arange(in_size, device=start.device).view(1, 1, -1) + 0.5
    weights = (1.0 - (pixel_centre - centre).abs() / support).clamp_(min=0.0)
    weights = weights / weights.sum(dim=2, keepdim=True)
    return torch.where(flip.view(-1, 1, 1), weights.flip(1), weights)


class GpuAugment:
    """Batched training augmentation: random resized crop (+ horizontal flip), random greyscale,
    brightness and contrast jitter, then normalisation (``normalisation``; None = ImageNet
    statistics). Input uint8 (B, 3, H, W); output float (B, 3, out, out), channels_last.

    Resampling is ``eval_transform``'s, so the network trains on the pixels it is served: without
    crops (scale and ratio (1, 1)) the batch goes through ``resize_antialiased`` itself, then the
    flips; with crops each crop is resampled by the same antialiased filter, as two batched matrix
    products (rows, then columns) of per-sample weights from ``_crop_weights``.

    ``scale`` is the range of the crop's area as a share of the image, ``ratio`` the range of
    its aspect (width/height), as in torchvision's RandomResizedCrop; ``brightness`` and
    ``contrast`` are the +- range of the multiplicative factors, as in ColorJitter.
    """

    # Columns of the per-sample random draw, all U(0, 1).
    NUM_DRAWS = 8

    # Crops keep at least 60% of the frame: the stored frame is the whole (squashed) 16:9 view and
    # animals are often at its edges, so torchvision's usual 8-35% crops often cut them out
    # (docs/benchmarks.md, "Training recipe defaults").
    def __init__(self, out_size: int, scale: tuple[float, float] = (0.6, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_p: float = 0.5, grey_p: float = 0.2,
                 brightness: float = 0.3, contrast: float = 0.3, normalisation: Normalisation | None = None):
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {scale}")
        if not 0.0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < low <= high, got {ratio}")
        self.out_size = int(out_size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.flip_p, self.grey_p = float(flip_p), float(grey_p)
        self.brightness, self.contrast = float(brightness), float(contrast)
        self.normalisation = normalisation or Normalisation()
        self.crops = self.scale != (1.0, 1.0) or self.log_ratio != (0.0, 0.0)

    def draw(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """All random numbers for one batch: U(0, 1) of shape (B, NUM_DRAWS) on the generator's device."""
        return torch.rand((batch_size, self.NUM_DRAWS), generator=generator, device=generator.device)

    def apply(self, batch: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """Augment uint8 (B, 3, H, W) with the draws of ``draw`` -> normalised float (B, 3, out, out)."""
        size = batch.shape[0]
        u_area, u_ratio, u_x, u_y, u_flip, u_grey, u_bright, u_contrast = draws.unbind(1)
        flip = u_flip < self.flip_p
        if self.crops:
            images = self._resampled_crops(batch.float(), u_area, u_ratio, u_x, u_y, flip)
        else:
            images = resize_antialiased(batch.float(), self.out_size)
            images = torch.where(flip.view(size, 1, 1, 1), images.flip(3), images)  # (B, 3, out, out), 0..255

        grey_weights = torch.tensor(_GREY_WEIGHTS, device=batch.device).view(1, 3, 1, 1)
        luma = (images * grey_weights).sum(dim=1, keepdim=True)          # (B, 1, out, out)
        make_grey = (u_grey < self.grey_p).view(size, 1, 1, 1)
        images = torch.where(make_grey, luma.expand_as(images), images)

        bright = (1.0 - self.brightness + 2.0 * self.brightness * u_bright).view(size, 1, 1, 1)
        contrast = (1.0 - self.contrast + 2.0 * self.contrast * u_contrast).view(size, 1, 1, 1)
        images = (images * bright).clamp_(0.0, 255.0)
        # Contrast blends with the mean grey level of each (brightened) image, as ColorJitter does.
        mean_luma = (images * grey_weights).sum(dim=1, keepdim=True).mean(dim=(2, 3), keepdim=True)
        images = ((images - mean_luma) * contrast + mean_luma).clamp_(0.0, 255.0)
        return _normalise(images, self.normalisation)

    def _resampled_crops(self, images: torch.Tensor, u_area, u_ratio, u_x, u_y, flip) -> torch.Tensor:
        """float (B, 3, H, W) -> the random crops resampled to (B, 3, out, out), 0..255."""
        height, width = images.shape[-2:]
        # Crop width/height as shares of the image side (area share * aspect, area share / aspect).
        area = self.scale[0] + (self.scale[1] - self.scale[0]) * u_area
        aspect = torch.exp(self.log_ratio[0] + (self.log_ratio[1] - self.log_ratio[0]) * u_ratio)
        crop_w = torch.sqrt(area * aspect).clamp(max=1.0)
        crop_h = torch.sqrt(area / aspect).clamp(max=1.0)
        # The crop's left/top edge in source pixels: anywhere that keeps it inside the image.
        left = u_x * (1.0 - crop_w) * width
        top = u_y * (1.0 - crop_h) * height
        rows = _crop_weights(top, crop_h * height, height, self.out_size, torch.zeros_like(flip))
        columns = _crop_weights(left, crop_w * width, width, self.out_size, flip)
        # (B, 1, out, H) @ (B, 3, H, W) @ (B, 1, W, out): float32 (apply runs outside autocast).
        return (rows.unsqueeze(1) @ images @ columns.unsqueeze(1).transpose(2, 3)).clamp_(0.0, 255.0)


def eval_transform(batch: torch.Tensor, out_size: int, normalisation: Normalisation | None = None) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> normalised float (B, 3, out, out), channels_last; resized (bilinear,
    antialiased) only when ``out_size`` differs from the stored size. ``normalisation``: None =
    ImageNet statistics."""
    return _normalise(resize_antialiased(batch.float(), out_size), normalisation)
