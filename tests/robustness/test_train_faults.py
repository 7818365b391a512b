"""F3: a spot-like interruption. dss_train.py runs as a real subprocess and is SIGKILLed at random
moments (a seeded random.Random picks them), then restarted with the same --checkpoint-dir until it
completes. The result must equal an uninterrupted run's, and every restart must resume from the
newest complete checkpoint on disk, so at most one checkpoint interval (one epoch) is ever redone.

Checkpoints are written once per epoch (plus on SIGTERM, which a SIGKILL never gives a chance to),
so "one checkpoint interval" is one epoch. The kill moments are measured in checkpoint intervals
of the run itself (the time from its start to its first checkpoint), not in seconds, so the test
means the same on a slow or a fast machine. No timing is asserted.
"""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import PYTHON, REPO_ROOT, clean_env, run_script

EPOCHS = 3
KILLS = 2
SEED = 20240611  # the kill plan; fixed so a failure can be replayed
# Same thread count in every run: CPU results are bit-identical only for a fixed thread count.
TRAIN_ARGS = ["--epochs", str(EPOCHS), "--batch-size", "8", "--weights", "none", "--num-threads", "1", "--seed", "0"]
TRAJECTORY = ["epoch", "train_loss", "train_acc", "val_loss", "val_logloss", "val_acc", "lr"]  # not timings
STARTED = re.compile(r"^(resuming from (?P<path>\S+) \(end of epoch (?P<epoch>\d+),|no checkpoint in )")
EPOCH_LOGGED = re.compile(r"^epoch (?P<epoch>\d+)/\d+: ")
CHECKPOINT_SAVED = re.compile(r"^checkpoint saved: (?P<path>\S+)$")
CHECKPOINT_NAME = re.compile(r"^ckpt-e(?P<epoch>\d{5})-s\d{9}\.pt$")


@pytest.fixture(scope="module")
def tiny_pickles(tmp_path_factory) -> Path:
    """48 train / 8 test demo images at 32 px: epochs of a few steps keep four runs well under a minute."""
    from dss.demo.sample import write_demo_dataset

    root = tmp_path_factory.mktemp("f3")
    write_demo_dataset(root / "data", n_train=48, n_test=8, seed=0, scale=0.1)
    result = run_script("preprocess.py", ["--input", root / "data", "--output-dir", root / "pickles",
                                          "--image-size", "32", "--workers", "1", "--quiet"])
    assert result.returncode == 0, result.stdout + result.stderr
    return root / "pickles"


class TrainRun:
    """dss_train.py as a subprocess; a thread collects its output lines with their arrival times."""

    def __init__(self, data_dir: Path, model_dir: Path, checkpoint_dir: Path):
        command = [PYTHON, str(REPO_ROOT / "dss_train.py"), "--data-dir", str(data_dir), "--model-dir",
                   str(model_dir), "--checkpoint-dir", str(checkpoint_dir), *TRAIN_ARGS]
        self.process = subprocess.Popen(command, env=clean_env(), cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        self.lines: list[tuple[float, str]] = []  # (time.monotonic() at arrival, line)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def matches(self, pattern: re.Pattern) -> list[re.Match]:
        return [match for _, line in self.lines if (match := pattern.match(line))]

    def wait_for(self, pattern: re.Pattern, count: int = 1, timeout: float = 300) -> float:
        """Arrival time of the ``count``-th line matching ``pattern`` (count 0: now)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [arrival for arrival, line in list(self.lines) if pattern.match(line)]
            if len(found) >= count:
                return found[count - 1] if count else time.monotonic()
            if not self._reader.is_alive():
                raise AssertionError(f"run ended (rc {self.process.wait()}) before {count} lines matching "
                                     f"{pattern.pattern!r}:\n{self.text()}")
            time.sleep(0.01)
        self.process.kill()
        raise AssertionError(f"no {count} lines matching {pattern.pattern!r} within {timeout} s:\n{self.text()}")

    def kill_at(self, moment: float) -> bool:
        """SIGKILL at time.monotonic() == moment unless the run ended first; True when it was killed."""
        while time.monotonic() < moment and self.process.poll() is None:
            time.sleep(0.005)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.finish()
        return self.process.returncode == -signal.SIGKILL

    def finish(self, timeout: float = 600) -> int:
        self.process.wait(timeout=timeout)
        self._reader.join(timeout=60)
        return self.process.returncode


@pytest.fixture
def start_run():
    """TrainRun factory; any run still alive when the test ends (a failed assertion) is killed."""
    runs = []

    def start(*args) -> TrainRun:
        runs.append(TrainRun(*args))
        return runs[-1]

    yield start
    for run in runs:
        if run.process.poll() is None:
            run.process.kill()
            run.finish()


def newest_complete_checkpoint(folder: Path) -> tuple[int, Path] | None:
    """(epoch, path) of the newest checkpoint whose manifest was written (the save finished)."""
    complete = []
    for path in folder.glob("ckpt-*.pt"):
        match = CHECKPOINT_NAME.match(path.name)
        manifest = path.with_suffix(".json")
        if match and manifest.is_file() and json.loads(manifest.read_text())["file"] == path.name:
            complete.append((int(match.group("epoch")), path))
    return max(complete) if complete else None


@pytest.mark.slow  # a soak: make test-all (the single SIGKILL-and-resume tests run in make test)
def test_f3_sigkill_at_random_moments_then_restarts_complete_with_the_uninterrupted_result(tiny_pickles, start_run,
                                                                                             tmp_path):
    rng = random.Random(SEED)
    # The uninterrupted reference runs alongside the interrupted one (two cores; results do not
    # depend on timing, only the kill moments do).
    reference = start_run(tiny_pickles, tmp_path / "reference" / "models", tmp_path / "reference" / "ckpt")
    models, ckpt = tmp_path / "models", tmp_path / "ckpt"
    interval = None  # seconds from a run's start to its first checkpoint: one checkpoint interval
    kills = []  # per kill: what the killed run had logged and what was on disk afterwards
    for attempt in range(1, KILLS + 2):
        run = start_run(tiny_pickles, models, ckpt)
        started = run.wait_for(STARTED)
        if kills:
            kills[-1]["restart"] = run.matches(STARTED)[0]
        if attempt > KILLS:
            break
        resumed_epoch = int(run.matches(STARTED)[0].group("epoch") or 0)
        if interval is None:
            # First run: wait for one checkpoint to learn the interval, then die within the next one.
            checkpoints_first, since = 1, run.wait_for(CHECKPOINT_SAVED)
            interval = since - started
        else:
            # Later runs: after 0..(epochs left - 2) new checkpoints, at a random point of the next
            # interval. Never wait for the checkpoint before the last epoch: an interval (loading +
            # one epoch) can outlast the last epoch plus the final outputs, and the run would end first.
            checkpoints_first = rng.randrange(0, max(1, EPOCHS - resumed_epoch - 1))
            since = run.wait_for(CHECKPOINT_SAVED, checkpoints_first) if checkpoints_first else started
        fraction = rng.uniform(0.0, 0.9)  # below 1: the kill lands inside the planned interval
        killed = run.kill_at(since + fraction * interval)
        assert killed, f"attempt {attempt} ended before its planned kill:\n{run.text()}"
        kills.append({
            "attempt": attempt, "plan": (checkpoints_first, round(fraction, 3)),
            "epochs_logged": [int(m.group("epoch")) for m in run.matches(EPOCH_LOGGED)],
            "checkpoints_logged": [Path(m.group("path")).name for m in run.matches(CHECKPOINT_SAVED)],
            "on_disk": newest_complete_checkpoint(ckpt), "log": run.text(),
        })
    assert run.finish() == 0, run.text()
    assert reference.finish() == 0, reference.text()

    assert len(kills) == KILLS
    for kill in kills:
        restart, on_disk = kill["restart"], kill["on_disk"]
        context = f"kill {kill['attempt']} (plan {kill['plan']}):\n{kill['log']}\n--- restart: {restart.group(0)}"
        # The restart resumes from the newest complete checkpoint on disk, nothing older.
        assert on_disk is not None, context  # the first run always dies after its first checkpoint
        epoch, path = on_disk
        assert restart.group("path") == str(path) and int(restart.group("epoch")) == epoch, context
        # Nothing announced as saved is lost, and at most the one epoch in flight is redone.
        saved_epochs = [int(CHECKPOINT_NAME.match(name).group("epoch")) for name in kill["checkpoints_logged"]]
        assert epoch >= max(saved_epochs, default=0), context
        assert max(kill["epochs_logged"], default=epoch) - epoch <= 1, context

    ours, theirs = (pd.read_csv(folder / "metrics.csv")[TRAJECTORY].to_dict("records")
                    for folder in (models, tmp_path / "reference" / "models"))
    assert [row["epoch"] for row in ours] == list(range(1, EPOCHS + 1))  # no duplicated or missing epochs
    for mine, reference_row in zip(ours, theirs):
        assert mine == pytest.approx(reference_row, rel=1e-12, abs=1e-15)
    ours, theirs = (pd.read_csv(folder / "test_predictions.csv")
                    for folder in (models, tmp_path / "reference" / "models"))
    assert ours["id"].tolist() == theirs["id"].tolist()
    np.testing.assert_allclose(ours.iloc[:, 1:].to_numpy(), theirs.iloc[:, 1:].to_numpy(), rtol=0, atol=1e-12)
