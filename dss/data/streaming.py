"""Images bigger than memory: a split's pixels left in preprocess's pickle shards and read one
shard at a time while training (``--data-in-memory stream``).

``scan_split`` reads every shard once to collect the ids, labels and sites and a sha256 of the
pixels, keeping no pixels; ``ShardedImages`` then serves batches with the ``DeviceImages``
interface (dss.models.loader), reading the next shard in a background thread while the current one
trains. That thread lives until ``close()``. ``choose_memory_mode`` decides between loading
the split whole and streaming it.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from dss.data import dataset

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
        """Stop the reader thread and drop the shards held (the object can be used again).
        Whoever places streamed images closes them (dss.train.training_data does, on leaving its ``with``)."""
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
    data = dataset.merge_shards(files, source=f"{data_dir} ({split})", keep_images=False)
    height, width, _ = data.pop("image_shape")
    # An empty shard (N = 0: its run got no image of this split) holds no rows to stream: left out.
    kept = [(path, np.arange(count)) for path, count in zip(files, data.pop("shard_sizes")) if count]
    data["images"] = ShardedImages([path for path, _ in kept], [rows for _, rows in kept], height, width)
    return data
