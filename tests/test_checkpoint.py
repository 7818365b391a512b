"""dss.train.checkpoint: atomic save, keep-last-2, sha256 manifests, fallback, refusal, RNG round trip."""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from dss.data import dataset
from dss.train import checkpoint as checkpoint_lib
from tests.conftest import REPO_ROOT, clean_env

FINGERPRINT = {"dataset_sha256": "abc", "num_classes": 3, "batch_size": 16, "learning_rate": 0.001}


def _state(value: float) -> dict:
    return {"model": {"weight": torch.full((2, 2), value)}, "history": [{"epoch": 1, "val_logloss": value}]}


def test_save_load_round_trip_and_keep_last_two(tmp_path):
    manager = checkpoint_lib.CheckpointManager(tmp_path, keep=2, log=lambda message: None)
    for epoch in (1, 2, 3):
        manager.save(_state(float(epoch)), epoch=epoch, step=epoch * 10, fingerprint=FINGERPRINT)
    names = sorted(path.name for path in tmp_path.iterdir())
    assert names == ["ckpt-e00002-s000000020.json", "ckpt-e00002-s000000020.pt",
                     "ckpt-e00003-s000000030.json", "ckpt-e00003-s000000030.pt"]
    state, path = manager.load_latest(FINGERPRINT)
    assert path.name == "ckpt-e00003-s000000030.pt"
    assert state["epoch"] == 3 and state["step"] == 30
    assert torch.equal(state["model"]["weight"], torch.full((2, 2), 3.0))
    # The file itself is plain data: torch.load(weights_only=True) reads it.
    assert torch.load(path, weights_only=True)["history"] == [{"epoch": 1, "val_logloss": 3.0}]


def test_empty_folder_means_fresh_start(tmp_path):
    assert checkpoint_lib.CheckpointManager(tmp_path / "missing").load_latest(FINGERPRINT) is None


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "no_manifest", "bad_manifest"])
def test_corrupt_newest_falls_back_to_previous(tmp_path, damage):
    messages = []
    manager = checkpoint_lib.CheckpointManager(tmp_path, keep=2, log=messages.append)
    manager.save(_state(1.0), epoch=1, step=10, fingerprint=FINGERPRINT)
    newest = manager.save(_state(2.0), epoch=2, step=20, fingerprint=FINGERPRINT)
    data = bytearray(newest.read_bytes())
    if damage == "flip_byte":
        data[len(data) // 2] ^= 0xFF
        newest.write_bytes(bytes(data))
    elif damage == "truncate":
        newest.write_bytes(bytes(data[: len(data) // 3]))
    elif damage == "no_manifest":
        newest.with_suffix(".json").unlink()
    else:
        newest.with_suffix(".json").write_text("{not json", encoding="utf-8")
    state, path = manager.load_latest(FINGERPRINT)
    assert path.name == "ckpt-e00001-s000000010.pt"
    assert state["epoch"] == 1
    assert any(newest.name in message and "previous" in message for message in messages), messages


def test_incompatible_checkpoint_is_refused_naming_the_difference(tmp_path):
    manager = checkpoint_lib.CheckpointManager(tmp_path, log=lambda message: None)
    manager.save(_state(1.0), epoch=1, step=10, fingerprint=FINGERPRINT)
    other = dict(FINGERPRINT, dataset_sha256="def", learning_rate=0.01)
    with pytest.raises(checkpoint_lib.CheckpointMismatchError) as error:
        manager.load_latest(other)
    message = str(error.value)
    assert "dataset_sha256" in message and "learning_rate" in message
    assert "batch_size" not in message
    assert "new --checkpoint-dir" in message


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    generator = torch.Generator().manual_seed(7)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    manager = checkpoint_lib.CheckpointManager(tmp_path, log=lambda message: None)
    manager.save({"rng": checkpoint_lib.capture_rng_state(generator)}, epoch=1, step=1, fingerprint=FINGERPRINT)
    expected = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=generator).item())
    # Move every stream on, then restore from the file.
    random.random(), np.random.rand(), torch.rand(5), torch.rand(5, generator=generator)
    state, _ = manager.load_latest(FINGERPRINT)
    checkpoint_lib.restore_rng_state(state["rng"], generator)
    again = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=generator).item())
    assert again == expected


def test_dataset_fingerprint_sees_one_pixel_and_one_label():
    images = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    labels = np.array([0, 1, 0, 1])
    args = (["a", "b", "c", "d"], labels, ["x", "y"], ["s1", "s1", "s2", "s2"])
    base = dataset.content_fingerprint(images, *args)
    assert base == dataset.content_fingerprint(images.copy(), *args)
    changed = images.copy()
    changed[3, 7, 7, 2] = 1
    assert dataset.content_fingerprint(changed, *args) != base
    assert dataset.content_fingerprint(images, args[0], np.array([0, 1, 1, 1]), *args[2:]) != base


def test_crafted_checkpoint_never_runs_code_even_when_env_forces_unsafe_load(tmp_path):
    """E8: a checkpoint whose pickle calls os.system, with a *valid* manifest, and
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 set: the explicit weights_only=True still refuses it."""
    marker = tmp_path / "pwned"
    folder = tmp_path / "ckpt"
    script = f"""
import hashlib, json, os, torch
from dss.train import checkpoint as c
from dss import fileio
manager = c.CheckpointManager({str(folder)!r}, log=print)
manager.save({{"ok": torch.zeros(1)}}, epoch=1, step=1, fingerprint={FINGERPRINT!r})

class Evil:
    def __reduce__(self):
        return (os.system, ("touch " + {str(marker)!r},))

path = {str(folder)!r} + "/" + c.checkpoint_name(2, 2)
torch.save({{"payload": Evil(), "fingerprint": {FINGERPRINT!r}}}, path)
data = open(path, "rb").read()
fileio.write_json(path[:-3] + ".json", {{"sha256": hashlib.sha256(data).hexdigest()}})
state, used = manager.load_latest({FINGERPRINT!r})
print("USED", os.path.basename(used))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT,
                            env=clean_env(TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1"), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not marker.exists()
    assert "USED ckpt-e00001-s000000001.pt" in result.stdout
    assert "ckpt-e00002-s000000002.pt skipped" in result.stdout


# --------------------------------------------------------------------------- TrainingState
def _training_state(seed: int) -> checkpoint_lib.TrainingState:
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return checkpoint_lib.TrainingState(model, optimizer, scheduler, scaler, torch.Generator().manual_seed(seed))


def _epoch(state, epoch: int, val_logloss: float, steps: int = 4) -> None:
    state.begin_epoch()
    state.add_epoch_part({"steps": steps, "images": 8 * steps, "train_loss": 1.0, "train_acc": 0.5, "seconds": 1.0})
    state.finish_epoch()
    record = {"epoch": epoch, "val_loss": val_logloss, "val_logloss": val_logloss, "val_acc": 0.5, "per_class": []}
    state.record_epoch(record, np.full((2, 2), 0.5), np.eye(2, dtype=np.int64))


def test_training_state_round_trip_through_a_checkpoint_file(tmp_path):
    """What a checkpoint holds: the keys resume reads, and a state that loads back field for field."""
    state = _training_state(0)
    _epoch(state, 1, 0.7)
    _epoch(state, 2, 0.9)
    state.begin_epoch()
    state.add_epoch_part({"steps": 3, "images": 24, "train_loss": 2.0, "train_acc": 0.25, "seconds": 0.5})
    manager = checkpoint_lib.CheckpointManager(tmp_path, log=lambda message: None)
    manager.save(state.state_dict(), state.epoch, state.step, FINGERPRINT)
    saved, _ = manager.load_latest(FINGERPRINT)
    assert set(saved) == {"model", "optimizer", "scheduler", "scaler", "rng", "history", "best", "best_model",
                          "best_val_probs", "step_in_epoch", "early_stopped", "partial_epoch", "fingerprint", "epoch",
                          "step", "tracking_run_id", "ema"}
    assert saved["ema"] is None  # no --ema-decay
    assert (saved["epoch"], saved["step"], saved["step_in_epoch"]) == (2, 11, 3)

    resumed = _training_state(1)
    resumed.load_state_dict(saved)
    assert resumed.tracking_run_id is None
    older = {key: value for key, value in saved.items() if key not in ("tracking_run_id", "ema")}
    _training_state(1).load_state_dict(older)  # checkpoints written before MLflow tracking still resume
    assert (resumed.epoch, resumed.step, resumed.step_in_epoch, resumed.position) == (2, 11, 3, "epoch 3 step 3")
    assert [row["epoch"] for row in resumed.history] == [1, 2] and resumed.best["epoch"] == 1
    assert resumed.epochs_without_improvement == 1
    np.testing.assert_array_equal(resumed.best_val_probs, np.full((2, 2), 0.5))
    assert resumed.best["confusion_matrix"] == [[1, 0], [0, 1]]
    for name, tensor in state.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], tensor)
    # Mid-epoch, the saved random streams are those of the epoch's start: the batches are redrawn alike.
    assert torch.equal(resumed.generator.get_state(), saved["rng"]["generator"])
    # The interrupted epoch's two parts count as one epoch.
    resumed.add_epoch_part({"steps": 1, "images": 8, "train_loss": 4.0, "train_acc": 1.0, "seconds": 0.5})
    assert resumed.finish_epoch() == {"train_loss": (2.0 * 24 + 4.0 * 8) / 32, "train_acc": (6 + 8) / 32,
                                      "train_images_per_s": 32.0}
    assert (resumed.epoch, resumed.step, resumed.step_in_epoch, resumed.partial_epoch) == (3, 12, 0, None)
