"""torch.distributed (DDP) plumbing for dss_train.py under ``torchrun`` (and SageMaker's
``torch_distributed`` distribution, which launches torchrun).

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for every process; the
process group is initialised from them (``init_method="env://"``). No variables, or WORLD_SIZE=1,
means a plain single-process run: nothing is initialised and every helper here is a no-op.

NCCL on GPUs (one GPU per process: ``cuda:LOCAL_RANK``), gloo on the CPU.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.distributed as dist

# How long a collective may wait for a slow rank before the run fails (loading a large
# dataset on one node while the others wait at the first barrier is the slow case).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


class DistributedSetupError(RuntimeError):
    """The torchrun environment is inconsistent (a variable missing or out of range)."""


@dataclass(frozen=True)
class Context:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its node,
    the ``device`` it computes on, and the process-group ``backend`` (None when single-process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that prints metrics and writes files."""
        return self.rank == 0


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedSetupError(f"environment variable {name}={value!r} is not an integer") from None


def ranks_from_env(env: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's variables; (0, 1, 0) when they are unset."""
    env = os.environ if env is None else env
    world_size = _env_int(env, "WORLD_SIZE", 1)
    rank = _env_int(env, "RANK", 0)
    local_rank = _env_int(env, "LOCAL_RANK", 0)
    if world_size < 1:
        raise DistributedSetupError(f"WORLD_SIZE must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise DistributedSetupError(f"RANK={rank} is outside 0..WORLD_SIZE-1 (WORLD_SIZE={world_size})")
    if local_rank < 0:
        raise DistributedSetupError(f"LOCAL_RANK must be >= 0, got {local_rank}")
    return rank, world_size, local_rank


def setup(device: torch.device, env: Mapping[str, str] | None = None) -> Context:
    """Join the process group torchrun describes in ``env`` (default ``os.environ``).

    ``device`` is the resolved single-process choice ("cpu" or "cuda"); with several processes
    on a GPU machine each one takes ``cuda:LOCAL_RANK``. Single process: returns a disabled
    Context on ``device`` and initialises nothing.
    """
    rank, world_size, local_rank = ranks_from_env(env)
    device = torch.device(device)
    if world_size == 1:
        return Context(device=device)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise DistributedSetupError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} "
                                        "GPU(s): start at most one process per GPU (torchrun --nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, store=_attempt_store(rank, world_size, env), rank=rank,
                            world_size=world_size, timeout=COLLECTIVE_TIMEOUT,
                            **({"device_id": device} if backend == "nccl" else {}))
    return Context(rank=rank, world_size=world_size, local_rank=local_rank, device=device, backend=backend)


def _attempt_store(rank: int, world_size: int, env: Mapping[str, str] | None) -> dist.Store:
    """The key-value store of torchrun's rendezvous (MASTER_ADDR:MASTER_PORT), with a key prefix
    for this restart attempt. torchrun keeps its store when it restarts the workers after a
    failure; without the prefix the restarted ranks read the dead workers' gloo addresses and
    hang or fail while connecting (seen with torch 2.14)."""
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT))
    attempt = (os.environ if env is None else env).get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"dss/attempt-{attempt}", store)


def teardown(context: Context) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: Context) -> None:
    if context.enabled:
        dist.barrier()


def broadcast_from_main(context: Context, value: Any) -> Any:
    """Rank 0's ``value`` (any picklable object, e.g. a checkpoint dict of CPU tensors) on every rank."""
    if not context.enabled:
        return value
    box = [value if context.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(context: Context, flag: bool) -> bool:
    """True on every rank when ``flag`` is True on at least one (a collective: all ranks must call it)."""
    if not context.enabled:
        return bool(flag)
    value = torch.tensor([1 if flag else 0], dtype=torch.int64, device=_collective_device(context))
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def broadcast_buffers(module: torch.nn.Module, context: Context) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts them at the start of each training forward, so after the last step every
    rank holds its own update; evaluating and saving need the same numbers everywhere."""
    if not context.enabled:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=0)


def shard_bounds(num_items: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous [start, stop) share of ``num_items`` for ``rank``; sizes differ by at most one."""
    return rank * num_items // world_size, (rank + 1) * num_items // world_size


def all_gather_rows(local: torch.Tensor, num_items: int, world_size: int) -> torch.Tensor:
    """Concatenate every rank's ``shard_bounds`` rows of a (rows, ...) tensor, in rank order.

    Ranks' shares differ by up to one row, so each is padded to the largest before all_gather."""
    sizes = [stop - start for start, stop in (shard_bounds(num_items, r, world_size) for r in range(world_size))]
    padded = local.new_zeros((max(sizes), *local.shape[1:]))
    padded[:local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


def _collective_device(context: Context) -> torch.device:
    # NCCL only moves CUDA tensors; gloo moves CPU tensors.
    return context.device if context.backend == "nccl" else torch.device("cpu")


def resolve_device(choice: str) -> torch.device:
    """--device: 'auto' is the GPU when torch sees one, else the CPU; 'cuda' without a GPU is an error."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise DistributedSetupError("--device cuda was given but torch sees no GPU; use --device auto or cpu")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)
