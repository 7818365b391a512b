"""dss_train.py end to end, as real subprocesses on the demo pickles (32 px, CPU, --weights none).

One uninterrupted 2-epoch run (module fixture) is the reference for the output contracts and for
the resume tests (SIGKILL after the first checkpoint, SIGTERM mid-run), which must end with the
same epoch history and the same test predictions.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import re
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import dss_train
from dss.models import backbones
from dss.data import agreement, dataset
from dss.train import engine, training, training_args, training_data
from dss import stopping, threads
from dss.models import model as model_lib
from dss.predict import results
from tests.conftest import PYTHON, REPO_ROOT, clean_env, run_script

# Same thread count everywhere: CPU results are bit-identical only for a fixed thread count.
COMMON = ["--epochs", "2", "--batch-size", "16", "--weights", "none", "--num-threads", "1", "--seed", "0"]
EPOCH_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_logloss", "val_acc", "lr", "epoch_seconds",
                 "train_images_per_s", "val_logloss_calibrated"]
TRAJECTORY = ["epoch", "train_loss", "train_acc", "val_loss", "val_logloss", "val_acc", "lr"]  # not timings
# What a SageMaker estimator's metric_definitions would use (one regex per metric).
METRIC_REGEXES = {name: re.compile(rf"\[METRICS\] .*\b{name}=([0-9.]+)")
                  for name in ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_logloss")}
LINE_RE = re.compile(r"^\[METRICS\] epoch=\d+ train_loss=\d+\.\d{4} train_acc=\d+\.\d{4} val_loss=\d+\.\d{4} "
                     r"val_acc=\d+\.\d{4} val_logloss=\d+\.\d{4} val_logloss_calibrated=\d+\.\d{4}$")


def train(data_dir, model_dir, *extra, env=None, timeout=600):
    return run_script("dss_train.py", ["--data-dir", data_dir, "--model-dir", model_dir, *COMMON, *extra],
                      env=env, timeout=timeout)


def trajectory(metrics_csv: Path) -> list[dict]:
    frame = pd.read_csv(metrics_csv)
    return frame[TRAJECTORY].to_dict("records")


@pytest.fixture(scope="module")
def reference(demo_pickles, tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    result = train(demo_pickles, root / "models", "--checkpoint-dir", root / "ckpt")
    assert result.returncode == 0, result.stdout + result.stderr
    return {"models": root / "models", "ckpt": root / "ckpt", "stdout": result.stdout}


# --------------------------------------------------------------------------- output contracts
def test_every_output_is_written_with_the_contract_columns(reference):
    models = reference["models"]
    for name in ("model.pth", "config.json", "metrics.json", "metrics.csv", "splits.csv", "val_predictions.csv",
                 "test_predictions.csv", "predictions.csv", "training_curves.png", "confusion_matrix.png",
                 "site_metrics.csv", "calibration.png", "top_losses.png"):
        assert (models / name).is_file(), name
    assert not list(models.glob(".*.tmp"))
    assert list(pd.read_csv(models / "metrics.csv").columns) == EPOCH_COLUMNS
    assert list(pd.read_csv(models / "splits.csv").columns) == ["id", "site", "split"]
    artifact = torch.load(models / "model.pth", weights_only=True)
    class_names = artifact["class_names"]
    assert list(pd.read_csv(models / "val_predictions.csv").columns) == ["id", "site", "label", *class_names]
    assert list(pd.read_csv(models / "test_predictions.csv").columns) == ["id", *class_names]
    assert artifact["preprocessing"]["image_size"] == 32 and artifact["preprocessing"]["stored_image_size"] == 32

    report = json.loads((models / "metrics.json").read_text())
    assert set(report) == {"epochs", "best", "test", "calibration"}
    assert [row["epoch"] for row in report["epochs"]] == [1, 2]
    # metrics.json epochs: the contract fields with the calibrated log loss, then the per-class report.
    with_calibrated = EPOCH_COLUMNS[:5] + ["val_logloss_calibrated"] + EPOCH_COLUMNS[5:-1]
    assert all(list(row) == with_calibrated + ["per_class"] for row in report["epochs"])
    num_val = int((pd.read_csv(models / "splits.csv")["split"] == "val").sum())
    for row in report["epochs"]:
        assert [entry["class"] for entry in row["per_class"]] == class_names
        for entry in row["per_class"]:
            assert set(entry) == {"class", "precision", "recall", "f1", "support"}
            assert all(0.0 <= entry[key] <= 1.0 for key in ("precision", "recall", "f1"))
        assert sum(entry["support"] for entry in row["per_class"]) == num_val
    assert report["best"]["epoch"] in (1, 2)
    assert report["best"]["val_logloss"] == min(row["val_logloss"] for row in report["epochs"])
    assert report["best"]["per_class"] == report["epochs"][report["best"]["epoch"] - 1]["per_class"]
    assert report["test"]["num_images"] == 40

    config = json.loads((models / "config.json").read_text())
    for key in ("epochs", "batch_size", "learning_rate", "optimizer", "weights", "seed", "val_fraction", "split_by",
                "image_size", "device", "precision", "torch_version", "data_sha256", "checkpoint_dir"):
        assert key in config, key
    assert config["split_by"] == "site" and config["device"] == "cpu" and config["precision"] == "float32"
    flags = list(vars(dss_train.parse_args([])))
    assert list(config)[:len(flags)] == flags  # every flag in the parser's order, then what the run resolved
    assert config["epochs"] == 2 and config["batch_size"] == 16
    assert config["num_threads"] == 1 and config["keep_checkpoints"] == 1  # --num-threads as given


def test_val_logloss_recomputed_from_val_predictions(reference):
    models = reference["models"]
    frame = pd.read_csv(models / "val_predictions.csv")
    class_names = list(frame.columns[3:])
    probs = frame[class_names].to_numpy()
    truth = frame["label"].map({name: index for index, name in enumerate(class_names)}).to_numpy()
    clipped = np.clip(probs, 1e-15, 1 - 1e-15)
    clipped /= clipped.sum(axis=1, keepdims=True)
    recomputed = -np.mean(np.log(clipped[np.arange(len(truth)), truth]))
    report = json.loads((models / "metrics.json").read_text())
    best = report["best"]
    # val_predictions.csv holds the calibrated probabilities; "best" scores the epoch's own (T = 1).
    assert recomputed == pytest.approx(report["calibration"]["logloss_after"], rel=1e-9)
    assert report["calibration"]["logloss_before"] == pytest.approx(best["val_logloss"], rel=1e-9)
    assert np.mean(probs.argmax(axis=1) == truth) == pytest.approx(best["val_acc"])
    # The best epoch's per-class report, recomputed from the same predictions.
    predicted = probs.argmax(axis=1)
    for index, entry in enumerate(best["per_class"]):
        true_positive = np.sum((predicted == index) & (truth == index))
        assert entry["support"] == np.sum(truth == index)
        assert entry["recall"] == pytest.approx(true_positive / max(np.sum(truth == index), 1))
        assert entry["precision"] == pytest.approx(true_positive / max(np.sum(predicted == index), 1))
    # The validation rows are exactly the "val" rows of splits.csv.
    splits = pd.read_csv(models / "splits.csv")
    assert set(frame["id"]) == set(splits.loc[splits["split"] == "val", "id"])


def test_split_keeps_every_site_on_one_side(reference, demo_data):
    splits = pd.read_csv(reference["models"] / "splits.csv", dtype=str, keep_default_na=False)
    assert set(splits["split"]) == {"train", "val"}
    sides_per_site = splits.groupby("site")["split"].nunique()
    assert (sides_per_site == 1).all(), sides_per_site[sides_per_site > 1]
    train_ids = pd.read_csv(demo_data / "train_features.csv", dtype=str)["id"]
    assert sorted(splits["id"]) == sorted(train_ids)


def test_test_predictions_one_row_per_id_in_csv_order(reference, demo_data):
    predictions = pd.read_csv(reference["models"] / "test_predictions.csv", dtype={"id": str})
    expected_ids = pd.read_csv(demo_data / "test_features.csv", dtype=str)["id"].tolist()
    assert predictions["id"].tolist() == expected_ids
    sums = predictions.iloc[:, 1:].to_numpy().sum(axis=1)
    np.testing.assert_allclose(sums, 1.0, atol=1e-9)
    assert (predictions.iloc[:, 1:].to_numpy() > 0).all()


def test_metrics_lines_parse_with_the_metric_regexes(reference):
    lines = [line for line in reference["stdout"].splitlines() if line.startswith("[METRICS] epoch=")]
    assert len(lines) == 2
    # One more line at the end: the best epoch's scores, the objective of a SageMaker tuning job.
    best_lines = [line for line in reference["stdout"].splitlines() if line.startswith("[METRICS] best_epoch=")]
    metric_lines = [line for line in reference["stdout"].splitlines() if line.startswith("[METRICS]")]
    assert len(best_lines) == 1 and metric_lines[-1] == best_lines[0]
    best = json.loads((reference["models"] / "metrics.json").read_text())["best"]
    tuner_regex = re.compile(r"\[METRICS\] .*\bbest_val_logloss=([0-9.]+)")
    assert float(tuner_regex.search(best_lines[0]).group(1)) == pytest.approx(best["val_logloss"], abs=1e-4)
    per_epoch_regex = re.compile(r"\[METRICS\] .*\bval_logloss=([0-9.]+)")  # the docs' per-epoch regex
    assert all(per_epoch_regex.search(line) for line in lines) and not per_epoch_regex.search(best_lines[0])
    per_class_lines = [line for line in reference["stdout"].splitlines() if line.startswith("per-class F1: ")]
    assert len(per_class_lines) == 2 and "antelope_duiker 0." in per_class_lines[0], per_class_lines
    assert all(LINE_RE.match(line) for line in lines), lines
    table = pd.read_csv(reference["models"] / "metrics.csv")
    for index, line in enumerate(lines):
        values = {name: float(regex.search(line).group(1)) for name, regex in METRIC_REGEXES.items()}
        assert values["epoch"] == index + 1
        for name in ("train_loss", "train_acc", "val_loss", "val_acc", "val_logloss"):
            assert values[name] == pytest.approx(round(table[name][index], 4), abs=1e-9), name


# --------------------------------------------------------------------------- resume
def _wait_for_checkpoint(process: subprocess.Popen, folder: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list(folder.glob("ckpt-*.json")):
            return
        if process.poll() is not None:
            raise AssertionError(f"run ended (rc {process.returncode}) before its first checkpoint: "
                                 + process.stdout.read() + process.stderr.read())
        time.sleep(0.05)
    process.kill()
    raise AssertionError("no checkpoint appeared")


def _start(data_dir, model_dir, ckpt_dir, *extra):
    command = [PYTHON, str(REPO_ROOT / "dss_train.py"), "--data-dir", str(data_dir), "--model-dir", str(model_dir),
               "--checkpoint-dir", str(ckpt_dir), *COMMON, *extra]
    return subprocess.Popen(command, env=clean_env(), cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _assert_same_run(reference_models: Path, models: Path) -> None:
    ours, theirs = trajectory(models / "metrics.csv"), trajectory(reference_models / "metrics.csv")
    assert [row["epoch"] for row in ours] == [row["epoch"] for row in theirs] == [1, 2]  # no duplicated epochs
    for mine, reference_row in zip(ours, theirs):
        # Exact on CPU in practice; an interrupted epoch's train_loss is re-summed from its parts (float64).
        assert mine == pytest.approx(reference_row, rel=1e-12, abs=1e-15)
    ours = pd.read_csv(models / "test_predictions.csv")
    theirs = pd.read_csv(reference_models / "test_predictions.csv")
    assert ours["id"].tolist() == theirs["id"].tolist()
    np.testing.assert_allclose(ours.iloc[:, 1:].to_numpy(), theirs.iloc[:, 1:].to_numpy(), rtol=0, atol=1e-12)


def test_resume_after_sigkill_gives_the_uninterrupted_history(reference, demo_pickles, tmp_path):
    ckpt, models = tmp_path / "ckpt", tmp_path / "models"
    process = _start(demo_pickles, models, ckpt)
    _wait_for_checkpoint(process, ckpt)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert not (models / "model.pth").exists()
    result = train(demo_pickles, models, "--checkpoint-dir", ckpt)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resuming from" in result.stdout
    _assert_same_run(reference["models"], models)
    assert len(list(ckpt.glob("ckpt-*.pt"))) == 1  # --keep-checkpoints 1 by default


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "ctrl-c"])
def test_a_stop_signal_saves_a_checkpoint_exits_nonzero_and_resumes(signum, reference, demo_pickles, tmp_path):
    """SIGTERM (spot interruption) and Ctrl-C: save at the next step, exit 128 + the signal's number
    with one line saying how to resume, and the resumed run ends as the uninterrupted one."""
    ckpt, models = tmp_path / "ckpt", tmp_path / "models"
    process = _start(demo_pickles, models, ckpt)
    _wait_for_checkpoint(process, ckpt)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stdout + stderr
    assert dss_train.SIGTERM_EXIT_CODE == 128 + signal.SIGTERM
    line = _one_line(stderr)
    newest = max(ckpt.glob("ckpt-*.pt"))
    state = torch.load(newest, weights_only=True)
    name = stopping.SIGNAL_NAMES[signum]
    if f"stopped by {name} after epoch 1;" in line:
        # The signal came between epoch 1's checkpoint and epoch 2's first step: the run-wide stop
        # flag took it there, at the epoch's end (nothing of epoch 2 was trained).
        assert "re-run with the same --checkpoint-dir to resume" in line and state["step_in_epoch"] == 0
    else:
        assert f"stopped by {name} in epoch 2" in line
        assert "checkpoint saved, re-run with the same --checkpoint-dir to resume" in line
        assert state["step_in_epoch"] > 0  # saved mid-epoch, at the next step after the signal
    result = train(demo_pickles, models, "--checkpoint-dir", ckpt)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resuming from {newest}" in result.stdout
    _assert_same_run(reference["models"], models)


def test_incompatible_checkpoint_is_refused(reference, demo_pickles, tmp_path):
    result = train(demo_pickles, tmp_path / "models", "--checkpoint-dir", reference["ckpt"], "--learning-rate", "0.01")
    assert result.returncode == 1
    assert "learning_rate: checkpoint has 0.001, this run has 0.01" in result.stderr
    assert "new --checkpoint-dir" in result.stderr
    assert not (tmp_path / "models" / "model.pth").exists()


# --------------------------------------------------------------------------- predict only
def test_predict_only_reproduces_the_test_predictions(reference, demo_pickles, tmp_path):
    result = run_script("dss_train.py", ["--data-dir", demo_pickles, "--model-dir", reference["models"],
                                         "--output-dir", tmp_path, "--predict-only", "--num-threads", "1"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["predictions.csv", "predictions_info.json",
                                                                "test_predictions.csv"]
    ours = pd.read_csv(tmp_path / "test_predictions.csv")
    theirs = pd.read_csv(reference["models"] / "test_predictions.csv")
    assert ours["id"].tolist() == theirs["id"].tolist()
    # The same calibrated probabilities: predict-only applies the temperature stored in model.pth.
    temperature = torch.load(reference["models"] / "model.pth", weights_only=True)["hyperparameters"]["temperature"]
    assert temperature != 1.0
    assert json.loads((tmp_path / "predictions_info.json").read_text())["temperature"] == temperature
    np.testing.assert_allclose(ours.iloc[:, 1:].to_numpy(), theirs.iloc[:, 1:].to_numpy(), rtol=0, atol=1e-9)


def test_predict_only_resizes_data_of_another_image_size_and_refuses_another_resize_policy(reference, demo_pickles,
                                                                                             tmp_path):
    """Data stored at another size is resized to the network input (upsampled here: a warning);
    another resize policy cannot be made equal and is refused (was: any other size refused)."""
    test = dataset.load_file(demo_pickles / "test_data.pkl")
    test["images"] = np.ascontiguousarray(test["images"][:, ::2, ::2])
    test["info"]["image_size"] = 16
    (tmp_path / "test_data.pkl").write_bytes(pickle.dumps(dataset.validate(test), protocol=dataset.PICKLE_PROTOCOL))
    result = run_script("dss_train.py", ["--data-dir", tmp_path, "--model-dir", reference["models"],
                                         "--output-dir", tmp_path / "out", "--predict-only", "true", "--num-threads", "1"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "stores images at 16 px, the model was trained on 32 px: resizing them to its 32 px input" in result.stdout
    assert "warning: the 16 px images are upsampled to 32 px" in result.stdout
    info = json.loads((tmp_path / "out" / "predictions_info.json").read_text())
    assert info["image_sizes"] == {"stored": 16, "model_stored": 32, "network_input": 32, "resized": True,
                                   "upsampled": True}
    assert len(pd.read_csv(tmp_path / "out" / "predictions.csv")) == len(test["ids"])
    test["info"]["resize_policy"] = "crop"
    (tmp_path / "test_data.pkl").write_bytes(pickle.dumps(dataset.validate(test), protocol=dataset.PICKLE_PROTOCOL))
    refused = run_script("dss_train.py", ["--data-dir", tmp_path, "--model-dir", reference["models"],
                                          "--output-dir", tmp_path / "out2", "--predict-only", "true"])
    assert refused.returncode == 1
    assert "resize policy is 'crop'" in refused.stderr and "model.pth" in refused.stderr
    assert "16 px" not in refused.stderr  # the size is no longer a reason to refuse
    assert not (tmp_path / "out2" / "test_predictions.csv").exists()


def test_one_agreement_check_for_train_test_and_model_test():
    """Training (train vs test split) and --predict-only (model vs test split) refuse the same mismatches."""
    train = {"images": np.zeros((2, 32, 32, 3), np.uint8), "info": {"resize_policy": "squash"}, "class_names": ["a", "b"]}
    test = {"images": np.zeros((1, 16, 16, 3), np.uint8), "info": {"resize_policy": "crop"}, "class_names": ["b", "a"]}
    with pytest.raises(dataset.DatasetError) as error:
        agreement.check_agreement(test, agreement.preprocessing_of(train), "d (test)", "d (train)")
    message = str(error.value)
    assert message.startswith("d (test) does not match d (train): ")
    assert "stored at 16 px but d (train) has 32 px images (re-run preprocess.py with --image-size 32)" in message
    assert "resize policy is 'crop' but d (train) has 'squash'" in message
    assert "class names are ['b', 'a'] but d (train) has ['a', 'b']" in message
    # An unlabelled split without class names, or a pickle without a resize policy, passes on those points.
    unlabelled = {"images": np.zeros((1, 32, 32, 3), np.uint8), "info": {}, "class_names": []}
    agreement.check_agreement(unlabelled, agreement.preprocessing_of(train), "d (test)", "d (train)")


def test_predict_only_without_a_model_is_a_clear_error(demo_pickles, tmp_path):
    result = run_script("dss_train.py", ["--data-dir", demo_pickles, "--model-dir", tmp_path, "--predict-only", "1"])
    assert result.returncode == 1
    assert "model.pth" in result.stderr


# --------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("text, expected", [("True", True), ("true", True), ("1", True),
                                            ("False", False), ("false", False), ("0", False)])
def test_boolean_flags_accept_sagemaker_spellings(text, expected):
    args = dss_train.parse_args(["--predict-only", text, "--tta", text, "--compile", text])
    assert args.predict_only is expected and args.tta is expected and args.compile is expected


def test_bare_predict_only_flag_and_defaults():
    args = dss_train.parse_args(["--predict-only"])
    assert args.predict_only is True
    defaults = dss_train.parse_args([])
    assert (defaults.epochs, defaults.weights, defaults.val_fraction, defaults.optimizer) == (10, "imagenet", None, "adamw")
    assert training_args.Settings.from_args(defaults).val_fraction == 0.25  # resolved: None says "not given"
    assert defaults.predict_only is False and defaults.split_by is None and defaults.checkpoint_dir is None
    # The prototype's command line keeps working.
    old = dss_train.parse_args("--data-dir ./output --model-dir ./models --epochs 10 --batch-size 32 "
                               "--learning-rate 0.001".split())
    assert (old.data_dir, old.model_dir, old.epochs, old.batch_size, old.learning_rate) == \
        ("./output", "./models", 10, 32, 0.001)


@pytest.mark.parametrize("argv", [["--bogus", "1"], ["--batch_size", "8"], ["--tta", "maybe"], ["--epochs", "0"],
                                  ["--val-fraction", "1.5"]])
def test_bad_arguments_are_errors(argv, capsys):
    with pytest.raises(SystemExit) as error:
        dss_train.parse_args(argv)
    assert error.value.code == 2


def test_settings_keep_every_flag_in_the_parsers_order():
    """config.json lists the flags in the parser's order: the settings object must mirror it."""
    args = dss_train.parse_args(["--weights", "none"])
    settings = training_args.Settings.from_args(args)
    assert list(settings.flags()) == list(vars(args))
    assert dss_train.build_parser()._option_string_actions["--optimizer"].choices == engine.OPTIMIZERS
    fingerprint_settings = settings.recipe({"split_by": "site"})
    assert list(fingerprint_settings) == ["epochs", "batch_size", "learning_rate", "optimizer", "weight_decay",
                                          "warmup_epochs", "label_smoothing", "crop_scale", "ema_decay",
                                          "class_weights", "patience", "best_epoch_by", "arch", "weights",
                                          "image_size", "seed", "val_fraction", "split_by", "folds", "device", "tta",
                                          "temperature_scaling", "data_in_memory"]
    assert fingerprint_settings["split_by"] == "site"


def test_help_explains_every_flag_with_its_default():
    result = run_script("dss_train.py", ["--help"])
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for flag in ("--data-dir", "--model-dir", "--output-dir", "--checkpoint-dir", "--epochs", "--batch-size",
                 "--learning-rate", "--optimizer", "--weight-decay", "--warmup-epochs", "--label-smoothing",
                 "--class-weights", "--predict-only", "--weights", "--image-size", "--seed", "--val-fraction",
                 "--split-by", "--device", "--compile", "--patience", "--tta", "--eval-batch-size", "--num-threads",
                 "--keep-checkpoints", "--overwrite", "--arch", "--ema-decay", "--temperature-scaling"):
        assert flag in text, flag
    assert "SM_CHANNEL_TRAINING" in text and "(default: 10)" in text and "px" in text


# --------------------------------------------------------------------------- failures
def _copy_test_pickle(demo_pickles: Path, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "test_data.pkl").write_bytes((demo_pickles / "test_data.pkl").read_bytes())


def test_tampered_pickle_is_refused_without_running_code(demo_pickles, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    data_dir = tmp_path / "data"
    _copy_test_pickle(demo_pickles, data_dir)
    (data_dir / "train_data.pkl").write_bytes(pickle.dumps({"images": Evil()}, protocol=5))
    result = train(data_dir, tmp_path / "models")
    assert result.returncode == 1
    assert "forbidden" in result.stderr and "train_data.pkl" in result.stderr
    assert not marker.exists()
    assert not (tmp_path / "models" / "model.pth").exists()


def test_truncated_pickle_says_rerun_preprocess(demo_pickles, tmp_path):
    data_dir = tmp_path / "data"
    _copy_test_pickle(demo_pickles, data_dir)
    whole = (demo_pickles / "train_data.pkl").read_bytes()
    (data_dir / "train_data.pkl").write_bytes(whole[: len(whole) // 2])
    result = train(data_dir, tmp_path / "models")
    assert result.returncode == 1
    assert "re-run preprocess" in result.stderr.lower() and "Traceback" not in result.stderr


def test_imagenet_weights_without_network_name_the_alternatives(demo_pickles, tmp_path):
    # An empty torchvision cache and a proxy that refuses connections: the download must fail fast.
    env = clean_env(TORCH_HOME=str(tmp_path / "torch-home"), https_proxy="http://127.0.0.1:9",
                    HTTPS_PROXY="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")
    args = ["--data-dir", demo_pickles, "--model-dir", tmp_path / "models", "--weights", "imagenet", "--epochs", "1"]
    result = run_script("dss_train.py", args, env=env, timeout=180)
    assert result.returncode == 1
    assert "--weights none" in result.stderr and "--weights PATH" in result.stderr
    assert not (tmp_path / "models" / "model.pth").exists()


def test_non_finite_loss_stops_with_the_step_and_writes_nothing(demo_pickles, tmp_path):
    result = train(demo_pickles, tmp_path / "models", "--learning-rate", "1e30", "--warmup-epochs", "0",
                   "--optimizer", "sgd", "--checkpoint-dir", tmp_path / "ckpt")
    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(r"non-finite loss at epoch \d+, step \d+", result.stderr), result.stderr
    assert not (tmp_path / "models" / "model.pth").exists()
    for path in (tmp_path / "ckpt").glob("ckpt-*.pt"):
        state = torch.load(path, weights_only=True)
        assert all(torch.isfinite(tensor).all() for tensor in state["model"].values() if tensor.is_floating_point())


def test_imagenet_download_from_a_silent_network_times_out(tmp_path, monkeypatch):
    """A proxy that accepts and never answers (packets dropped): the download must not hang."""
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        proxy = f"http://127.0.0.1:{silent.getsockname()[1]}"
        for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
            monkeypatch.setenv(name, proxy)
        monkeypatch.setenv("TORCH_HOME", str(tmp_path))
        with pytest.raises(model_lib.WeightsError, match="--weights none"):
            training.build_network(3, training_args.Settings.from_args(dss_train.parse_args([])), download_timeout_s=1.0)
    assert socket.getdefaulttimeout() is None


def test_image_skipped_by_preprocess_still_gets_a_row_with_the_class_prior(reference, demo_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    features = pd.read_csv(data / "test_features.csv", dtype=str)
    broken_id = features["id"][2]
    broken = data / features["filepath"][2]
    broken.write_bytes(broken.read_bytes()[:100])  # a truncated JPEG: preprocess skips and records it
    result = run_script("preprocess.py", ["--input", data, "--output-dir", tmp_path / "pickles", "--image-size", "32"])
    assert result.returncode == 0, result.stdout + result.stderr
    result = run_script("dss_train.py", ["--data-dir", tmp_path / "pickles", "--model-dir", reference["models"],
                                         "--output-dir", tmp_path / "out", "--predict-only"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert broken_id in result.stdout and "class prior" in result.stdout
    predictions = pd.read_csv(tmp_path / "out" / "test_predictions.csv", dtype={"id": str})
    assert predictions["id"].tolist() == features["id"].tolist()
    prior = torch.load(reference["models"] / "model.pth", weights_only=True)["preprocessing"]["class_prior"]
    np.testing.assert_allclose(predictions.iloc[2, 1:].to_numpy(dtype=float), prior, atol=1e-12)
    np.testing.assert_allclose(predictions.iloc[:, 1:].to_numpy().sum(axis=1), 1.0, atol=1e-9)
    # predictions.csv says which row is the prior, and why, and keeps the site test_features.csv gives it.
    readable = pd.read_csv(tmp_path / "out" / "predictions.csv", dtype=str, keep_default_na=False)
    assert list(readable.columns[:5]) == ["id", "site", "predicted_class", "probability", "status"]
    assert list(readable.columns[5:]) == list(predictions.columns[1:])
    row = readable.set_index("id").loc[broken_id]
    summary = json.loads((tmp_path / "pickles" / "preprocessing_summary.json").read_text())
    (entry,) = summary["splits"]["test"]["skipped"]
    assert row["status"] == f"skipped: {entry['reason']}" and row["site"] == features["site"][2] != ""
    assert entry["site"] == features["site"][2]
    assert (readable["status"] == "predicted").sum() == len(features) - 1


def test_skip_entries_without_a_site_from_older_summaries_give_an_empty_site(tmp_path):
    """A preprocessing summary written before skip entries carried the site still works: site ''."""
    summary = {"splits": {"test": {"skipped": [{"key": "test_features/b.jpg", "id": "b", "reason": "undecodable",
                                                "message": "truncated", "csv_row": 1}]}}}
    (tmp_path / "preprocessing_summary.json").write_text(json.dumps(summary))
    test = {"ids": ["a", "c"], "sites": ["S1", "S2"], "meta": {"csv_row": np.array([0, 2])}}
    paths = (tmp_path / "test_predictions.csv", tmp_path / "predictions.csv")
    probs = np.array([[0.9, 0.1], [0.2, 0.8]])
    info = results.write_test_predictions(paths, tmp_path, test, probs, np.array([0.5, 0.5]), ["x", "y"])
    assert info["filled_with_prior"] == ["b"]
    readable = pd.read_csv(paths[1], dtype=str, keep_default_na=False)
    assert readable[["id", "site", "status"]].values.tolist() == [
        ["a", "S1", "predicted"], ["b", "", "skipped: undecodable"], ["c", "S2", "predicted"]]


# --------------------------------------------------------------------------- re-runs and train-only data
def _files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


def test_train_only_data_trains_and_replaces_the_previous_runs_outputs(reference, demo_pickles, tmp_path):
    """preprocess may write train data only: training goes on, without test predictions; a run into
    a model dir holding an earlier run (other data) moves that run aside, its test_predictions.csv with it."""
    data, models = tmp_path / "data", tmp_path / "models"
    data.mkdir()
    shutil.copy(demo_pickles / "train_data.pkl", data / "train_data.pkl")
    shutil.copytree(reference["models"], models)
    before = _files(models)
    result = run_script("dss_train.py", ["--data-dir", data, "--model-dir", models, *COMMON[2:], "--epochs", "1"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"no test_data.pkl in {data}" in result.stdout
    earlier = models / "previous" / json.loads((reference["models"] / "config.json").read_text())["run_id"]
    assert f"was moved to {earlier}" in result.stdout
    assert not (models / "test_predictions.csv").exists() and (earlier / "test_predictions.csv").is_file()
    report = json.loads((models / "metrics.json").read_text())
    assert report["test"] == {"skipped": f"no test_data.pkl in {data}"}
    assert [row["epoch"] for row in report["epochs"]] == [1] and "per_class" in report["epochs"][0]
    after = _files(models)
    for name in ("model.pth", "config.json", "metrics.json", "metrics.csv", "training_curves.png"):
        assert after[name] != before[name], name
    assert torch.load(models / "model.pth", weights_only=True)["hyperparameters"]["epochs"] == 1
    assert json.loads((models / "config.json").read_text())["num_test_images"] == 0
    assert not [path.name for path in models.iterdir() if path.name.startswith(".")]
    assert _files(earlier)["model.pth"] == before["model.pth"]  # the earlier model, kept whole


def _limit_file_size(max_bytes: int):
    def apply():  # runs in the child: a write past max_bytes fails with EFBIG (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return apply


@pytest.mark.parametrize("fault", ["model_write_fails", "target_is_a_directory"])
def test_a_failure_while_writing_outputs_leaves_the_previous_run_untouched(fault, reference, demo_pickles, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(reference["models"], models)
    dead_staging = models / ".staging-999999999"  # above Linux's pid_max: no such process
    (dead_staging).mkdir()
    (dead_staging / "metrics.csv").write_text("left by a killed run")
    live_staging = models / f".staging-{os.getpid()}"  # a run that is still going (this test process)
    live_staging.mkdir()
    preexec = None
    if fault == "model_write_fails":
        # Every other output is a few kB; model.pth (ResNet18) is ~45 MB, written last.
        preexec = _limit_file_size(4 * 1024 * 1024)
    else:
        (models / "confusion_matrix.png").unlink()
        (models / "confusion_matrix.png").mkdir()
    before = _files(models)
    command = [PYTHON, str(REPO_ROOT / "dss_train.py"), "--data-dir", str(demo_pickles), "--model-dir", str(models),
               *COMMON[2:], "--epochs", "1"]
    result = subprocess.run(command, env=clean_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                            preexec_fn=preexec)
    assert result.returncode == 1, result.stdout + result.stderr
    if fault == "model_write_fails":
        assert "File too large" in result.stderr, result.stderr
    else:
        assert "confusion_matrix.png is a directory" in result.stderr, result.stderr
    assert "[METRICS] epoch=1" in result.stdout  # it trained, then failed while writing
    assert _files(models) == before
    assert not dead_staging.exists() and f"removed {dead_staging}" in result.stdout
    assert live_staging.is_dir()
    assert sorted(path.name for path in models.iterdir() if path.name.startswith(".")) == [live_staging.name]


# --------------------------------------------------------------------------- weekly predictions (issue 10)
def _weekly_pickles(demo_data: Path, root: Path, name: str, ids: list[str], image_size: int = 32) -> Path:
    """The README's weekly recipe, first half: a folder of camera images (no CSVs) through preprocess.py."""
    images = root / "images" / name
    images.mkdir(parents=True)
    paths = pd.read_csv(demo_data / "test_features.csv", dtype=str).set_index("id")["filepath"]
    for image_id in ids:
        shutil.copy(demo_data / paths[image_id], images / f"{image_id}.jpg")
    pickles = root / "weekly" / name
    result = run_script("preprocess.py", ["--input", images, "--output-dir", pickles, "--image-size", image_size,
                                          "--workers", "1", "--quiet"])
    assert result.returncode == 0, result.stdout + result.stderr
    return pickles


def _predict(data_dir: Path, model_dir: Path, *extra) -> subprocess.CompletedProcess:
    return run_script("dss_train.py", ["--data-dir", data_dir, "--model-dir", model_dir, "--predict-only",
                                       "--num-threads", "1", *extra])


def test_weekly_predictions_never_replace_the_submission_and_every_week_is_kept(reference, demo_data, tmp_path):
    """The weekly recipe run twice with different data: the training run's submission is untouched and
    both weeks' predictions are on disk, each in <model dir>/predictions/<data dir name>/."""
    models = tmp_path / "models"
    shutil.copytree(reference["models"], models)
    submission = (models / "test_predictions.csv").read_bytes()
    ids = pd.read_csv(demo_data / "test_features.csv", dtype=str)["id"].tolist()
    weeks = {"2026-w48": ids[:12], "2026-w49": ids[12:20]}
    for week, week_ids in weeks.items():
        result = _predict(_weekly_pickles(demo_data, tmp_path, week, week_ids), models)
        assert result.returncode == 0, result.stdout + result.stderr
        assert str(models / "predictions" / week / "predictions.csv") in result.stdout
    assert (models / "test_predictions.csv").read_bytes() == submission
    for week, week_ids in weeks.items():
        folder = models / "predictions" / week
        assert sorted(path.name for path in folder.iterdir()) == ["predictions.csv", "predictions_info.json",
                                                                  "test_predictions.csv"]
        readable = pd.read_csv(folder / "predictions.csv", dtype=str, keep_default_na=False)
        assert sorted(readable["id"]) == sorted(week_ids) and set(readable["site"]) == {""}  # no CSV: no sites
        info = json.loads((folder / "predictions_info.json").read_text())
        assert info["data"]["path"] == str((tmp_path / "weekly" / week).resolve())
        assert info["data"]["num_images"] == len(week_ids) and info["model"]["path"] == str(models / "model.pth")


def test_the_readmes_weekly_example_at_224_px_predicts_with_a_64_px_model(demo_data, tmp_path):
    """README: the weekly folder is preprocessed at --image-size 224, the demo model is trained at 64 px:
    --predict-only resizes to the model's input, with nearly the probabilities of data stored at 64 px."""
    pickles, models = tmp_path / "pickles64", tmp_path / "models"
    result = run_script("preprocess.py", ["--input", demo_data, "--output-dir", pickles, "--image-size", "64",
                                          "--workers", "1", "--quiet"])
    assert result.returncode == 0, result.stdout + result.stderr
    result = train(pickles, models, "--epochs", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    ids = pd.read_csv(demo_data / "test_features.csv", dtype=str)["id"].tolist()[:12]
    week = _predict(_weekly_pickles(demo_data, tmp_path / "a", "2026-w48", ids, image_size=224), models)
    assert week.returncode == 0, week.stdout + week.stderr
    assert "stores images at 224 px, the model was trained on 64 px: resizing them to its 64 px input" in week.stdout
    assert "upsampled" not in week.stdout
    folder = models / "predictions" / "2026-w48"
    info = json.loads((folder / "predictions_info.json").read_text())
    assert info["image_sizes"] == {"stored": 224, "model_stored": 64, "network_input": 64, "resized": True,
                                   "upsampled": False}
    at_64 = _predict(_weekly_pickles(demo_data, tmp_path / "b", "2026-w48", ids, image_size=64), models,
                     "--output-dir", tmp_path / "at64")
    assert at_64.returncode == 0 and "resizing" not in at_64.stdout
    resized = pd.read_csv(folder / "test_predictions.csv", dtype={"id": str}).set_index("id")
    stored_64 = pd.read_csv(tmp_path / "at64" / "test_predictions.csv", dtype={"id": str}).set_index("id")
    # Resized twice (frame -> 224 -> 64 px) or once (frame -> 64 px): nearly the same pixels.
    np.testing.assert_allclose(resized.loc[stored_64.index].to_numpy(), stored_64.to_numpy(), atol=0.05)


def test_predict_only_replaces_its_own_predictions_and_others_only_with_overwrite(reference, demo_data, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(reference["models"], models)
    ids = pd.read_csv(demo_data / "test_features.csv", dtype=str)["id"].tolist()
    # Two data dirs of one name: the same default output folder, <model dir>/predictions/new.
    first, second = _weekly_pickles(demo_data, tmp_path / "a", "new", ids[:6]), \
        _weekly_pickles(demo_data, tmp_path / "b", "new", ids[6:10])
    folder = models / "predictions" / "new"
    assert _predict(first, models).returncode == 0
    made = _files(folder)
    again = _predict(first, models)  # the same model on the same data replaces its own predictions
    assert again.returncode == 0, again.stderr
    assert _files(folder) == made
    other = _predict(second, models)
    assert other.returncode == 1
    assert "already holds predictions of other data" in other.stderr and str(first.resolve()) in other.stderr
    assert "--overwrite" in other.stderr and "--output-dir" in other.stderr and "Traceback" not in other.stderr
    assert _files(folder) == made
    # The training run's own outputs hold a submission without a record of what made it.
    submission = (models / "test_predictions.csv").read_bytes()
    into_model_dir = _predict(second, models, "--output-dir", models)
    assert into_model_dir.returncode == 1 and "--overwrite" in into_model_dir.stderr
    assert (models / "test_predictions.csv").read_bytes() == submission
    # Another model (other bytes in model.pth) on the same data.
    other_models = tmp_path / "other-models"
    other_models.mkdir()
    artifact = torch.load(models / "model.pth", weights_only=True)
    artifact["hyperparameters"]["seed"] = 99
    torch.save(artifact, other_models / "model.pth")
    refused = _predict(first, other_models, "--output-dir", folder)
    assert refused.returncode == 1 and "already holds predictions of another model" in refused.stderr
    replaced = _predict(second, models, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert sorted(pd.read_csv(folder / "predictions.csv", dtype=str)["id"]) == sorted(ids[6:10])


def test_predictions_csv_is_the_submission_made_readable(reference, demo_data):
    models = reference["models"]
    submission = pd.read_csv(models / "test_predictions.csv", dtype={"id": str})
    readable = pd.read_csv(models / "predictions.csv", dtype={"id": str, "site": str})
    class_names = list(submission.columns[1:])
    assert list(readable.columns) == ["id", "site", "predicted_class", "probability", "status", *class_names]
    assert set(readable["status"]) == {"predicted"}  # no image skipped by preprocess here
    assert readable["id"].tolist() == submission["id"].tolist()
    probs = submission[class_names].to_numpy()
    np.testing.assert_array_equal(readable[class_names].to_numpy(), probs)
    assert readable["predicted_class"].tolist() == [class_names[k] for k in probs.argmax(axis=1)]
    np.testing.assert_array_equal(readable["probability"].to_numpy(), probs.max(axis=1))
    sites = pd.read_csv(demo_data / "test_features.csv", dtype=str).set_index("id")["site"]
    assert readable["site"].tolist() == [sites[image_id] for image_id in readable["id"]]


# --------------------------------------------------------------------------- Ctrl-C (issue 10)
def _popen(*args) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, str(REPO_ROOT / "dss_train.py"), *map(str, args)], env=clean_env(),
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _read_until(process: subprocess.Popen, marker: str) -> None:
    """Read the run's stdout up to a line holding ``marker``."""
    for line in process.stdout:
        if marker in line:
            return
    process.wait(timeout=60)
    raise AssertionError(f"run ended (rc {process.returncode}) before printing {marker!r}: {process.stderr.read()}")


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_ctrl_c_without_a_checkpoint_dir_exits_130_with_one_line(demo_pickles, tmp_path):
    process = _popen("--data-dir", demo_pickles, "--model-dir", tmp_path / "models", *COMMON, "--epochs", "3")
    _read_until(process, "epoch 1/3:")  # in the training loop
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stdout + stderr
    line = _one_line(stderr)
    assert "stopped by Ctrl-C (SIGINT)" in line and "nothing saved: no --checkpoint-dir was given" in line
    assert "press Ctrl-C again to stop at once" in stdout
    assert not (tmp_path / "models" / "model.pth").exists()


def test_a_second_ctrl_c_stops_at_once(demo_pickles, tmp_path):
    """Slow steps (160 px network input) so that the second Ctrl-C comes while the first waits for its step."""
    ckpt = tmp_path / "ckpt"
    process = _popen("--data-dir", demo_pickles, "--model-dir", tmp_path / "models", "--checkpoint-dir", ckpt,
                     *COMMON, "--image-size", "160")
    _wait_for_checkpoint(process, ckpt)
    saved = sorted(ckpt.glob("ckpt-*"))
    process.send_signal(signal.SIGINT)
    _read_until(process, "Ctrl-C (SIGINT) received")
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stdout + stderr
    line = _one_line(stderr)
    assert "stopped at once by Ctrl-C (SIGINT)" in line and "same --checkpoint-dir" in line
    assert sorted(ckpt.glob("ckpt-*")) == saved  # it did not wait for the step to save another
    assert not (tmp_path / "models" / "model.pth").exists()


# --------------------------------------------------------------------------- checkpoints kept, threads (issue 10)
def test_keep_checkpoints_and_the_default_thread_count(demo_pickles, tmp_path):
    """--keep-checkpoints N keeps the newest N; each is ~224 MB with the default EMA (as --help says); without --num-threads
    the run uses the CPUs it may use and config.json records the count."""
    ckpt, models = tmp_path / "ckpt", tmp_path / "models"
    result = run_script("dss_train.py", ["--data-dir", demo_pickles, "--model-dir", models, "--checkpoint-dir", ckpt,
                                         "--epochs", "3", "--batch-size", "16", "--weights", "none",
                                         "--keep-checkpoints", "2"])
    assert result.returncode == 0, result.stdout + result.stderr
    kept = sorted(ckpt.glob("ckpt-*.pt"))
    assert [path.name[:11] for path in kept] == ["ckpt-e00002", "ckpt-e00003"]
    assert all(214e6 < path.stat().st_size < 234e6 for path in kept), [path.stat().st_size for path in kept]
    assert "about 224 MB for ResNet18 with adamw and the EMA" in " ".join(dss_train.build_parser().format_help().split())
    count = json.loads((models / "config.json").read_text())["num_threads"]
    assert isinstance(count, int) and 1 <= count <= threads.allowed_cpus()
    assert f"CPU threads: {count} (the CPUs this process may use" in result.stdout


# --------------------------------------------------------------------------- sizes and messages (issue 10)
@pytest.mark.parametrize("script", ["preprocess.py", "dss_train.py"])
def test_an_image_size_below_what_resnet18_can_use_is_an_error(script):
    result = run_script(script, ["--image-size", "31"])
    assert result.returncode == 2 and "expected at least 32 px" in result.stderr, result.stderr


def test_pickles_stored_below_32_px_are_refused_naming_the_minimum(demo_pickles, tmp_path):
    train_split = dataset.load_file(demo_pickles / "train_data.pkl")
    train_split["images"] = np.ascontiguousarray(train_split["images"][:, ::2, ::2])
    train_split["info"]["image_size"] = 16
    data = tmp_path / "data"
    data.mkdir()
    (data / "train_data.pkl").write_bytes(pickle.dumps(dataset.validate(train_split), protocol=dataset.PICKLE_PROTOCOL))
    result = train(data, tmp_path / "models")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "stored at 16 px, below the 32 px" in result.stderr and "--image-size 32" in result.stderr


def test_test_data_only_suggests_predict_only(demo_pickles, tmp_path):
    _copy_test_pickle(demo_pickles, tmp_path / "new")
    result = train(tmp_path / "new", tmp_path / "models")
    assert result.returncode == 1 and "only test data" in result.stderr and "--predict-only" in result.stderr


def test_a_missing_data_dir_is_reported_as_missing(reference, tmp_path):
    missing = tmp_path / "nope"
    for extra in (["--model-dir", tmp_path / "models"],
                  ["--model-dir", reference["models"], "--predict-only", "--output-dir", tmp_path / "out"]):
        result = run_script("dss_train.py", ["--data-dir", missing, *extra])
        assert result.returncode == 1 and f"data dir {missing} does not exist" in result.stderr, result.stderr


def test_extending_a_finished_run_suggests_fine_tuning_from_its_model(reference, demo_pickles, tmp_path):
    models, ckpt = tmp_path / "models", tmp_path / "ckpt"
    shutil.copytree(reference["models"], models)
    shutil.copytree(reference["ckpt"], ckpt)
    result = train(demo_pickles, models, "--checkpoint-dir", ckpt, "--epochs", "4")
    assert result.returncode == 1
    text = " ".join(result.stderr.split())
    assert "epochs: checkpoint has 2, this run has 4" in text and "That run finished (2 epochs)" in text
    assert f"--weights {models / 'model.pth'} with a new --checkpoint-dir" in text


@pytest.mark.parametrize("script", ["preprocess.py", "dss_train.py"])
def test_help_states_each_default_once(script):
    text = run_script(script, ["--help"]).stdout
    for block in re.split(r"\n(?=  -)", text):
        if block.startswith("  -"):
            assert len(re.findall(r"\bdefault\b", block, re.IGNORECASE)) <= 1, block


# --------------------------------------------------------------------------- where it fails, calibration, --arch
def test_where_it_fails_outputs_recompute_from_val_predictions(reference):
    models = reference["models"]
    frame = pd.read_csv(models / "val_predictions.csv", dtype={"id": str, "site": str})
    class_names = list(frame.columns[3:])
    probs = frame[class_names].to_numpy()
    truth = frame["label"].map({name: index for index, name in enumerate(class_names)}).to_numpy()
    table = pd.read_csv(models / "site_metrics.csv", dtype={"site": str})
    assert list(table.columns) == ["site", "images", "accuracy", "log_loss", "mean_true_prob",
                                   *[f"n_{name}" for name in class_names]]
    assert sorted(table["site"]) == sorted(frame["site"].unique())
    assert table["log_loss"].tolist() == sorted(table["log_loss"], reverse=True)  # worst site first
    clipped = np.clip(probs, 1e-15, 1 - 1e-15)
    clipped /= clipped.sum(axis=1, keepdims=True)
    losses = -np.log(clipped[np.arange(len(truth)), truth])
    for row in table.to_dict("records"):
        members = (frame["site"] == row["site"]).to_numpy()
        assert row["images"] == members.sum()
        assert row["accuracy"] == pytest.approx(np.mean(probs[members].argmax(axis=1) == truth[members]))
        assert row["log_loss"] == pytest.approx(losses[members].mean(), rel=1e-9)
        assert row["mean_true_prob"] == pytest.approx(probs[members, truth[members]].mean(), rel=1e-9)
        assert [row[f"n_{name}"] for name in class_names] == np.bincount(truth[members],
                                                                         minlength=len(class_names)).tolist()
    # ECE of the published (calibrated) validation predictions: 15 bins (i/15, (i+1)/15] of the top probability.
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == truth
    bins = np.searchsorted(np.linspace(0.0, 1.0, 16)[1:-1], confidence, side="left")
    ece = sum(np.sum(bins == b) / len(truth) * abs(correct[bins == b].mean() - confidence[bins == b].mean())
              for b in np.unique(bins))
    record = json.loads((models / "metrics.json").read_text())["calibration"]
    assert record["ece"] == pytest.approx(ece, rel=1e-9, abs=1e-12)
    assert record["ece"] == pytest.approx(record["ece_after"], rel=1e-9, abs=1e-12)
    assert record["temperature_scaling"] is True and record["logloss_after"] <= record["logloss_before"]
    for name in ("calibration.png", "top_losses.png"):
        data = (models / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000, name
    assert re.search(r"temperature scaling on validation \(TTA\) logits: T=\d+\.\d{4}, log loss", reference["stdout"])


def test_hosting_returns_the_training_runs_calibrated_probabilities(reference, demo_data, demo_pickles):
    from dss.predict import serve

    served = serve.model_fn(str(reference["models"]))
    assert served.temperature == torch.load(reference["models"] / "model.pth",
                                            weights_only=True)["hyperparameters"]["temperature"] != 1.0
    ids = dataset.load_split(demo_pickles, "test")["ids"]  # the batch the training run predicted, in its order
    paths = pd.read_csv(demo_data / "test_features.csv", dtype=str).set_index("id")["filepath"]
    bodies = [base64.b64encode((demo_data / paths[image_id]).read_bytes()).decode() for image_id in ids]
    probs = serve.predict_fn(serve.input_fn(json.dumps(bodies), "application/json"), served)["probs"]
    theirs = pd.read_csv(reference["models"] / "test_predictions.csv", dtype={"id": str}).set_index("id")
    np.testing.assert_allclose(probs, theirs.loc[list(ids)].to_numpy(dtype=float), rtol=0, atol=1e-9)


# resnet18 (the default) in make test; every other arch in make test-all (about 100 s on 2 cores).
@pytest.mark.parametrize("arch", [arch if arch == backbones.DEFAULT_ARCH else pytest.param(arch, marks=pytest.mark.slow)
                                  for arch in backbones.ARCHITECTURES])
def test_every_arch_trains_and_predicts(arch, demo_pickles, tmp_path):
    """One epoch at 32 px from random weights, then --predict-only reproduces the test predictions.
    resnet34 also runs with --temperature-scaling false (T = 1 everywhere)."""
    calibrate = "false" if arch == "resnet34" else "true"
    result = run_script("dss_train.py", ["--data-dir", demo_pickles, "--model-dir", tmp_path / "m", "--arch", arch,
                                         "--epochs", "1", "--batch-size", "32", "--weights", "none",
                                         "--num-threads", "2", "--temperature-scaling", calibrate])
    assert result.returncode == 0, result.stdout + result.stderr
    artifact = torch.load(tmp_path / "m" / "model.pth", weights_only=True)
    mean, std = backbones.normalisation(arch)
    assert artifact["arch"] == arch and artifact["hyperparameters"]["arch"] == arch
    assert (artifact["preprocessing"]["mean"], artifact["preprocessing"]["std"]) == (list(mean), list(std))
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["arch"] == arch and config["temperature_scaling"] is (calibrate == "true")
    assert (artifact["hyperparameters"]["temperature"] == 1.0) is (calibrate == "false")
    result = run_script("dss_train.py", ["--data-dir", demo_pickles, "--model-dir", tmp_path / "m",
                                         "--output-dir", tmp_path / "p", "--predict-only", "--num-threads", "2"])
    assert result.returncode == 0, result.stdout + result.stderr
    ours = pd.read_csv(tmp_path / "p" / "test_predictions.csv")
    theirs = pd.read_csv(tmp_path / "m" / "test_predictions.csv")
    np.testing.assert_allclose(ours.iloc[:, 1:].to_numpy(), theirs.iloc[:, 1:].to_numpy(), rtol=0, atol=1e-9)


def test_ema_trains_resumes_exactly_and_saves_the_averaged_weights(demo_pickles, tmp_path):
    ema = ("--ema-decay", "0.9")
    whole = train(demo_pickles, tmp_path / "whole", "--checkpoint-dir", tmp_path / "ckpt-whole", *ema)
    assert whole.returncode == 0, whole.stdout + whole.stderr
    ckpt, models = tmp_path / "ckpt", tmp_path / "models"
    process = _start(demo_pickles, models, ckpt, *ema)
    _wait_for_checkpoint(process, ckpt)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    result = train(demo_pickles, models, "--checkpoint-dir", ckpt, *ema)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resuming from" in result.stdout
    _assert_same_run(tmp_path / "whole", models)
    artifact = torch.load(tmp_path / "whole" / "model.pth", weights_only=True)
    assert artifact["hyperparameters"]["ema_decay"] == 0.9
    (path,) = (tmp_path / "ckpt-whole").glob("ckpt-*.pt")
    saved = torch.load(path, weights_only=True)
    assert saved["ema"]["updates"] == saved["step"] > 0
    # model.pth holds the best epoch's averaged weights, not the raw ones.
    for name, tensor in artifact["state_dict"].items():
        assert torch.equal(tensor, saved["best_model"][name]), name
    if artifact["hyperparameters"]["best_epoch"] == 2:
        assert all(torch.equal(tensor, saved["ema"]["weights"][name]) for name, tensor in artifact["state_dict"].items())
    assert any(not torch.equal(saved["ema"]["weights"][name], saved["model"][name])
               for name in saved["model"] if saved["model"][name].is_floating_point())


# --------------------------------------------------------------------------- augmentation and epoch choice
@pytest.mark.parametrize("value", ["0", "-0.5", "1.5", "nan"])
def test_crop_scale_outside_0_1_is_refused(value, capsys):
    with pytest.raises(SystemExit) as error:
        dss_train.parse_args(["--crop-scale", value])
    assert error.value.code == 2 and "share of the image area in (0, 1]" in capsys.readouterr().err


def test_crop_scale_sets_the_random_crops_and_one_means_none():
    data = training_data.TrainingData({"images": np.zeros((2, 40, 40, 3), np.uint8)}, None, "host",
                                      torch.device("cpu"), 32, "site", np.zeros(2, bool), "sha")
    norm = training.normalisation("resnet18")
    cropped = training.augment(training_args.Settings.from_args(dss_train.parse_args(["--crop-scale", "0.8"])), data, norm)
    assert cropped.scale == (0.8, 1.0) and cropped.log_ratio != (0.0, 0.0) and cropped.out_size == 32
    whole = training.augment(training_args.Settings.from_args(dss_train.parse_args(["--crop-scale", "1"])), data, norm)
    assert whole.scale == (1.0, 1.0) and whole.log_ratio == (0.0, 0.0)


def test_best_epoch_by_calibrated_log_loss_keeps_the_sharper_later_epoch():
    """Epoch 2 is over-confident (higher plain log loss) but ranks better: after a fitted temperature
    its log loss is lower, so --best-epoch-by calibrated-logloss keeps it and logloss does not."""
    from dss.train import checkpoint
    from dss import metrics
    from dss.models.calibration import calibrated_log_loss

    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    soft = np.log(np.where(np.eye(2)[labels] == 1, 0.6, 0.4))          # timid, two mistakes
    soft[:2] = soft[:2, ::-1]
    sharp = np.log(np.where(np.eye(2)[labels] == 1, 0.999, 0.001))     # sharp, one confident mistake
    sharp[0] = sharp[0, ::-1]
    records = []
    for epoch, logits in ((1, soft), (2, sharp)):
        probs = np.exp(logits)
        records.append({"epoch": epoch, "val_loss": 0.0, "val_logloss": metrics.log_loss(probs, labels),
                        "val_logloss_calibrated": calibrated_log_loss(logits, labels), "val_acc": 0.0,
                        "per_class": []})
    assert records[1]["val_logloss"] > records[0]["val_logloss"]
    assert records[1]["val_logloss_calibrated"] < records[0]["val_logloss_calibrated"]
    network = torch.nn.Linear(2, 2)
    for best_by, kept in (("val_logloss", 1), ("val_logloss_calibrated", 2)):
        state = checkpoint.TrainingState(network, None, None, None, None, best_by=best_by)
        for record in records:
            state.record_epoch(dict(record), np.full((8, 2), 0.5), np.eye(2))
        assert state.best["epoch"] == kept
