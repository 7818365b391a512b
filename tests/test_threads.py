"""dss.threads: the default CPU thread count (the CPUs this process may use) and the bounded
OpenMP spin-wait that dss_train.py sets before torch loads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dss import threads
from tests.conftest import REPO_ROOT, clean_env


def _cgroup(tmp_path, v2: str | None = None, v1: tuple[int, int] | None = None):
    """A fake /sys/fs/cgroup: cgroup v2's cpu.max, or v1's quota and period, or neither."""
    tmp_path.mkdir()
    if v2 is not None:
        (tmp_path / "cpu.max").write_text(v2 + "\n")
    if v1 is not None:
        (tmp_path / "cpu").mkdir()
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(f"{v1[0]}\n")
        (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(f"{v1[1]}\n")
    return tmp_path


def test_default_is_the_cpus_this_process_may_use(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    no_quota = _cgroup(tmp_path / "none")
    assert threads.default_threads(32, environ={}, cgroup_root=no_quota)[0] == 4  # taskset/cpuset: 4 of 32 cores
    assert threads.default_threads(2, environ={}, cgroup_root=no_quota)[0] == 2   # never more than torch's count
    # A cgroup quota (docker --cpus 1.5, a Kubernetes limit) caps it, rounded up; "max" is no quota.
    assert threads.default_threads(32, environ={}, cgroup_root=_cgroup(tmp_path / "v2", v2="150000 100000"))[0] == 2
    assert threads.default_threads(32, environ={}, cgroup_root=_cgroup(tmp_path / "max", v2="max 100000"))[0] == 4
    assert threads.default_threads(32, environ={}, cgroup_root=_cgroup(tmp_path / "v1", v1=(100000, 100000)))[0] == 1
    assert threads.default_threads(32, environ={}, cgroup_root=_cgroup(tmp_path / "v1-", v1=(-1, 100000)))[0] == 4
    count, why = threads.default_threads(32, environ={}, cgroup_root=no_quota)
    assert "the CPUs this process may use: 4" in why


def test_omp_num_threads_in_the_environment_decides_alone(tmp_path, monkeypatch):
    """torchrun sets OMP_NUM_THREADS=1 per process; a user may set it too: torch's count, which reads it, stays."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    count, why = threads.default_threads(8, environ={"OMP_NUM_THREADS": "8"}, cgroup_root=tmp_path)
    assert (count, why) == (8, "from OMP_NUM_THREADS=8")


def test_spin_wait_is_bounded_unless_the_environment_says_otherwise():
    environ = {}
    assert threads.limit_spin_wait(environ) and environ == {"GOMP_SPINCOUNT": threads.SPIN_COUNT}
    for name, value in (("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "300000")):
        environ = {name: value}
        assert not threads.limit_spin_wait(environ) and environ == {name: value}


# Two threads run a short parallel op, then this process does ~1 ms of serial Python: a worker thread
# that spins through the serial part burns a second CPU (CPU time ~2x wall time); one that sleeps
# after a short spin does not (~1.2x: the spin, and waking it for every op).
SPIN_PROBE = """
import time, sys
sys.path.insert(0, {root!r})
{setup}
import torch
torch.set_num_threads(2)
x = torch.randn(65_536)  # two of ATen's 32,768-element grains: one per thread
wall, cpu = time.perf_counter(), time.process_time()
for _ in range(300):
    torch.exp(x)  # a parallel region of a few tens of us
    total = sum(range(20000))
print((time.process_time() - cpu) / (time.perf_counter() - wall))
"""


def _cpu_per_wall(setup: str) -> float:
    env = {k: v for k, v in clean_env().items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    result = subprocess.run([sys.executable, "-c", SPIN_PROBE.format(root=str(REPO_ROOT), setup=setup)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return float(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs for 2 threads")
@pytest.mark.skipif(os.environ.get("DSS_TIMING_TESTS") != "1",
                    reason="a CPU-time probe that other processes on the machine can upset: make test-timing")
def test_dss_train_makes_idle_openmp_threads_sleep_before_torch_loads():
    """Importing dss_train.py (as running it does) sets the bound before torch reads it: the idle
    worker thread no longer burns a CPU that other processes (or the thread it waits for) need."""
    # torch's own default spins: ~2x, unless other work takes the second CPU. Best of two each, as a
    # process busy beside the probe can only make a spinning thread look idle, or a run look slow.
    if max(_cpu_per_wall("") for _ in range(2)) < 1.5:
        pytest.skip("the machine is too busy for the probe to tell a spinning thread from a sleeping one")
    assert min(_cpu_per_wall("import dss_train") for _ in range(2)) < 1.5  # ~1.2 on the idle 2-core VM


# --------------------------------------------------------------------------- busy machines
def _write_stat(path, busy_jiffies: list[int]) -> None:
    """A /proc/stat with one line per CPU: ``busy`` user jiffies, a fixed idle count."""
    lines = ["cpu  0 0 0 0 0 0 0 0 0 0"] + [f"cpu{n} {busy} 0 0 1000 0 0 0 0 0 0" for n, busy in enumerate(busy_jiffies)]
    path.write_text("\n".join(lines) + "\nintr 0\n")


@pytest.mark.parametrize("others_busy, expected", [(0.0, 2), (1.0, 1), (2.0, 1), (0.4, 2)])
def test_the_default_thread_count_follows_the_cpus_other_work_leaves_idle(tmp_path, others_busy, expected):
    """Beside one busy process per core, 1 thread trains 1.5x faster than 2 on the 2-core VM
    (85 vs 126 images/s): the governor takes the CPUs left idle since its last look."""
    import torch

    stat = tmp_path / "stat"
    _write_stat(stat, [0, 0])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        governor = threads._Governor(2, {0, 1}, stat)
        hz = os.sysconf("SC_CLK_TCK")
        # The next sample sees others_busy CPUs' worth of work over MIN_SAMPLE_S, spread over both CPUs.
        share = int(round(others_busy * threads.MIN_SAMPLE_S * hz / 2))
        _write_stat(stat, [share, share])
        assert governor.rebalance(wait=True) == expected
        assert torch.get_num_threads() == expected
    finally:
        torch.set_num_threads(before)


def test_busy_seconds_counts_only_the_allowed_cpus_and_not_idle_or_iowait(tmp_path):
    stat = tmp_path / "stat"
    hz = os.sysconf("SC_CLK_TCK")
    stat.write_text(f"cpu  9 9 9 9 9 9 9 9\ncpu0 {hz} 0 {hz} 500 500 0 0 0\ncpu1 {5 * hz} 0 0 0 0 0 0 0\n")
    assert threads.busy_seconds({0}, stat) == pytest.approx(2.0)
    assert threads.busy_seconds({0, 1}, stat) == pytest.approx(7.0)
    assert threads.busy_seconds({0}, tmp_path / "missing") is None


def test_an_explicit_thread_count_is_never_rebalanced():
    import torch

    before = torch.get_num_threads()
    try:
        threads.apply(1)
        assert threads.rebalance(wait=False) is None and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
