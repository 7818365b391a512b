"""dss_train.py started exactly as a SageMaker training job starts it.

The real ``sagemaker-training`` toolkit (the ``train`` command in SageMaker's PyTorch containers)
runs in a subprocess on a fake ``/opt/ml`` tree under tmp: the toolkit reads the base dir from
``SAGEMAKER_BASE_DIR`` (its own mechanism for running outside a container), so no root and no
real /opt/ml are needed. It reads input/config/hyperparameters.json (values are JSON strings,
as the SageMaker SDK writes them), extracts the source tarball named by
``sagemaker_submit_directory`` into code/, sets the SM_* variables and runs
``python dss_train.py --key value ...``.

The source tarball holds dss_train.py and the dss package but no requirements.txt: with one,
the toolkit would ``pip install`` it, which needs a network (the container already has torch).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

import dss_train
from dss import sagemaker
from dss.train.training_args import Settings
from tests.conftest import PYTHON, REPO_ROOT, clean_env, run_script


def _source_tarball(folder: Path) -> Path:
    """What the SageMaker SDK uploads as sourcedir.tar.gz: the entry point and the package."""
    path = folder / "sourcedir.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(REPO_ROOT / "dss_train.py", arcname="dss_train.py")
        tar.add(REPO_ROOT / "dss", arcname="dss", filter=lambda info: None if "__pycache__" in info.name else info)
    return path


def _job_tree(tmp_path: Path, data_dir: Path, hyperparameters: dict) -> Path:
    """A /opt/ml-like tree: config files, the 'training' channel, empty model and output dirs."""
    base = tmp_path / "opt" / "ml"
    config_dir = base / "input" / "config"
    config_dir.mkdir(parents=True)
    shutil.copytree(data_dir, base / "input" / "data" / "training")
    (base / "model").mkdir()
    (base / "output" / "data").mkdir(parents=True)
    host = "localhost"  # resolvable: the toolkit waits for every host's DNS name before starting
    framework = {"sagemaker_program": "dss_train.py",
                 "sagemaker_submit_directory": str(_source_tarball(tmp_path)),
                 "sagemaker_container_log_level": 20, "sagemaker_job_name": "dss-test-job",
                 "sagemaker_region": "us-east-1"}
    # The SDK writes every hyperparameter value as a JSON string.
    hyperparameters_json = {key: json.dumps(value) for key, value in {**hyperparameters, **framework}.items()}
    (config_dir / "hyperparameters.json").write_text(json.dumps(hyperparameters_json))
    (config_dir / "resourceconfig.json").write_text(json.dumps({
        "current_host": host, "hosts": [host], "current_instance_group": "homogeneousCluster",
        "instance_groups": [{"instance_group_name": "homogeneousCluster", "instance_type": "local",
                             "hosts": [host]}]}))
    (config_dir / "inputdataconfig.json").write_text(json.dumps({"training": {
        "TrainingInputMode": "File", "S3DistributionType": "FullyReplicated", "RecordWrapperType": "None"}}))
    return base


def _run_toolkit(base: Path, checkpoint_dir: Path, **extra_env: str) -> subprocess.CompletedProcess:
    env = clean_env(SAGEMAKER_BASE_DIR=str(base), SM_CHECKPOINT_DIR=str(checkpoint_dir),
                    AWS_EC2_METADATA_DISABLED="true", AWS_DEFAULT_REGION="us-east-1", **extra_env)
    env.pop("PYTHONPATH")  # the job imports dss from its extracted source dir, as in a container
    return subprocess.run([PYTHON, "-m", "sagemaker_training.cli.train"], env=env, cwd=base.parent,
                          capture_output=True, text=True, timeout=600)


def test_training_job_through_the_sagemaker_toolkit(demo_pickles, tmp_path):
    hyperparameters = {"epochs": 1, "batch-size": 16, "weights": "none", "num-threads": 1, "tta": True,
                       "learning-rate": 0.001}
    base = _job_tree(tmp_path, demo_pickles, hyperparameters)
    checkpoints = tmp_path / "checkpoints"
    result = _run_toolkit(base, checkpoints)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert (base / "output" / "success").exists()
    assert (base / "code" / "dss_train.py").is_file()  # ran from the extracted tarball
    for name in ("model.pth", "config.json"):
        assert (base / "model" / name).is_file(), name
    for name in ("metrics.json", "metrics.csv", "splits.csv", "val_predictions.csv", "test_predictions.csv",
                 "training_curves.png", "confusion_matrix.png"):
        assert (base / "output" / "data" / name).is_file(), name
    assert "[METRICS] epoch=1 train_loss=" in output
    assert list(checkpoints.glob("ckpt-*.pt"))
    config = json.loads((base / "model" / "config.json").read_text())
    assert config["data_dir"] == str(base / "input" / "data" / "training")
    assert config["output_dir"] == str(base / "output" / "data")
    assert config["tta"] is True and config["batch_size"] == 16 and config["epochs"] == 1


def test_a_hyperparameter_tuning_job_keeps_its_checkpoints_apart_and_reports_its_best(demo_pickles, tmp_path):
    """What a HyperparameterTuner's training job gets: the tuner's ``_tuning_objective_metric``
    hyperparameter (the toolkit keeps it from the script) and, as docs/sagemaker.md recommends, a
    ``checkpoint-dir`` with ``{job_name}``, so jobs sharing one checkpoint_s3_uri never meet."""
    checkpoints = tmp_path / "checkpoints"
    hyperparameters = {"epochs": 1, "batch-size": 16, "weights": "none", "num-threads": 1,
                       "checkpoint-dir": str(checkpoints / "{job_name}"), "_tuning_objective_metric": "served_val_logloss"}
    base = _job_tree(tmp_path, demo_pickles, hyperparameters)
    result = _run_toolkit(base, checkpoints, TRAINING_JOB_NAME="tuning-1-007-abc")  # as SageMaker sets it
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert list((checkpoints / "tuning-1-007-abc").glob("ckpt-*.pt"))
    served = json.loads((base / "output" / "data" / "metrics.json").read_text())["calibration"]["logloss_after"]
    objective = re.findall(r"\[METRICS\] .*\bserved_val_logloss=([0-9.]+)", output)  # docs/sagemaker.md's regex
    assert objective and float(objective[-1]) == pytest.approx(served, abs=1e-4)


def test_job_name_in_the_checkpoint_dir_needs_a_training_job(tmp_path):
    assert sagemaker.expand_job_name("/opt/ml/checkpoints/{job_name}", {"TRAINING_JOB_NAME": "tune-007"}) == \
        "/opt/ml/checkpoints/tune-007"
    assert sagemaker.expand_job_name("c/{job_name}", {"SM_TRAINING_ENV": '{"job_name": "j"}'}) == "c/j"
    assert sagemaker.expand_job_name("plain", {}) == "plain"
    with pytest.raises(ValueError, match="TRAINING_JOB_NAME"):
        sagemaker.expand_job_name("c/{job_name}", {})
    result = run_script("dss_train.py", ["--checkpoint-dir", tmp_path / "{job_name}", "--weights", "none"])
    assert result.returncode == 1 and "{job_name}" in result.stderr and "Traceback" not in result.stderr


def test_unknown_hyperparameter_fails_the_job_with_the_reason(demo_pickles, tmp_path):
    base = _job_tree(tmp_path, demo_pickles, {"epochs": 1, "batch_size": 16})
    result = _run_toolkit(base, tmp_path / "checkpoints")
    assert result.returncode != 0
    failure = (base / "output" / "failure").read_text()
    assert "invalid arguments" in failure and "--batch_size" in failure
    assert not (base / "model" / "model.pth").exists()


def _sagemaker_env(tmp_path: Path, channel: Path) -> dict:
    return clean_env(SM_TRAINING_ENV="{}", SM_CHANNEL_TRAINING=str(channel), SM_MODEL_DIR=str(tmp_path / "model"),
                     SM_OUTPUT_DATA_DIR=str(tmp_path / "output" / "data"), SM_OUTPUT_DIR=str(tmp_path / "output"),
                     SM_CHECKPOINT_DIR=str(tmp_path / "checkpoints"))


def test_failure_reason_goes_to_the_sagemaker_failure_file(tmp_path):
    empty_channel = tmp_path / "channel"
    empty_channel.mkdir()
    result = run_script("dss_train.py", ["--weights", "none", "--epochs", "1"], env=_sagemaker_env(tmp_path, empty_channel))
    assert result.returncode == 1
    failure = (tmp_path / "output" / "failure").read_text()
    assert "no train data" in failure and str(empty_channel) in failure


def test_paths_flags_win_over_sm_variables_which_win_over_local_defaults(tmp_path, monkeypatch):
    for key in [key for key in os.environ if key.startswith("SM_")]:
        monkeypatch.delenv(key)
    local = Settings.from_args(dss_train.parse_args([]))
    assert (str(local.data_dir), str(local.model_dir), str(local.output_dir)) == ("output", "models", "models")
    assert local.checkpoint_dir is None
    for key, value in _sagemaker_env(tmp_path, tmp_path / "channel").items():
        if key.startswith("SM_"):
            monkeypatch.setenv(key, value)
    managed = Settings.from_args(dss_train.parse_args([]))
    assert managed.data_dir == tmp_path / "channel"
    assert managed.model_dir == tmp_path / "model"
    assert managed.output_dir == tmp_path / "output" / "data"
    assert managed.checkpoint_dir == tmp_path / "checkpoints"
    explicit = Settings.from_args(dss_train.parse_args(["--model-dir", "m", "--output-dir", "o"]))
    assert (str(explicit.model_dir), str(explicit.output_dir)) == ("m", "o")


@pytest.mark.parametrize("name", ["batch_size", "learning_rate"])
def test_underscore_hyperparameter_names_are_rejected(name):
    with pytest.raises(SystemExit):
        dss_train.parse_args([f"--{name}", "1"])


def test_a_kfold_training_job_trains_every_fold_in_one_job(demo_pickles, tmp_path):
    """hyperparameters {"folds": 2}: one job trains both members (checkpoints per fold under the
    job's checkpoint dir), writes the out-of-fold predictions, and reports cv_logloss once."""
    checkpoints = tmp_path / "checkpoints"
    hyperparameters = {"epochs": 1, "batch-size": 16, "weights": "none", "num-threads": 1, "folds": 2}
    base = _job_tree(tmp_path, demo_pickles, hyperparameters)
    result = _run_toolkit(base, checkpoints)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert list((checkpoints / "fold-1").glob("ckpt-*.pt")) and list((checkpoints / "fold-2").glob("ckpt-*.pt"))
    assert (base / "output" / "data" / "oof_predictions.csv").is_file()
    cv = json.loads((base / "output" / "data" / "metrics.json").read_text())["cv"]
    objective = re.findall(r"\[METRICS\] cv_logloss=([0-9.]+)", output)
    assert len(objective) == 1 and float(objective[0]) == pytest.approx(cv["logloss"], abs=1e-4)
