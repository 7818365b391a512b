"""dss_train.py end to end, as real subprocesses on the demo pickles (32 px, CPU, --weights none).

One uninterrupted 2-epoch run (module fixture) is the reference for the output contracts and for
the resume tests (SIGKILL after the first checkpoint, SIGTERM mid-run), which must end with the
same epoch history and the same test predictions.
"""

from __future__ import annotations

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
from dss import dataset, engine, training, training_data
from dss import model as model_lib
from tests.conftest import PYTHON, REPO_ROOT, clean_env, run_script

# Same thread count everywhere: CPU results are bit-identical only for a fixed thread count.
COMMON = ["--epochs", "2", "--batch-size", "16", "--weights", "none", "--num-threads", "1", "--seed", "0"]
EPOCH_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_logloss", "val_acc", "lr", "epoch_seconds",
                 "train_images_per_s"]
TRAJECTORY = ["epoch", "train_loss", "train_acc", "val_loss", "val_logloss", "val_acc", "lr"]  # not timings
# What a SageMaker estimator's metric_definitions would use (one regex per metric).
METRIC_REGEXES = {name: re.compile(rf"\[METRICS\] .*\b{name}=([0-9.]+)")
                  for name in ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_logloss")}
LINE_RE = re.compile(r"^\[METRICS\] epoch=\d+ train_loss=\d+\.\d{4} train_acc=\d+\.\d{4} val_loss=\d+\.\d{4} "
                     r"val_acc=\d+\.\d{4} val_logloss=\d+\.\d{4}$")


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
                 "test_predictions.csv", "training_curves.png", "confusion_matrix.png"):
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
    assert set(report) == {"epochs", "best", "test"}
    assert [row["epoch"] for row in report["epochs"]] == [1, 2]
    # metrics.json epochs: the contract fields, then the per-class report of that epoch.
    assert all(list(row) == EPOCH_COLUMNS + ["per_class"] for row in report["epochs"])
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


def test_val_logloss_recomputed_from_val_predictions(reference):
    models = reference["models"]
    frame = pd.read_csv(models / "val_predictions.csv")
    class_names = list(frame.columns[3:])
    probs = frame[class_names].to_numpy()
    truth = frame["label"].map({name: index for index, name in enumerate(class_names)}).to_numpy()
    clipped = np.clip(probs, 1e-15, 1 - 1e-15)
    clipped /= clipped.sum(axis=1, keepdims=True)
    recomputed = -np.mean(np.log(clipped[np.arange(len(truth)), truth]))
    best = json.loads((models / "metrics.json").read_text())["best"]
    assert recomputed == pytest.approx(best["val_logloss"], rel=1e-9)
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
    lines = [line for line in reference["stdout"].splitlines() if line.startswith("[METRICS]")]
    assert len(lines) == 2
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


def _start(data_dir, model_dir, ckpt_dir):
    command = [PYTHON, str(REPO_ROOT / "dss_train.py"), "--data-dir", str(data_dir), "--model-dir", str(model_dir),
               "--checkpoint-dir", str(ckpt_dir), *COMMON]
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
    assert len(list(ckpt.glob("ckpt-*.pt"))) == 2  # keep the last two


def test_sigterm_saves_a_checkpoint_exits_nonzero_and_resumes(reference, demo_pickles, tmp_path):
    ckpt, models = tmp_path / "ckpt", tmp_path / "models"
    process = _start(demo_pickles, models, ckpt)
    _wait_for_checkpoint(process, ckpt)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == dss_train.SIGTERM_EXIT_CODE, stdout + stderr
    assert "SIGTERM" in stderr and "--checkpoint-dir" in stderr
    newest = max(ckpt.glob("ckpt-*.pt"))
    state = torch.load(newest, weights_only=True)
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
    assert sorted(path.name for path in tmp_path.iterdir()) == ["test_predictions.csv"]
    ours = pd.read_csv(tmp_path / "test_predictions.csv")
    theirs = pd.read_csv(reference["models"] / "test_predictions.csv")
    assert ours["id"].tolist() == theirs["id"].tolist()
    np.testing.assert_allclose(ours.iloc[:, 1:].to_numpy(), theirs.iloc[:, 1:].to_numpy(), atol=1e-6)


def test_predict_only_refuses_data_of_another_image_size(reference, demo_pickles, tmp_path):
    test = dataset.load_file(demo_pickles / "test_data.pkl")
    test["images"] = np.ascontiguousarray(test["images"][:, ::2, ::2])
    test["info"]["image_size"] = 16
    (tmp_path / "test_data.pkl").write_bytes(pickle.dumps(dataset.validate(test), protocol=dataset.PICKLE_PROTOCOL))
    result = run_script("dss_train.py", ["--data-dir", tmp_path, "--model-dir", reference["models"],
                                         "--output-dir", tmp_path / "out", "--predict-only", "true"])
    assert result.returncode == 1
    assert "16 px" in result.stderr and "--image-size 32" in result.stderr and "model.pth" in result.stderr
    assert not (tmp_path / "out" / "test_predictions.csv").exists()


def test_one_agreement_check_for_train_test_and_model_test():
    """Training (train vs test split) and --predict-only (model vs test split) refuse the same mismatches."""
    train = {"images": np.zeros((2, 32, 32, 3), np.uint8), "info": {"resize_policy": "squash"}, "class_names": ["a", "b"]}
    test = {"images": np.zeros((1, 16, 16, 3), np.uint8), "info": {"resize_policy": "crop"}, "class_names": ["b", "a"]}
    with pytest.raises(dataset.DatasetError) as error:
        training_data.check_agreement(test, training_data.preprocessing_of(train), "d (test)", "d (train)")
    message = str(error.value)
    assert message.startswith("d (test) does not match d (train): ")
    assert "stored at 16 px but d (train) has 32 px images (re-run preprocess.py with --image-size 32)" in message
    assert "resize policy is 'crop' but d (train) has 'squash'" in message
    assert "class names are ['b', 'a'] but d (train) has ['a', 'b']" in message
    # An unlabelled split without class names, or a pickle without a resize policy, passes on those points.
    unlabelled = {"images": np.zeros((1, 32, 32, 3), np.uint8), "info": {}, "class_names": []}
    training_data.check_agreement(unlabelled, training_data.preprocessing_of(train), "d (test)", "d (train)")


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
    assert (defaults.epochs, defaults.weights, defaults.val_fraction, defaults.optimizer) == (10, "imagenet", 0.25, "adamw")
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
    settings = training.Settings.from_args(args)
    assert list(settings.flags()) == list(vars(args))
    assert dss_train.build_parser()._option_string_actions["--optimizer"].choices == engine.OPTIMIZERS
    fingerprint_settings = settings.recipe("site")
    assert list(fingerprint_settings) == ["epochs", "batch_size", "learning_rate", "optimizer", "weight_decay",
                                          "warmup_epochs", "label_smoothing", "class_weights", "weights", "seed",
                                          "val_fraction", "split_by"]


def test_help_explains_every_flag_with_its_default():
    result = run_script("dss_train.py", ["--help"])
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for flag in ("--data-dir", "--model-dir", "--output-dir", "--checkpoint-dir", "--epochs", "--batch-size",
                 "--learning-rate", "--optimizer", "--weight-decay", "--warmup-epochs", "--label-smoothing",
                 "--class-weights", "--predict-only", "--weights", "--image-size", "--seed", "--val-fraction",
                 "--split-by", "--device", "--compile", "--patience", "--tta", "--eval-batch-size", "--num-threads"):
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
            training.build_network(3, "imagenet", download_timeout_s=1.0)
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


# --------------------------------------------------------------------------- re-runs and train-only data
def _files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


def test_train_only_data_trains_and_replaces_the_previous_runs_outputs(reference, demo_pickles, tmp_path):
    """preprocess may write train data only: training goes on, without test predictions; a re-run into
    a model dir holding an earlier run replaces its outputs and drops its stale test_predictions.csv."""
    data, models = tmp_path / "data", tmp_path / "models"
    data.mkdir()
    shutil.copy(demo_pickles / "train_data.pkl", data / "train_data.pkl")
    shutil.copytree(reference["models"], models)
    before = _files(models)
    result = run_script("dss_train.py", ["--data-dir", data, "--model-dir", models, *COMMON[2:], "--epochs", "1"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"no test_data.pkl in {data}" in result.stdout
    assert f"removed {models / 'test_predictions.csv'}" in result.stdout
    assert not (models / "test_predictions.csv").exists()
    report = json.loads((models / "metrics.json").read_text())
    assert report["test"] == {"skipped": f"no test_data.pkl in {data}"}
    assert [row["epoch"] for row in report["epochs"]] == [1] and "per_class" in report["epochs"][0]
    after = _files(models)
    for name in ("model.pth", "config.json", "metrics.json", "metrics.csv", "training_curves.png"):
        assert after[name] != before[name], name
    assert torch.load(models / "model.pth", weights_only=True)["hyperparameters"]["epochs"] == 1
    assert json.loads((models / "config.json").read_text())["num_test_images"] == 0
    assert not [path.name for path in models.iterdir() if path.name.startswith(".")]


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
