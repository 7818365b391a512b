"""Nothing lost, nothing wrong: earlier runs in a model dir stay recoverable, every setting that
changes results is in the checkpoint fingerprint, a stop is never lost in any phase, a resume does
not depend on free memory or the device, and the number a run optimises is the one it reports.

Real subprocess runs of dss_train.py on the demo pickles; the stop tests run ``dss_train.main`` in
this process and send the real signal to it at a chosen phase (the only way to hit a phase exactly).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

import pandas as pd
import pytest
import torch

import dss_train
from dss.train import checkpoint, engine, finishing, outputs, previous_runs, training, training_args, training_data
from dss.models import prediction
from dss.predict import results
from tests.conftest import run_script

COMMON = ["--epochs", "1", "--batch-size", "16", "--weights", "none", "--num-threads", "1", "--seed", "0"]


def train(data_dir, model_dir, *extra, env=None):
    return run_script("dss_train.py", ["--data-dir", data_dir, "--model-dir", model_dir, *COMMON, *extra], env=env)


def sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def first_run(demo_pickles, tmp_path_factory):
    """One run with COMMON into a model dir of its own (tests copy it before changing anything)."""
    models = tmp_path_factory.mktemp("first") / "models"
    result = train(demo_pickles, models)
    assert result.returncode == 0, result.stdout + result.stderr
    return {"models": models, "stdout": result.stdout}


@pytest.fixture(scope="module")
def kfold_run(demo_pickles, tmp_path_factory):
    models = tmp_path_factory.mktemp("kfold") / "models"
    result = train(demo_pickles, models, "--folds", "2", "--val-fraction", "0.3")
    assert result.returncode == 0, result.stdout + result.stderr
    return {"models": models, "stdout": result.stdout + result.stderr}


# --------------------------------------------------------------------------- 1. earlier runs are kept
def test_retraining_with_other_settings_moves_the_earlier_run_aside_and_its_model_still_serves(
        first_run, demo_pickles, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(first_run["models"], models)
    first_config = json.loads((models / "config.json").read_text())
    first_model = sha256(models / "model.pth")
    weekly = run_script("dss_train.py", ["--data-dir", demo_pickles, "--model-dir", models, "--predict-only",
                                         "--num-threads", "1"])
    assert weekly.returncode == 0, weekly.stdout + weekly.stderr

    second = train(demo_pickles, models, "--learning-rate", "0.003")  # the everyday loop: other hyperparameters
    assert second.returncode == 0, second.stdout + second.stderr
    kept = models / "previous" / first_config["run_id"]
    assert f"was moved to {kept}" in second.stdout
    assert sha256(kept / "model.pth") == first_model
    assert json.loads((kept / "config.json").read_text()) == first_config
    for name in outputs.OUTPUT_FILES:
        if name != outputs.OOF_PREDICTIONS:
            assert (kept / name).is_file(), name
    # The weekly predictions went with the model that made them; the new model predicts afresh.
    assert (kept / "predictions" / demo_pickles.name / results.PREDICTIONS).is_file()
    assert not (models / "predictions").exists()
    assert sha256(models / "model.pth") != first_model
    served = run_script("dss_train.py", ["--data-dir", demo_pickles, "--model-dir", kept, "--predict-only",
                                         "--overwrite", "--num-threads", "1"])
    assert served.returncode == 0, served.stdout + served.stderr

    # The identical command on the same data replaces its own outputs: nothing more is moved.
    again = train(demo_pickles, models, "--learning-rate", "0.003")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "was moved" not in again.stdout
    assert [entry.name for entry in (models / "previous").iterdir()] == [first_config["run_id"]]


def test_every_file_a_run_leaves_is_one_that_is_moved_aside(kfold_run):
    left = {path.name for path in kfold_run["models"].iterdir()}
    assert left == set(outputs.MODEL_FILES) | set(outputs.OUTPUT_FILES)


def _fake_run(folder: Path, run_id: str | None, key: str = "k") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.pth").write_bytes(run_id.encode() if run_id else b"old")
    if run_id is not None:
        (folder / "config.json").write_text(json.dumps({"run_id": run_id, "run_key": key}))
    (folder / "metrics.json").write_text("{}")


def _set_aside(model_dir: Path, output_dir: Path, key: str, keep: int) -> list[Path]:
    moved = previous_runs.set_aside(model_dir, output_dir, key, outputs.MODEL_FILES, outputs.OUTPUT_FILES)
    previous_runs.prune(moved, keep)
    return moved


def test_previous_runs_keeps_the_newest_and_moves_unrecorded_runs_too(tmp_path):
    models = tmp_path / "models"
    (models / "previous" / "my-best-run").mkdir(parents=True)  # the user's own folder: never pruned
    for number in range(4):
        _fake_run(models, f"2026120{number + 1}-000000-aaaaaa", key=str(number))
        _set_aside(models, models, key="new", keep=2)
    assert sorted(entry.name for entry in (models / "previous").iterdir()) == \
        ["20261203-000000-aaaaaa", "20261204-000000-aaaaaa", "my-best-run"]
    _fake_run(models, None)  # a model of an earlier version, no config.json: moved, never replaced
    (moved, *_) = _set_aside(models, models, key="new", keep=5)
    assert moved.name.endswith("-unknown") and (moved / "model.pth").read_bytes() == b"old"
    _fake_run(models, "20261209-000000-bbbbbb", key="same")
    assert _set_aside(models, models, key="same", keep=5) == []
    assert (models / "model.pth").exists()
    (models / "model.pth").unlink()  # outputs without a model are no run: left to be replaced
    assert _set_aside(models, models, key="new", keep=5) == [] and (models / "metrics.json").exists()


def test_outputs_in_another_output_dir_move_into_its_own_previous_folder(tmp_path):
    models, results = tmp_path / "models", tmp_path / "results"
    _fake_run(models, "20261201-000000-aaaaaa")
    results.mkdir()
    (results / "metrics.json").write_text('{"old": 1}')
    _set_aside(models, results, key="new", keep=5)
    assert (results / "previous" / "20261201-000000-aaaaaa" / "metrics.json").read_text() == '{"old": 1}'
    assert (models / "previous" / "20261201-000000-aaaaaa" / "model.pth").is_file()
    # The next run writes its outputs to a fresh folder: only the model dir has an earlier run.
    _fake_run(models, "20261202-000000-aaaaaa")
    moved = _set_aside(models, tmp_path / "fresh", key="newer", keep=5)
    assert moved == [models / "previous" / "20261202-000000-aaaaaa"]


def test_a_run_that_cannot_publish_moves_nothing(first_run, demo_pickles, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(first_run["models"], models)
    (models / "metrics.csv").unlink()
    (models / "metrics.csv").mkdir()  # publishing this run's metrics.csv must fail
    result = train(demo_pickles, models, "--learning-rate", "0.003")
    assert result.returncode == 1 and "is a directory" in result.stderr
    assert (models / "model.pth").is_file() and not (models / "previous").exists()


# --------------------------------------------------------------------------- 3. one declaration per setting
class FakeData:
    """What the fingerprint reads of a run's data."""
    sha256, num_classes, class_names, stored_size, input_size = "abc", 2, ["a", "b"], 32, 32
    split_by, device, batch_source = "site", torch.device("cpu"), "memory"


CHANGED = {"epochs": 3, "batch_size": 8, "learning_rate": 0.1, "optimizer": "sgd", "weight_decay": 0.5,
           "warmup_epochs": 2.0, "label_smoothing": 0.1, "crop_scale": 0.5, "ema_decay": 0.0,
           "class_weights": "balanced", "patience": 3, "best_epoch_by": "logloss", "arch": "resnet34",
           "weights": "none", "image_size": 64, "seed": 7, "val_fraction": 0.5, "split_by": "random", "folds": 3,
           "device": "cuda", "tta": False, "temperature_scaling": False, "data_in_memory": "stream"}


def test_every_flag_declares_whether_it_changes_results_and_those_are_all_in_the_fingerprint():
    parser = dss_train.build_parser()
    actions = [action for action in parser._actions if action.dest != "help"]
    assert all(isinstance(getattr(action, "changes_results", None), bool) for action in actions)
    results = training_args.result_settings()
    assert set(results) == set(CHANGED), "a new setting that changes results needs a changed value here"
    settings = training_args.Settings.from_args(dss_train.parse_args([]))
    context = training.distributed.Context()
    base = training.checkpoint_fingerprint(settings, FakeData(), context)
    resolved_from_data = {"split_by", "image_size", "device", "data_in_memory"}
    for name in results:
        import dataclasses

        changed = dataclasses.replace(settings, **{name: CHANGED[name]})
        data = FakeData()
        if name in resolved_from_data:  # the run's resolved value counts, not the flag
            attribute = {"split_by": "split_by", "image_size": "input_size", "device": "device",
                         "data_in_memory": "batch_source"}[name]
            setattr(data, attribute, torch.device("cuda") if name == "device" else CHANGED[name])
        fingerprint = training.checkpoint_fingerprint(changed, data, context)
        assert fingerprint[name] != base[name], name


def test_a_tta_false_checkpoint_is_not_resumed_with_tta_on(demo_pickles, tmp_path):
    ckpt, models = tmp_path / "ckpt", tmp_path / "models"
    first = train(demo_pickles, models, "--checkpoint-dir", ckpt, "--tta", "false")
    assert first.returncode == 0, first.stdout + first.stderr
    resumed = train(demo_pickles, models, "--checkpoint-dir", ckpt)
    assert resumed.returncode == 1, resumed.stdout + resumed.stderr
    assert "tta: checkpoint has False, this run has True" in resumed.stderr


# --------------------------------------------------------------------------- 4. a stop is never lost
def _signal_when(monkeypatch, module, name: str, calls: int, signum=signal.SIGTERM):
    """Send ``signum`` to this process inside the ``calls``-th call of ``module.name``."""
    original, count = getattr(module, name), {"n": 0}

    def wrapped(*args, **kwargs):
        count["n"] += 1
        if count["n"] == calls:
            os.kill(os.getpid(), signum)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


@pytest.fixture
def sagemaker_failure(tmp_path, monkeypatch):
    """As under SageMaker (its SM_* folders in tmp_path): a stopped run writes its reason to the
    failure file, whose path this returns."""
    for name, folder in (("SM_MODEL_DIR", "sm-model"), ("SM_OUTPUT_DIR", "sm-output"),
                         ("SM_OUTPUT_DATA_DIR", "sm-output/data"), ("SM_CHECKPOINT_DIR", "sm-checkpoints")):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(name, str(tmp_path / folder))
    return tmp_path / "sm-output" / "failure"


def test_sigterm_in_the_last_epochs_evaluation_stops_before_the_next_fold(
        demo_pickles, tmp_path, monkeypatch, capsys, one_cpu_thread, sagemaker_failure):
    _signal_when(monkeypatch, engine, "evaluate", calls=1)  # fold 1's only epoch
    ckpt, models = tmp_path / "ckpt", tmp_path / "models"
    code = dss_train.main(["--data-dir", str(demo_pickles), "--model-dir", str(models), "--checkpoint-dir",
                           str(ckpt), "--folds", "2", *COMMON])
    captured = capsys.readouterr()
    assert code == 128 + signal.SIGTERM, captured.out + captured.err
    assert "fold 2/2 epoch" not in captured.out
    assert "stopped by SIGTERM after fold 1/2 epoch 1" in captured.err
    assert "stopped by SIGTERM" in sagemaker_failure.read_text()
    assert list((ckpt / "fold-1").glob("ckpt-*.json")) and not (models / "model.pth").exists()


def test_sigterm_in_the_epoch_that_triggers_patience_is_not_lost(
        demo_pickles, tmp_path, monkeypatch, capsys, one_cpu_thread):
    _signal_when(monkeypatch, engine, "evaluate", calls=2)
    code = dss_train.main(["--data-dir", str(demo_pickles), "--model-dir", str(tmp_path / "models"),
                           *COMMON, "--epochs", "3", "--patience", "1", "--learning-rate", "1e-9"])
    captured = capsys.readouterr()
    assert code == 128 + signal.SIGTERM, captured.out + captured.err
    assert "stopped by SIGTERM after epoch 2; nothing saved: no --checkpoint-dir was given" in captured.err


@pytest.mark.parametrize("module, name, phase", [
    (training_data, "fingerprint", "while loading the data"),
    (finishing, "close_member", "after training (test predictions made)"),
    (outputs, "write_all_outputs", "after writing every output"),
], ids=["loading", "test-prediction", "writing-outputs"])
def test_sigterm_outside_the_epoch_loop_exits_143_with_its_reason(
        module, name, phase, demo_pickles, tmp_path, monkeypatch, capsys, one_cpu_thread, sagemaker_failure):
    _signal_when(monkeypatch, module, name, calls=1)
    code = dss_train.main(["--data-dir", str(demo_pickles), "--model-dir", str(tmp_path / "models"), *COMMON])
    captured = capsys.readouterr()
    assert code == 128 + signal.SIGTERM, captured.out + captured.err
    assert f"stopped by SIGTERM {phase}" in captured.err
    assert "Traceback" not in captured.err
    assert f"stopped by SIGTERM {phase}" in sagemaker_failure.read_text()


def test_sigterm_in_predict_only_writes_no_predictions(first_run, demo_pickles, tmp_path, monkeypatch, capsys,
                                                        one_cpu_thread):
    models = tmp_path / "models"
    shutil.copytree(first_run["models"], models)
    _signal_when(monkeypatch, prediction, "predict_ensemble_probs", calls=1)
    code = dss_train.main(["--data-dir", str(demo_pickles), "--model-dir", str(models), "--predict-only",
                           "--num-threads", "1"])
    captured = capsys.readouterr()
    assert code == 128 + signal.SIGTERM, captured.out + captured.err
    assert "no predictions written" in captured.err
    assert not (models / "predictions").exists()


# --------------------------------------------------------------------------- 5. resume: memory mode, device
def test_the_data_fingerprint_is_the_same_loaded_or_streamed(demo_shards):
    loaded = training_data.dataset.load_split(demo_shards, "train")
    streamed = training_data.streaming.scan_split(demo_shards, "train")
    assert training_data.fingerprint(loaded) == training_data.fingerprint(streamed)


def test_a_streamed_checkpoint_resumes_with_auto_and_another_mode_is_refused_with_the_flag_to_use(
        demo_shards, tmp_path):
    ckpt, models = tmp_path / "ckpt", tmp_path / "models"
    first = train(demo_shards, models, "--checkpoint-dir", ckpt, "--data-in-memory", "stream")
    assert first.returncode == 0, first.stdout + first.stderr
    resumed = train(demo_shards, models, "--checkpoint-dir", ckpt)  # auto: enough memory for 'device' now
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "images in memory: stream, as the checkpoints" in resumed.stdout and "resuming from" in resumed.stdout
    refused = train(demo_shards, models, "--checkpoint-dir", ckpt, "--data-in-memory", "device")
    assert refused.returncode == 1
    assert "data_in_memory: checkpoint has 'stream', this run has 'memory'" in refused.stderr
    assert "re-run with --data-in-memory stream" in refused.stderr
    assert "dataset_sha256" not in refused.stderr


def test_a_checkpoint_from_another_device_and_precision_is_refused_naming_both(tmp_path):
    manager = checkpoint.CheckpointManager(tmp_path, keep=1, log=lambda line: None)
    made = {"dataset_sha256": "abc", "device": "cuda", "precision": "bfloat16", "epochs": 2}
    manager.save({"model": {}}, epoch=1, step=10, fingerprint=made)
    here = dict(made, device="cpu", precision="float32")
    with pytest.raises(checkpoint.CheckpointMismatchError) as error:
        manager.load_latest(here)
    text = str(error.value)
    assert "device: checkpoint has 'cuda', this run has 'cpu'" in text
    assert "precision: checkpoint has 'bfloat16', this run has 'float32'" in text
    assert "--device cuda" in text


# --------------------------------------------------------------------------- 6. the reported objective
def test_the_final_metrics_line_reports_the_served_log_loss(first_run):
    models, stdout = first_run["models"], first_run["stdout"]
    final = [line for line in stdout.splitlines() if line.startswith("[METRICS] best_epoch=")][-1]
    served = float(re.search(r"\bserved_val_logloss=([0-9.]+)", final).group(1))
    calibrated = float(re.search(r"\bbest_val_logloss_calibrated=([0-9.]+)", final).group(1))
    metrics = json.loads((models / "metrics.json").read_text())
    assert served == pytest.approx(metrics["calibration"]["logloss_after"], abs=1e-4)
    assert calibrated == pytest.approx(metrics["best"]["val_logloss_calibrated"], abs=1e-4)
    frame = pd.read_csv(models / "metrics.csv")
    assert "val_logloss_calibrated" in frame.columns
    epoch_lines = [line for line in stdout.splitlines() if line.startswith("[METRICS] epoch=")]
    assert all("val_logloss_calibrated=" in line for line in epoch_lines)


def test_kfold_runs_report_the_same_served_figure(kfold_run):
    models, output = kfold_run["models"], kfold_run["stdout"]
    assert "--val-fraction 0.3 is unused with --folds 2" in output
    assert "split by site:" not in output  # only the folds are logged
    assert re.search(r"model\.pth: 2 member\(s\), about \d+ MB", output)
    final = [line for line in output.splitlines() if line.startswith("[METRICS] cv_logloss=")][-1]
    served = float(re.search(r"\bserved_val_logloss=([0-9.]+)", final).group(1))
    cv = json.loads((models / "metrics.json").read_text())["cv"]
    assert served == pytest.approx(cv["logloss"], abs=1e-4)


def test_mlflow_run_names_tell_runs_into_one_model_dir_apart():
    settings = training_args.Settings.from_args(dss_train.parse_args(["--model-dir", "./models", "--epochs", "3"]))
    first, second = training.run_name(settings, "20261208-010000-aaaaaa"), training.run_name(
        settings, "20261208-020000-bbbbbb")
    assert first != second and first.startswith("models resnet18 e3 ")


# --------------------------------------------------------------------------- 10. fail before the work
def test_an_unreadable_preprocessing_summary_fails_before_training(demo_pickles, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_pickles, data)
    (data / "preprocessing_summary.json").write_text("{ not json")
    result = train(data, tmp_path / "models")
    assert result.returncode == 1
    assert "preprocessing_summary.json: unreadable preprocessing summary" in result.stderr
    assert "epoch 1/" not in result.stdout


def test_auto_refuses_to_stream_a_resume_whose_checkpoints_were_made_in_memory(tmp_path, monkeypatch):
    """Free host memory cannot be made short here: the reading of it is replaced by a small number."""
    manager = checkpoint.CheckpointManager(tmp_path, keep=1, log=lambda line: None)
    manager.save({"model": {}}, epoch=1, step=10, fingerprint={"data_in_memory": "memory"})
    monkeypatch.setattr(training_data.streaming, "available_host_bytes", lambda: 1 << 20)
    with pytest.raises(training_data.dataset.DatasetError) as error:
        training_data.choose_memory_mode("auto", 1 << 30, tmp_path)
    assert "made with the images in memory" in str(error.value) and "--data-in-memory device" in str(error.value)
    assert training_data.choose_memory_mode("auto", 1 << 30, None) == "stream"  # no checkpoints: streamed


# --------------------------------------------------------------------------- 12. what a new user tripped over
def test_a_data_dir_of_raw_images_suggests_a_separate_output_folder(demo_data, tmp_path):
    result = train(demo_data, tmp_path / "models")
    assert result.returncode == 1
    assert f"{demo_data} holds raw images: preprocess them into a separate folder" in result.stderr
    assert f"--input {demo_data} --output-dir ./output" in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"--output-dir {empty} first"):
        training_data.dataset.find_split_files(empty, "train")
