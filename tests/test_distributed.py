"""DDP training under torchrun on the CPU (gloo), as real subprocesses on the demo pickles.

``python -m torch.distributed.run --nproc_per_node 2 --standalone dss_train.py ...`` must end with
one model and one set of metrics whose validation numbers equal a single-process evaluation of
that model.pth; a rank killed mid-run makes torchrun restart the workers (``--max-restarts``) and
the run resumes from its checkpoint with the uninterrupted run's history. The test allows 3
restarts, not 1: a restarted group can still fail its first connect under load, and a second
try is what a user would get too (dss.distributed prefixes the store keys per restart attempt,
without which the restarted gloo ranks hung connecting to the dead workers).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dss.models import calibration
from dss.data import dataset
from dss import distributed
from dss.train import engine
from dss.models import model as model_lib
from dss.models.loader import DeviceImages
from dss.models import prediction
from tests.conftest import PYTHON, REPO_ROOT, clean_env

TRAIN_ARGS = ["--epochs", "2", "--batch-size", "16", "--weights", "none", "--num-threads", "1", "--seed", "0"]
TRAJECTORY = ["epoch", "train_loss", "train_acc", "val_loss", "val_logloss", "val_acc", "lr"]


def torchrun_command(data_dir, model_dir, checkpoint_dir, *extra) -> list[str]:
    return [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", *extra,
            "dss_train.py", "--data-dir", str(data_dir), "--model-dir", str(model_dir),
            "--checkpoint-dir", str(checkpoint_dir), *TRAIN_ARGS]


def torchrun(*command_args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_command(*command_args), cwd=REPO_ROOT, env=clean_env(OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ddp_run(demo_pickles, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    result = torchrun(demo_pickles, root / "models", root / "ckpt")
    assert result.returncode == 0, result.stdout + result.stderr
    return {"models": root / "models", "ckpt": root / "ckpt", "stdout": result.stdout, "stderr": result.stderr}


def test_two_processes_train_one_model_and_rank0_reports(ddp_run):
    models = ddp_run["models"]
    for name in ("model.pth", "config.json", "metrics.json", "metrics.csv", "splits.csv", "val_predictions.csv",
                 "test_predictions.csv"):
        assert (models / name).is_file(), name
    # Rank 0 alone prints: one [METRICS] line per epoch, not one per rank.
    metric_lines = [line for line in ddp_run["stdout"].splitlines() if line.startswith("[METRICS] epoch=")]
    assert [line.split()[1] for line in metric_lines] == ["epoch=1", "epoch=2"]
    config = json.loads((models / "config.json").read_text())
    assert config["world_size"] == 2 and config["global_batch_size"] == 32
    # 120 train images, global batch 32 -> 3 steps per epoch (not 7 as one process of 16 would take).
    assert config["steps_per_epoch"] == 3
    assert "DDP: 2 processes (gloo)" in ddp_run["stdout"]
    assert "Grad strides do not match" not in ddp_run["stderr"]


def test_validation_metrics_equal_a_single_process_evaluation(ddp_run, demo_pickles):
    models = ddp_run["models"]
    network, artifact = model_lib.load_model_artifact(models / "model.pth")
    train = dataset.load_split(demo_pickles, "train")
    splits = pd.read_csv(models / "splits.csv", dtype={"id": str})
    val_ids = set(splits.loc[splits["split"] == "val", "id"])
    position = {image_id: i for i, image_id in enumerate(train["ids"])}
    val_index = np.array(sorted(position[i] for i in val_ids))
    torch.set_num_threads(1)
    stats = engine.evaluate(network, DeviceImages(train["images"][val_index], torch.device("cpu")),
                            train["labels"][val_index], torch.nn.CrossEntropyLoss(),
                            prediction.Inference(256, artifact["preprocessing"]["image_size"],
                                             tta=artifact["hyperparameters"]["tta"]))
    best = json.loads((models / "metrics.json").read_text())["best"]
    assert stats["val_logloss"] == pytest.approx(best["val_logloss"], abs=1e-5)
    assert stats["val_loss"] == pytest.approx(best["val_loss"], abs=1e-5)
    assert stats["val_acc"] == pytest.approx(best["val_acc"])
    saved = pd.read_csv(models / "val_predictions.csv", dtype={"id": str})
    assert list(saved["id"]) == [train["ids"][i] for i in val_index]
    # val_predictions.csv holds the probabilities at the run's fitted temperature (--temperature-scaling).
    calibrated = calibration.apply_temperature(stats["logits"], artifact["hyperparameters"]["temperature"])
    np.testing.assert_allclose(saved[artifact["class_names"]].to_numpy(), calibrated, atol=1e-5)


def test_a_kfold_run_under_ddp_scores_every_image_out_of_fold_and_predicts_with_the_ensemble(demo_pickles, tmp_path):
    """--folds under torchrun: the ranks train the K members together; rank 0 writes one set of
    outputs whose out-of-fold numbers a single-process evaluation of the members reproduces."""
    command = torchrun_command(demo_pickles, tmp_path / "k2", tmp_path / "ckpt2") + ["--folds", "2", "--epochs", "1"]
    result = subprocess.run(command, cwd=REPO_ROOT, env=clean_env(OMP_NUM_THREADS="1"), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    models = tmp_path / "k2"
    assert len([line for line in result.stdout.splitlines() if line.startswith("[METRICS] cv_logloss=")]) == 1
    networks, artifact = model_lib.load_ensemble(models / "model.pth")
    assert len(networks) == 2
    train = dataset.load_split(demo_pickles, "train")
    oof = pd.read_csv(models / "oof_predictions.csv", dtype={"id": str})
    position = {image_id: i for i, image_id in enumerate(train["ids"])}
    torch.set_num_threads(1)
    how = prediction.Inference(256, artifact["preprocessing"]["image_size"], tta=artifact["hyperparameters"]["tta"])
    temperature = artifact["hyperparameters"]["temperature"]
    for fold, network in enumerate(networks, start=1):
        rows = oof[oof["fold"] == fold]
        index = np.array([position[image_id] for image_id in rows["id"]])
        logits = prediction.predict_logits(network, DeviceImages(train["images"][index], torch.device("cpu")), how)
        np.testing.assert_allclose(rows[artifact["class_names"]].to_numpy(),
                                   calibration.apply_temperature(logits, temperature), atol=1e-5)


def _worker_pids(launcher_pid: int) -> list[int]:
    """Processes whose parent is the torchrun launcher and that run dss_train.py."""
    workers = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == launcher_pid and b"dss_train.py" in cmdline:
            workers.append(int(entry.name))
    return workers


def test_a_killed_rank_restarts_and_resumes_from_the_checkpoint(ddp_run, demo_pickles, tmp_path):
    command = torchrun_command(demo_pickles, tmp_path / "models", tmp_path / "ckpt", "--max-restarts", "3")
    # Own process group: on failure the launcher and its workers (which hold the pipes) go together.
    launcher = subprocess.Popen(command, cwd=REPO_ROOT, env=clean_env(OMP_NUM_THREADS="1"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not list((tmp_path / "ckpt").glob("ckpt-e00001-*.json")):
            assert launcher.poll() is None, "torchrun ended before the first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.2)
        workers = _worker_pids(launcher.pid)
        assert len(workers) == 2
        os.kill(max(workers), signal.SIGKILL)  # one rank dies; torchrun must restart the group
        stdout, stderr = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.communicate()
    assert launcher.returncode == 0, stdout + stderr
    assert "resuming from" in stdout
    resumed = pd.read_csv(tmp_path / "models" / "metrics.csv")[TRAJECTORY].to_dict("records")
    reference = pd.read_csv(ddp_run["models"] / "metrics.csv")[TRAJECTORY].to_dict("records")
    assert [row["epoch"] for row in resumed] == [1, 2]
    for got, want in zip(resumed, reference):
        assert got == pytest.approx(want, abs=1e-6)


# --------------------------------------------------------------------------- library helpers
def test_single_process_environment_initialises_nothing():
    context = distributed.setup(torch.device("cpu"), env={})
    assert not context.enabled and context.is_main and context.backend is None
    assert distributed.ranks_from_env({"WORLD_SIZE": "1"}) == (0, 1, 0)
    assert distributed.broadcast_from_main(context, {"a": 1}) == {"a": 1}
    assert distributed.any_rank(context, True) is True


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2 is outside"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE must be >= 1"),
])
def test_bad_torchrun_environment_is_named(env, message):
    with pytest.raises(distributed.DistributedSetupError, match=message):
        distributed.ranks_from_env(env)


@pytest.mark.parametrize("num_items, world_size", [(40, 2), (41, 3), (5, 4), (3, 3)])
def test_shard_bounds_cover_every_item_once(num_items, world_size):
    bounds = [distributed.shard_bounds(num_items, rank, world_size) for rank in range(world_size)]
    covered = [i for start, stop in bounds for i in range(start, stop)]
    assert covered == list(range(num_items))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1
