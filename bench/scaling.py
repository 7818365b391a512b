"""Scale-out benchmark: training images/s with 1 vs N processes (DDP under torchrun), streamed vs
resident data, and preprocess images/s vs --workers. Real subprocess runs of the two scripts on
synthetic demo data (dss.demo.sample); prints a table.

    python bench/scaling.py                                    # CPU: 1 vs 2 processes, 32 px
    python bench/scaling.py --num-train 64 --epochs 2 --workers 1 2   # quick check that it works
    python bench/scaling.py --device cuda --processes 1 8 --image-size 224 --num-train 4000 --save

Rows:
  train, P processes: dss_train.py (P = 1) or ``torch.distributed.run --nproc_per_node P`` on the
      same pickles, --batch-size per process (so the global batch grows with P), --num-threads 1 per
      process on the CPU; images/s = the mean ``train_images_per_s`` (metrics.csv) of the epochs after
      the first (warm-up), counted over all ranks.
  train, resident / stream: one process with --data-in-memory device and stream on the same
      --num-shards shards.
  preprocess, W workers: preprocess.py --workers W on the same JPEGs; images/s from its summary
      (the run itself, interpreter start-up excluded).
Every row is measured --rounds times, interleaved (one round runs each row once), and the table
shows medians plus the ratios 2 vs 1 workers, P vs 1 processes and streamed vs resident: a shared
VM's speed drifts by +-15% within minutes, and interleaving lets every row see the same drift.
With --save the table also goes to bench/results/scaling-<date>.md (scaling-cuda-<date>.md with
--device cuda). Multi-GPU rows need a machine with several GPUs (otherwise they are not measured).
"""

from __future__ import annotations

import argparse
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

from dss import fileio  # noqa: E402
from dss.demo.sample import write_demo_dataset  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="training device")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2],
                        help="training process counts to compare (GPUs per node on cuda)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="preprocess --workers to compare")
    parser.add_argument("--num-train", type=int, default=320, help="synthetic train images")
    parser.add_argument("--image-size", type=int, default=32, help="stored and network size, px")
    parser.add_argument("--scale", type=float, default=0.25,
                        help="JPEG size as a share of the demo's 960x540-like frames (preprocess decode cost)")
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs per row (the first is warm-up)")
    parser.add_argument("--num-shards", type=int, default=4, help="shards for the streaming rows")
    parser.add_argument("--rounds", type=int, default=3,
                        help="repeat every row this many times, interleaved; the table shows medians")
    parser.add_argument("--save", action="store_true", help="also write bench/results/scaling-<date>.md")
    return parser.parse_args(argv)


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SM_"))}
    env.update(PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    return env


def run(command: list, what: str, env: dict | None = None) -> None:
    """Run ``command`` in the repository root (``env``: default ``child_env()``); raise with its output if it fails."""
    result = subprocess.run([str(part) for part in command], cwd=REPO_ROOT, env=env if env is not None else child_env(),
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")


def preprocess(data: Path, out: Path, image_size: int, workers: int, shard: tuple[int, int] | None = None) -> float:
    """Run preprocess.py; images/s from its summary."""
    extra = ["--num-shards", shard[1], "--shard-index", shard[0]] if shard else []
    run([sys.executable, "preprocess.py", "--input", data, "--output-dir", out, "--image-size", image_size,
         "--workers", workers, "--quiet", *extra], f"preprocess --workers {workers}")
    suffix = f"-{shard[0]:05d}-of-{shard[1]:05d}" if shard else ""
    summary = json.loads((out / f"preprocessing_summary{suffix}.json").read_text())
    return float(summary["timing"]["images_per_second"])


def train(data: Path, model_dir: Path, args, processes: int, memory: str) -> float:
    """Mean train images/s over the epochs after the first."""
    launcher = ([sys.executable] if processes == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", processes])
    run([*launcher, "dss_train.py", "--data-dir", data, "--model-dir", model_dir, "--epochs", args.epochs,
         "--batch-size", args.batch_size, "--weights", "none", "--num-threads", 1, "--device", args.device,
         "--data-in-memory", memory, "--warmup-epochs", 0],
        f"training with {processes} process(es), {memory}")
    rates = pd.read_csv(model_dir / "metrics.csv")["train_images_per_s"]
    return float(rates.iloc[1:].mean() if len(rates) > 1 else rates.iloc[0])


def machine_info(args) -> list[str]:
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none"
    return [f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"machine: {platform.platform()}, {os.cpu_count()} CPUs, load average {load}; GPUs: {gpus}",
            f"torch {torch.__version__}; {args.num_train} train images, {args.image_size} px, "
            f"batch {args.batch_size} per process, {args.epochs} epochs (first = warm-up), device {args.device}"]


def ratios(rate_of: dict[tuple[str, str], float], args) -> list[str]:
    """The comparisons the table is for, as 'a / b = x' lines."""
    lines = []
    if len(args.workers) > 1:
        low, high = min(args.workers), max(args.workers)
        lines.append(f"preprocess --workers {high} / --workers {low}: "
                     f"{rate_of[('preprocess', f'--workers {high}')] / rate_of[('preprocess', f'--workers {low}')]:.2f}")
    resident = {setting: rate for (what, setting), rate in rate_of.items() if what == "train, resident"}
    if len(resident) > 1:
        (first, first_rate), (last, last_rate) = list(resident.items())[0], list(resident.items())[-1]
        lines.append(f"train {last} / {first}: {last_rate / first_rate:.2f}")
    sharded = f"train, {args.num_shards} shards"
    lines.append(f"train streamed / resident ({args.num_shards} shards): "
                 f"{rate_of[(sharded, '--data-in-memory stream')] / rate_of[(sharded, '--data-in-memory device')]:.2f}")
    return lines


def render(info: list[str], rows: list[tuple[str, str, float]], notes: list[str]) -> str:
    lines = ["# scale-out benchmark", ""] + [f"- {line}" for line in info] + [
        "", "| what | setting | images/s |", "|---|---|---:|"]
    lines += [f"| {what} | {setting} | {rate:,.1f} |" for what, setting, rate in rows]
    return "\n".join(lines + [""] + [f"- {note}" for note in notes]) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    info = machine_info(args)
    print("\n".join(info), flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    # (what, setting) -> images/s per round. Rounds run every row once, in the same order, so a
    # machine whose speed drifts (shared VMs: +-15% within minutes) moves every row alike; medians.
    measured: dict[tuple[str, str], list[float]] = {}
    notes: list[str] = []
    try:
        data = scratch / "data"
        write_demo_dataset(data, n_train=args.num_train, n_test=max(8, args.num_train // 8), seed=0, scale=args.scale)
        pickles = scratch / "pickles"
        preprocess(data, pickles, args.image_size, args.workers[0])
        shards = scratch / "shards"
        for index in range(args.num_shards):
            preprocess(data, shards, args.image_size, args.workers[0], shard=(index, args.num_shards))
        process_counts = []
        for processes in args.processes:
            if args.device == "cuda" and processes > torch.cuda.device_count():
                notes.append(f"{processes} GPUs: not measured (this machine has {torch.cuda.device_count()})")
            else:
                process_counts.append(processes)
        for round_number in range(1, args.rounds + 1):
            this_round = []
            for workers in args.workers:
                rate = preprocess(data, scratch / f"pickles-w{workers}-r{round_number}", args.image_size, workers)
                this_round.append((("preprocess", f"--workers {workers}"), rate))
            for processes in process_counts:
                rate = train(pickles, scratch / f"models-p{processes}-r{round_number}", args, processes, "device")
                this_round.append((("train, resident", f"{processes} process(es), global batch "
                                                       f"{args.batch_size * processes}"), rate))
            for memory in ("device", "stream"):
                rate = train(shards, scratch / f"models-{memory}-r{round_number}", args, 1, memory)
                this_round.append(((f"train, {args.num_shards} shards", f"--data-in-memory {memory}"), rate))
            for key, rate in this_round:
                measured.setdefault(key, []).append(rate)
            print(f"round {round_number}/{args.rounds}: "
                  + "; ".join(f"{what} {setting}: {rate:,.1f}" for (what, setting), rate in this_round), flush=True)
        if args.device == "cpu":
            notes.append("1 GPU vs several (NCCL): not measured; no multi-GPU machine was available. Run "
                         "`python bench/scaling.py --device cuda --processes 1 8 --save` on one")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows = [(what, setting, float(np.median(rates))) for (what, setting), rates in measured.items()]
    rate_of = {(what, setting): rate for what, setting, rate in rows}
    notes = ratios(rate_of, args) + [f"{args.rounds} round(s), medians; per round: " + "; ".join(
        f"{what} {setting} {', '.join(f'{r:,.1f}' for r in rates)}" for (what, setting), rates in measured.items())
    ] + notes
    publish(render(info, rows, notes), args.save, "scaling" if args.device == "cpu" else f"scaling-{args.device}")
    return 0


def publish(report: str, save: bool, name: str) -> None:
    """Print ``report``; with ``save`` also write it to bench/results/<name>-<date>.md."""
    print("\n" + report, flush=True)
    if save:
        path = REPO_ROOT / "bench" / "results" / f"{name}-{datetime.date.today().isoformat()}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        fileio.write_text(path, report)
        print(f"saved {path}")


if __name__ == "__main__":
    sys.exit(main())
