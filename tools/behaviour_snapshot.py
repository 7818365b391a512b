"""Fingerprint what users see of both scripts, to prove a refactor changed no behaviour.

    python tools/behaviour_snapshot.py --out /tmp/before.json          # on the old code
    python tools/behaviour_snapshot.py --out /tmp/after.json --compare /tmp/before.json

Runs, as real subprocesses on a fixed demo draw: ``python -m dss.sample``, ``preprocess.py`` (64 px,
as the demo) and a seeded CPU training run of ``dss_train.py`` (``--weights none``, one torch thread
so the arithmetic is repeatable), then ``--predict-only`` on the same data. Records the sha256 of
every preprocess output (the summaries with their ``timing`` fields and wall-time lines removed),
``metrics.csv`` without its timing columns, and the sha256 of the prediction CSVs, ``splits.csv``
and ``config.json`` (paths removed). ``--compare`` prints every difference and exits 1 if any.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TIMING_COLUMNS = ("epoch_seconds", "train_images_per_s")
# Lines of preprocessing_summary.txt that carry times measured by the clock.
TIMING_LINE = re.compile(r"^(wall time:|\s+[\d.]+ s, [\d.]+|\s+[\d.]+ s, None) ")


def run(command: list[str], cwd: Path) -> str:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SM_"))},
           "PYTHONPATH": str(REPO_ROOT), "PYTHONHASHSEED": "0"}
    done = subprocess.run([sys.executable, *command], cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.stdout


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def without_timing(obj):
    """The summary JSON with every ``timing`` dict removed (wall clock, images/s)."""
    if isinstance(obj, dict):
        return {key: without_timing(value) for key, value in obj.items() if key != "timing"}
    if isinstance(obj, list):
        return [without_timing(value) for value in obj]
    return obj


def metrics_rows(path: Path) -> list[dict]:
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    return [{key: value for key, value in row.items() if key not in TIMING_COLUMNS} for row in rows]


def snapshot(work: Path) -> dict:
    data, out, models = work / "data", work / "output", work / "models"
    run(["-m", "dss.sample", str(data), "--train", "240", "--test", "60", "--scale", "0.25"], work)
    run([str(REPO_ROOT / "preprocess.py"), "--input", str(data), "--output-dir", str(out), "--image-size", "64",
         "--workers", "2"], work)
    result = {}
    for path in sorted(out.iterdir()):
        content = path.read_bytes()
        if path.suffix == ".json":
            content = json.dumps(without_timing(json.loads(content)), sort_keys=True).encode()
        elif path.suffix == ".txt":
            content = "\n".join(line for line in content.decode().splitlines()
                                if not TIMING_LINE.match(line)).encode()
        result[f"preprocess/{path.name}"] = sha256(content)
    run([str(REPO_ROOT / "dss_train.py"), "--data-dir", str(out), "--model-dir", str(models), "--weights", "none",
         "--epochs", "3", "--image-size", "48", "--num-threads", "1", "--seed", "7"], work)
    result["train/metrics.csv"] = metrics_rows(models / "metrics.csv")
    for name in ("splits.csv", "val_predictions.csv", "test_predictions.csv"):
        result[f"train/{name}"] = sha256((models / name).read_bytes())
    resolved = json.loads((models / "config.json").read_text())
    for key in ("data_dir", "model_dir", "output_dir", "checkpoint_dir", "torch_version", "python_version", "run_id"):
        resolved.pop(key, None)
    result["train/config.json"] = resolved
    metrics = json.loads((models / "metrics.json").read_text())
    result["train/metrics.json:best"] = metrics["best"]
    predicted = work / "predicted"
    run([str(REPO_ROOT / "dss_train.py"), "--data-dir", str(out), "--model-dir", str(models), "--predict-only",
         "--output-dir", str(predicted), "--num-threads", "1"], work)
    result["predict/test_predictions.csv"] = sha256((predicted / "test_predictions.csv").read_bytes())
    return result


def compare(before: dict, after: dict) -> list[str]:
    differences = []
    for key in sorted(set(before) | set(after)):
        if before.get(key) != after.get(key):
            differences.append(f"{key}: before {before.get(key)!r}\n    after {after.get(key)!r}")
    return differences


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write this snapshot (JSON)")
    parser.add_argument("--compare", type=Path, default=None, help="an earlier snapshot to compare with")
    args = parser.parse_args(argv)
    # A fixed folder: the input path is recorded in the pickles and summaries.
    work = Path(tempfile.gettempdir()) / "dss-behaviour-snapshot"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        result = snapshot(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"snapshot: {len(result)} entries -> {args.out}")
    if args.compare is None:
        return 0
    differences = compare(json.loads(args.compare.read_text()), result)
    for difference in differences:
        print(f"DIFFERENT {difference}")
    print("identical" if not differences else f"{len(differences)} difference(s)")
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())
