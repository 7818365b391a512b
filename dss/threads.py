"""CPU threads of a training or prediction run: how many torch uses, and how idle ones wait.

How many: ``--num-threads N`` is used as given. Without it, the CPUs this process may use: its
affinity mask (``os.sched_getaffinity``: taskset, cpusets, ``docker --cpuset-cpus``, SLURM),
capped by a cgroup CPU quota (``docker --cpus``, Kubernetes CPU limits) and by torch's own
default (the machine's physical cores, or ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` when set, which
then decide alone). torch's default alone ignores the affinity mask and the quota, so a container
given 2 CPUs of a 64-core host would run 32 threads on them.

How idle threads wait: torch's OpenMP runtime (GNU libgomp in the Linux wheels) makes a thread
that finished its share of an operation spin (300,000 iterations, a few ms) before it sleeps. When
other processes keep the CPUs busy, the spinning thread holds a CPU that the thread it waits for,
or the other work, needs: on the 2-core VM, 2 threads trained at 32 images/s beside one busy
process per core (1 thread: 65) and at 59 beside one (1 thread: 103). ``limit_spin_wait`` (called
by dss_train.py before it imports torch) cuts the spin to ``SPIN_COUNT`` iterations (about 10 us):
88 and 87 images/s there, and the idle speed kept (2 threads: 180 against 182, medians of 6 and 3
rounds). Measured and not chosen: OMP_WAIT_POLICY=PASSIVE (no spin) lost 24% on the idle machine,
and a spin of 10,000 collapsed beside one busy process (52); docs/benchmarks.md#cpu-threads. An
``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` already in the environment wins.

Busy machines: without --num-threads the count also follows the CPUs that other processes leave
idle (``rebalance``, after the data loads and at every epoch's start): the CPUs allowed minus the
CPU time others used on them since the last check, at least 1, at most the default. Beside one
busy process per core on the 2-core VM, 2 threads trained at 85 images/s and 1 at 126: a run takes
1 there, and 2 on the idle machine (docs/benchmarks.md#cpu-threads). Results on a CPU depend on
the thread count: give --num-threads for the same numbers on every run.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from dss.cli import log

# libgomp spins this many iterations (~10 us) before an idle thread sleeps (its default: 300,000).
SPIN_COUNT = "1000"
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_STAT = Path("/proc/stat")
# Seconds of CPU accounting a rebalance needs before it trusts what others used (the first one
# waits for the rest: data loading may take less).
MIN_SAMPLE_S = 0.5


def limit_spin_wait(environ: dict | None = None) -> bool:
    """Set ``GOMP_SPINCOUNT`` (before torch loads libgomp; later it has no effect) unless the
    environment already says how OpenMP threads wait. Returns whether it set it."""
    environ = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return False
    environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return True


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs' worth of time per period this process's cgroup may use (cgroup v2 ``cpu.max``, else
    v1 ``cpu.cfs_quota_us``), or None when there is no quota or no readable cgroup file."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def allowed_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """The CPUs this process may run on (affinity mask), capped by a cgroup CPU quota (rounded up)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_limit(cgroup_root)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def default_threads(torch_default: int, environ: dict | None = None, cgroup_root: Path = CGROUP_ROOT
                    ) -> tuple[int, str]:
    """(thread count, why) when --num-threads is not given; ``torch_default``: torch's own count."""
    environ = os.environ if environ is None else environ
    named = [name for name in THREAD_ENV_VARS if environ.get(name)]
    if named:
        return torch_default, f"from {named[0]}={environ[named[0]]}"
    cpus = allowed_cpus(cgroup_root)
    return max(1, min(cpus, torch_default)), f"the CPUs this process may use: {cpus}"


def apply(requested: int | None) -> int:
    """Set torch's intra-op thread count: ``requested`` (--num-threads) as given, else the default.
    Returns the count (config.json records it) and logs it."""
    import torch  # here, not at import: dss_train.py imports this module before torch

    if requested:
        count, why = requested, "--num-threads"
    else:
        count, why = default_threads(torch.get_num_threads())
        why += "; set --num-threads to change"
    torch.set_num_threads(count)
    log.info(f"CPU threads: {count} ({why})")
    global _governor
    # A count the user chose (the flag, or OMP_NUM_THREADS/MKL_NUM_THREADS) is kept as chosen.
    chosen = requested or any(os.environ.get(name) for name in THREAD_ENV_VARS)
    _governor = None if chosen else _Governor(count, _affinity())
    return count


def _affinity() -> set[int]:
    return set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def busy_seconds(cpus: set[int], stat_path: Path = PROC_STAT) -> float | None:
    """CPU seconds the CPUs ``cpus`` have spent busy since boot (everything but idle and iowait, from
    /proc/stat's per-CPU lines), or None where there is no readable /proc/stat."""
    try:
        lines = stat_path.read_text().splitlines()
    except OSError:
        return None
    jiffies = 0
    for line in lines:
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            counts = [int(value) for value in values[:8]]  # user nice system idle iowait irq softirq steal
            jiffies += sum(counts) - counts[3] - counts[4]
    return jiffies / os.sysconf("SC_CLK_TCK")


class _Governor:
    """The default thread count (``ceiling``) lowered while other processes keep the CPUs busy."""

    def __init__(self, ceiling: int, cpus: set[int], stat_path: Path = PROC_STAT):
        self.ceiling, self.cpus, self.stat_path = ceiling, cpus, stat_path
        self.mark = self._sample()

    def _sample(self) -> tuple[float, float, float | None]:
        """(wall seconds, this process's CPU seconds, busy CPU seconds of ``cpus``)."""
        return time.monotonic(), time.process_time(), busy_seconds(self.cpus, self.stat_path)

    def rebalance(self, wait: bool) -> int:
        import torch

        if wait:  # the first check: let enough time pass to see what others use
            time.sleep(max(0.0, MIN_SAMPLE_S - (time.monotonic() - self.mark[0])))
        now = self._sample()
        (wall, own, busy), (wall_0, own_0, busy_0) = now, self.mark
        current = torch.get_num_threads()
        if busy is None or busy_0 is None or wall - wall_0 < MIN_SAMPLE_S:
            return current
        self.mark = now
        others = max(0.0, (busy - busy_0) - (own - own_0)) / (wall - wall_0)  # CPUs' worth busy with other work
        count = max(1, min(self.ceiling, round(len(self.cpus) - others)))
        if count != current:
            torch.set_num_threads(count)
            log.info(f"CPU threads: {count} (other processes kept {others:.1f} of {len(self.cpus)} CPUs busy; "
                     "--num-threads N fixes the count)")
        return count


_governor: _Governor | None = None  # set by ``apply`` when --num-threads was not given


def rebalance(wait: bool = False) -> int | None:
    """Without --num-threads (or OMP_NUM_THREADS): set torch's thread count to the CPUs other
    processes left idle since the last call (or since ``apply``), within 1..the default; ``wait``:
    sample at least ``MIN_SAMPLE_S`` first. Returns the count, None when the user fixed it."""
    return _governor.rebalance(wait) if _governor is not None else None
