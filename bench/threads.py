"""CPU threads benchmark: training images/s of dss_train.py with --num-threads 1, 2, all allowed
CPUs and the default, on an idle machine and on one kept (half) busy by CPU hogs. Prints a table.

    python bench/threads.py                                        # 64 px, 640 demo images, 3 rounds
    python bench/threads.py --num-train 96 --epochs 2 --rounds 1   # quick check that it works
    python bench/threads.py --save                                 # also bench/results/threads-<date>.md
    python bench/threads.py --wait OMP_WAIT_POLICY=PASSIVE --wait GOMP_SPINCOUNT=10000   # other ways to wait

Rows (the same pickles, --weights none, --batch-size 32, --warmup-epochs 0, CPU):
  --num-threads 1, 2 and N (N = the CPUs this process may use, ``os.sched_getaffinity``; counts
      that coincide are measured once); the default (no --num-threads; the count it resolved is read
      from config.json); and "before": what dss_train.py did before it chose its own default
      (torch's thread count, N here, with libgomp's spin-waiting: GOMP_SPINCOUNT=300000, libgomp's
      value when OMP_WAIT_POLICY is unset); with --wait NAME=VALUE, N threads with that variable set
      (other ways for idle OpenMP threads to wait, as dss_train.py's default could have chosen).
Columns: idle: nothing else runs (run the benchmark on a quiet machine); busy: one CPU hog (a
  Python ``while True: pass`` process) per allowed CPU runs beside training, started before each
  run and killed after it, as on a laptop or shared server busy with other work; half busy: one hog
  per two allowed CPUs.
images/s = the mean ``train_images_per_s`` (metrics.csv) of the epochs after the first (warm-up).
Every row is measured --rounds times, interleaved (one round runs each row once per column), and
the table shows medians: a shared VM's speed drifts by +-15% within minutes. The criterion of
issue 10: the default within 15% of the best of 1, 2 and N threads, idle and busy.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import scaling  # noqa: E402  (bench/scaling.py, beside this file)
from dss.demo.sample import write_demo_dataset  # noqa: E402

# Thread settings a user may have made in this shell; the runs must see dss_train.py's own choices.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
BEFORE_ENV = {"GOMP_SPINCOUNT": "300000"}  # libgomp's spin-wait when OMP_WAIT_POLICY is unset
CRITERION = 0.85  # the default's images/s over the best row's, at least


# Integer flags: default and help.
OPTIONS = {
    "--num-train": (640, "synthetic train images (3/4 train, 1/4 validation)"),
    "--image-size": (64, "stored and network size, px"),
    "--batch-size": (32, "training images per step"),
    "--epochs": (3, "training epochs per run (the first is warm-up)"),
    "--rounds": (3, "repeat every row this many times, interleaved; the table shows medians"),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, (default, text) in OPTIONS.items():
        parser.add_argument(flag, type=int, default=default, help=text)
    parser.add_argument("--wait", action="append", default=[], metavar="NAME=VALUE",
                        help="also measure N threads with this environment variable (repeatable)")
    parser.add_argument("--save", action="store_true", help="also write bench/results/threads-<date>.md")
    return parser.parse_args(argv)


def allowed_cpus() -> int:
    return len(os.sched_getaffinity(0))


def child_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SM_")) and k not in THREAD_ENV}
    env.update(PYTHONPATH=str(REPO_ROOT), **(extra or {}))
    return env


def run(command: list, what: str, env: dict | None = None) -> None:
    scaling.run(command, what, child_env(env))


@contextlib.contextmanager
def cpu_hogs(count: int):
    """``count`` busy processes beside the block (none for 0); killed, by their pids, when it ends."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
        for hog in hogs:
            hog.wait()


def train(pickles: Path, model_dir: Path, args, threads: int | None, env: dict | None) -> tuple[float, int]:
    """(mean train images/s over the epochs after the first, the thread count config.json records)."""
    extra = ["--num-threads", threads] if threads else []
    run([sys.executable, "dss_train.py", "--data-dir", pickles, "--model-dir", model_dir, "--epochs", args.epochs,
         "--batch-size", args.batch_size, "--weights", "none", "--device", "cpu", "--warmup-epochs", 0, *extra],
        f"training with --num-threads {threads or 'default'}", env)
    rates = pd.read_csv(model_dir / "metrics.csv")["train_images_per_s"]
    resolved = json.loads((model_dir / "config.json").read_text())["num_threads"]
    return float(rates.iloc[1:].mean() if len(rates) > 1 else rates.iloc[0]), resolved


def settings(cpus: int, waits: list[str]) -> list[tuple[str, int | None, dict | None]]:
    """(row name, --num-threads or None for the default, extra environment) per row; "before" last."""
    counts = sorted({1, 2, cpus})
    rows = [(f"--num-threads {n}" + (" (all)" if n == cpus else ""), n, None) for n in counts]
    rows += [(f"{cpus} threads, {wait}", cpus, dict([wait.split("=", 1)])) for wait in waits]
    return rows + [("default", None, None), (f"before: {cpus} threads, spin-waiting", cpus, BEFORE_ENV)]


def loads(cpus: int) -> list[tuple[str, int]]:
    """(column, CPU hogs beside training) per column."""
    return [("idle", 0), ("half busy", max(1, cpus // 2)), ("busy", cpus)]


def machine_info(args, cpus: int) -> list[str]:
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return [f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"{cpus} allowed (sched_getaffinity), load average {load} at start",
            f"torch {torch.__version__}, python {platform.python_version()}; {args.num_train} demo images, "
            f"{args.image_size} px, batch {args.batch_size}, {args.epochs} epochs (first = warm-up); "
            "hogs beside training: " + ", ".join(f"{load} {hogs}" for load, hogs in loads(cpus))]


def render(info: list[str], names: list[str], table: dict, resolved: dict, notes: list[str]) -> str:
    columns = list(resolved)
    lines = ["# CPU threads benchmark", ""] + [f"- {line}" for line in info] + [
        "", "| setting | " + " | ".join(f"{load} images/s" for load in columns) + " |",
        "|---|" + "---:|" * len(columns)]
    for name in names:
        label = name
        if name == "default":
            label += " (resolved: " + ", ".join(f"{load} {resolved[load]}" for load in columns) + ")"
        lines.append(f"| {label} | " + " | ".join(f"{table[(load, name)]:,.1f}" for load in columns) + " |")
    return "\n".join(lines + [""] + [f"- {note}" for note in notes]) + "\n"


def verdict(table: dict, names: list[str]) -> list[str]:
    """Per load: the default over the best of the explicit thread counts, against the criterion."""
    lines = []
    for load in dict.fromkeys(load for load, _ in table):
        explicit = {name: table[(load, name)] for name in names if name.startswith("--num-threads")}
        best = max(explicit, key=explicit.get)
        ratio = table[(load, "default")] / explicit[best]
        judged = f" ({'within' if ratio >= CRITERION else 'NOT within'} 15%)" if load in ("idle", "busy") else ""
        lines.append(f"{load}: default / best ({best}) = {ratio:.2f}{judged}; "
                     f"before / best = {table[(load, names[-1])] / explicit[best]:.2f}")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    cpus = allowed_cpus()
    info = machine_info(args, cpus)
    print("\n".join(info), flush=True)
    rows = settings(cpus, args.wait)
    names = [name for name, _, _ in rows]
    scratch = Path(tempfile.mkdtemp(prefix="bench-threads-"))
    measured: dict[tuple[str, str], list[float]] = {}
    resolved: dict[str, set] = {load: set() for load, _ in loads(cpus)}
    try:
        data = scratch / "data"
        write_demo_dataset(data, n_train=args.num_train, n_test=16, seed=0, scale=0.25)
        pickles = scratch / "pickles"
        run([sys.executable, "preprocess.py", "--input", data, "--output-dir", pickles, "--image-size",
             args.image_size, "--quiet"], "preprocess")
        for round_number in range(1, args.rounds + 1):
            this_round = []
            for load, hogs in loads(cpus):
                for name, threads, env in rows:
                    with cpu_hogs(hogs):
                        rate, count = train(pickles, scratch / "models", args, threads, env)
                    if name == "default":
                        resolved[load].add(count)
                    this_round.append(((load, name), rate))
            for key, rate in this_round:
                measured.setdefault(key, []).append(rate)
            print(f"round {round_number}/{args.rounds}: "
                  + "; ".join(f"{load} {name}: {rate:,.1f}" for (load, name), rate in this_round), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    table = {key: float(np.median(rates)) for key, rates in measured.items()}
    counts = {load: "/".join(str(n) for n in sorted(found)) for load, found in resolved.items()}
    notes = verdict(table, names) + [f"{args.rounds} round(s), medians; per round: " + "; ".join(
        f"{load} {name} {', '.join(f'{r:,.1f}' for r in rates)}" for (load, name), rates in measured.items())]
    scaling.publish(render(info, names, table, counts, notes), args.save, "threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
