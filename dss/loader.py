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

import hashlib
import math
import os
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from dss import dataset

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

    @property
    def nbytes(self) -> int:
        return self.storage.numel()

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


def _normalise(batch: torch.Tensor) -> torch.Tensor:
    """float (B, 3, H, W) in 0..255 -> ImageNet-normalised, channels_last."""
    mean = torch.tensor(IMAGENET_MEAN, device=batch.device).view(1, 3, 1, 1) * 255.0
    inv_std = 1.0 / (torch.tensor(IMAGENET_STD, device=batch.device).view(1, 3, 1, 1) * 255.0)
    out = torch.empty_like(batch, memory_format=torch.channels_last)
    torch.mul(batch - mean, inv_std, out=out)
    return out


class GpuAugment:
    """Batched training augmentation: random resized crop (+ horizontal flip) as one
    ``affine_grid``/``grid_sample``, random greyscale, brightness and contrast jitter,
    then ImageNet normalisation. Input uint8 (B, 3, H, W); output float (B, 3, out, out),
    channels_last.

    ``scale`` is the range of the crop's area as a share of the image, ``ratio`` the range of
    its aspect (width/height), as in torchvision's RandomResizedCrop; ``brightness`` and
    ``contrast`` are the +- range of the multiplicative factors, as in ColorJitter.
    """

    # Columns of the per-sample random draw, all U(0, 1).
    NUM_DRAWS = 8

    # Crops keep at least 60% of the frame: the stored frame is the whole (squashed) 16:9 view and
    # animals are often at its edges, so torchvision's usual 8-35% crops often cut them out. On the
    # demo data (bench/train.py --compare-recipes, 6 epochs, batch 32) the best val log loss went
    # from 0.966 with (0.35, 1) to 0.842 with (0.6, 1) together with a 0.5-epoch warm-up.
    def __init__(self, out_size: int, scale: tuple[float, float] = (0.6, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_p: float = 0.5, grey_p: float = 0.2,
                 brightness: float = 0.3, contrast: float = 0.3):
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {scale}")
        if not 0.0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < low <= high, got {ratio}")
        self.out_size = int(out_size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.flip_p, self.grey_p = float(flip_p), float(grey_p)
        self.brightness, self.contrast = float(brightness), float(contrast)

    def draw(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """All random numbers for one batch: U(0, 1) of shape (B, NUM_DRAWS) on the generator's device."""
        return torch.rand((batch_size, self.NUM_DRAWS), generator=generator, device=generator.device)

    def __call__(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(batch, self.draw(batch.shape[0], generator))

    def apply(self, batch: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """Augment uint8 (B, 3, H, W) with the draws of ``draw`` -> normalised float (B, 3, out, out)."""
        size = batch.shape[0]
        u_area, u_ratio, u_x, u_y, u_flip, u_grey, u_bright, u_contrast = draws.unbind(1)

        # Crop width/height as shares of the image side (area share * aspect, area share / aspect).
        area = self.scale[0] + (self.scale[1] - self.scale[0]) * u_area
        aspect = torch.exp(self.log_ratio[0] + (self.log_ratio[1] - self.log_ratio[0]) * u_ratio)
        crop_w = torch.sqrt(area * aspect).clamp(max=1.0)
        crop_h = torch.sqrt(area / aspect).clamp(max=1.0)
        # Crop centre in grid coordinates [-1, 1]; the crop stays inside the image.
        centre_x = (2.0 * u_x - 1.0) * (1.0 - crop_w)
        centre_y = (2.0 * u_y - 1.0) * (1.0 - crop_h)
        flip = torch.where(u_flip < self.flip_p, -1.0, 1.0)
        theta = torch.zeros((size, 2, 3), device=batch.device)
        theta[:, 0, 0] = crop_w * flip
        theta[:, 0, 2] = centre_x
        theta[:, 1, 1] = crop_h
        theta[:, 1, 2] = centre_y
        grid = F.affine_grid(theta, [size, 3, self.out_size, self.out_size], align_corners=False)
        images = F.grid_sample(batch.float(), grid, mode="bilinear", padding_mode="reflection",
                               align_corners=False)                     # (B, 3, out, out), 0..255

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
        return _normalise(images)


def eval_transform(batch: torch.Tensor, out_size: int) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> normalised float (B, 3, out, out), channels_last; resized (bilinear,
    antialiased) only when ``out_size`` differs from the stored size."""
    images = batch.float()
    if images.shape[-2:] != (out_size, out_size):
        images = F.interpolate(images, size=(out_size, out_size), mode="bilinear", align_corners=False,
                               antialias=True).clamp_(0.0, 255.0)
    return _normalise(images)


# --------------------------------------------------------------------------- streaming from shards
# Where the trainer's automatic choice switches to streaming: a split is loaded whole when its
# pickles take at most this share of the host memory that is available now (the rest is left
# for the model, the optimizer and a copy during loading).
HOST_MEMORY_SHARE = 0.5
MEMORY_MODES = ("auto", "device", "host", "stream")


def available_host_bytes() -> int:
    """Host memory available to new allocations now (Linux MemAvailable; else free pages)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def choose_memory_mode(requested: str, split_bytes: int, host_bytes: int | None = None) -> str:
    """``requested`` unless 'auto': then 'stream' when the split's pickles (``split_bytes`` on
    disk, about their size in memory) exceed HOST_MEMORY_SHARE of the available host memory,
    else 'device' (``DeviceImages`` then keeps it in pinned host memory if the GPU is too small)."""
    if requested not in MEMORY_MODES:
        raise ValueError(f"memory mode must be one of {', '.join(MEMORY_MODES)}, got {requested!r}")
    if requested != "auto":
        return requested
    host_bytes = available_host_bytes() if host_bytes is None else host_bytes
    return "stream" if split_bytes > HOST_MEMORY_SHARE * host_bytes else "device"


class ShardedImages:
    """A split's images left on disk in preprocess's pickle shards, read one shard at a time.

    Rows are ``rows[k]`` (indices into shard file ``k``) for every shard, concatenated in shard
    order: row ``offsets[k] + j`` is row ``rows[k][j]`` of file ``k``. Before use on a device
    (``to_device``) only the shape is known. In use, at most two shards are on the device (the
    current one and the previous, whose last rows may share a batch with the next) and one more
    is read and pinned by a background thread while the current one trains (double buffering).

    Training batches (``train_batches``) shuffle the shard order and permute the rows inside each
    shard, both with the run's generator; ``gather`` and ``slice`` return uint8 (B, 3, H, W) like
    ``DeviceImages``, so the same augmentation and evaluation code runs on them.
    """

    resident = False

    def __init__(self, files: list[Path], rows: list[np.ndarray], height: int, width: int,
                 device: torch.device | None = None):
        if len(files) != len(rows):
            raise ValueError(f"{len(files)} shard files but {len(rows)} row lists")
        self.files = [Path(path) for path in files]
        self.rows = [np.asarray(r, dtype=np.int64) for r in rows]
        self.offsets = np.concatenate([[0], np.cumsum([len(r) for r in self.rows])]).astype(np.int64)
        self.height, self.width = int(height), int(width)
        self.device = torch.device(device) if device is not None else None
        self._on_device: dict[int, torch.Tensor] = {}      # shard -> uint8 (n, H, W, 3) on the device
        self._pending: dict[int, Future] = {}
        self._reader: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self), self.height, self.width, 3)

    @property
    def nbytes(self) -> int:
        return len(self) * self.height * self.width * 3

    def subset(self, index: np.ndarray) -> "ShardedImages":
        """The rows at sorted global ``index`` (e.g. the training part of a split), same order."""
        index = np.asarray(index, dtype=np.int64)
        if index.size and (np.any(np.diff(index) <= 0) or index[0] < 0 or index[-1] >= len(self)):
            raise ValueError("subset index must be strictly increasing and within the split")
        shard_of = np.searchsorted(self.offsets, index, side="right") - 1
        rows = [self.rows[k][index[shard_of == k] - self.offsets[k]] for k in range(len(self.files))]
        keep = [k for k in range(len(self.files)) if len(rows[k])]
        return ShardedImages([self.files[k] for k in keep], [rows[k] for k in keep], self.height, self.width,
                             self.device)

    def to_device(self, device: torch.device) -> "ShardedImages":
        return ShardedImages(self.files, self.rows, self.height, self.width, device)

    # ---- reading shards
    def _read(self, shard: int) -> torch.Tensor:
        """Shard ``shard``'s rows as a uint8 (n, H, W, 3) host tensor, pinned when the device is a GPU."""
        data = dataset.load_file(self.files[shard])
        images = data["images"]
        if images.shape[1:3] != (self.height, self.width):
            raise dataset.DatasetError(f"{self.files[shard]}: images are {images.shape[1:3]}, "
                                       f"the other shards' are {(self.height, self.width)}")
        host = torch.from_numpy(np.ascontiguousarray(images[self.rows[shard]]))
        return host.pin_memory() if self.device is not None and self.device.type == "cuda" else host

    def _prefetch(self, shard: int) -> None:
        if shard in self._on_device or shard in self._pending:
            return
        if self._reader is None:
            self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-reader")
        self._pending[shard] = self._reader.submit(self._read, shard)

    def _shard(self, shard: int) -> torch.Tensor:
        if self.device is None:
            raise RuntimeError("ShardedImages.to_device(device) first")
        if shard not in self._on_device:
            self._prefetch(shard)
            host = self._pending.pop(shard).result()
            while len(self._on_device) >= 2:                      # keep the newest two shards
                self._on_device.pop(next(iter(self._on_device)))
            self._on_device[shard] = host if self.device.type == "cpu" else host.to(self.device, non_blocking=True)
        return self._on_device[shard]

    def close(self) -> None:
        """Stop the reader thread and drop the shards held (the object can be used again)."""
        if self._reader is not None:
            self._reader.shutdown(wait=True, cancel_futures=True)
            self._reader = None
        self._pending.clear()
        self._on_device.clear()

    # ---- the DeviceImages interface
    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        """Index batches (LongTensor (B,) of global rows): shards in a random order, rows permuted
        inside each shard; a shard's last partial batch is completed with the next shard's first
        rows, and the epoch's final partial batch is dropped, so an epoch has
        ``num_train_batches(len(self), batch_size)`` batches, as with ``DeviceImages``."""
        if len(self) < 1 or batch_size < 1:
            raise ValueError(f"need at least one image and batch_size >= 1, got {len(self)} and {batch_size}")
        device = generator.device
        order = torch.randperm(len(self.files), generator=generator, device=device).tolist()
        pending = torch.empty(0, dtype=torch.int64, device=device)
        self._prefetch(order[0])
        for position, shard in enumerate(order):
            if position + 1 < len(order):
                self._prefetch(order[position + 1])    # read the next shard while this one trains
            count = len(self.rows[shard])
            within = torch.randperm(count, generator=generator, device=device) + int(self.offsets[shard])
            pending = torch.cat([pending, within])
            full = pending.numel() - pending.numel() % batch_size
            for start in range(0, full, batch_size):
                yield pending[start:start + batch_size]
            pending = pending[full:]
        if len(self) < batch_size:
            yield pending                              # the only batch, as train_batch_indices does

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        host_index = index.cpu().numpy()
        shard_of = np.searchsorted(self.offsets, host_index, side="right") - 1
        batch = torch.empty((len(host_index), self.height, self.width, 3), dtype=torch.uint8, device=self.device)
        for shard in np.unique(shard_of):
            positions = np.flatnonzero(shard_of == shard)
            local = torch.from_numpy(host_index[positions] - self.offsets[shard]).to(self.device)
            batch[torch.from_numpy(positions).to(self.device)] = self._shard(int(shard)).index_select(0, local)
        return batch.permute(0, 3, 1, 2)

    def slice(self, start: int, stop: int) -> torch.Tensor:
        stop = min(stop, len(self))
        parts = []
        first = int(np.searchsorted(self.offsets, start, side="right") - 1)
        for shard in range(first, len(self.files)):
            low, high = max(start, int(self.offsets[shard])), min(stop, int(self.offsets[shard + 1]))
            if low >= high:
                break
            if shard + 1 < len(self.files):
                self._prefetch(shard + 1)
            parts.append(self._shard(shard)[low - int(self.offsets[shard]):high - int(self.offsets[shard])])
        batch = parts[0] if len(parts) == 1 else torch.cat(parts)
        return batch.permute(0, 3, 1, 2)


def scan_split(data_dir: str | os.PathLike, split: str) -> dict:
    """A split's metadata without keeping its images: the dict of ``dataset.load_split`` with
    ``images`` a ``ShardedImages`` over all rows (not yet on a device) and ``images_sha256`` the
    hash of all pixels in row order. Each shard is loaded and validated once, one at a time."""
    files = dataset.find_split_files(data_dir, split)
    digest = hashlib.sha256()
    merged: dict = {"ids": [], "sites": [], "labels": [], "meta": {}}
    counts, shape, first = [], None, None
    for path in files:
        part = dataset.load_file(path)
        images = part["images"]
        if first is None:
            first, shape = part, images.shape[1:3]
        elif part["class_names"] != first["class_names"] or images.shape[1:3] != shape:
            raise dataset.DatasetError(f"{path}: class names or image size differ from {files[0]}")
        elif (part["labels"] is None) != (first["labels"] is None):
            raise dataset.DatasetError(f"{path}: some shards of '{split}' have labels and others do not")
        digest.update(memoryview(np.ascontiguousarray(images).reshape(-1)))
        counts.append(len(part["ids"]))
        merged["ids"] += list(part["ids"])
        merged["sites"] += list(part["sites"])
        if part["labels"] is not None:
            merged["labels"].append(np.asarray(part["labels"], dtype=np.int64))
        for key, value in part["meta"].items():
            merged["meta"].setdefault(key, []).extend(list(value))
        del part, images
    return {
        "images": ShardedImages(files, [np.arange(n) for n in counts], shape[0], shape[1]),
        "ids": merged["ids"], "sites": merged["sites"],
        "labels": np.concatenate(merged["labels"]) if first["labels"] is not None else None,
        "class_names": first["class_names"], "meta": merged["meta"],
        "info": dict(first["info"], num_shards=len(files)), "images_sha256": digest.hexdigest(),
    }


def place_images(images, index: np.ndarray | None, device: torch.device, mode: str):
    """The rows ``index`` (all when None) of a split's images, ready to batch on ``device``:
    ``ShardedImages`` for streamed data, else a ``DeviceImages`` on the device ('device',
    falling back to pinned host memory when it does not fit) or in pinned host memory ('host')."""
    if isinstance(images, ShardedImages):
        chosen = images if index is None else images.subset(index)
        return chosen.to_device(device)
    chosen = images if index is None else images[index]
    return DeviceImages(chosen, device, resident=False if mode == "host" else None)
