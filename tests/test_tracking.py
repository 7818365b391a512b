"""MLflow tracking against a real ``mlflow server`` process (SQLite backend, local artifact store).

The server (``mlflow_server`` in conftest) is started once per session on a free local port; every
test reads what was logged back through ``MlflowClient``, as a user comparing runs in the MLflow UI
would see it. Training runs are real subprocesses of dss_train.py on the tiny demo pickles.
"""

from __future__ import annotations

import http.server
import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from dss.train import outputs, tracking
from tests.conftest import PYTHON, REPO_ROOT, _free_port, clean_env, run_script

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

EPOCH_FIELDS = ("train_loss", "train_acc", "val_loss", "val_logloss", "val_acc", "lr", "train_images_per_s")


def test_resolve_follows_the_environment_and_flags():
    assert not tracking.resolve(None, None, False, environ={}).enabled
    assert tracking.resolve(None, None, False, environ={"MLFLOW_TRACKING_URI": "http://x"}).enabled
    named = tracking.resolve(None, "sweep-1", True, environ={})
    assert named.enabled and named.experiment == "sweep-1" and named.log_model and named.tracking_uri is None
    assert not tracking.resolve(False, "sweep-1", False, environ={"MLFLOW_TRACKING_URI": "http://x"}).enabled
    from_env = tracking.resolve(None, None, False, environ={"MLFLOW_TRACKING_URI": "http://x",
                                                            "MLFLOW_EXPERIMENT_NAME": "team"})
    assert from_env.experiment == "team" and from_env.tracking_uri == "http://x"


def test_asking_for_tracking_without_the_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(tracking.TrackingError, match="requirements-mlflow.txt"):
        tracking.resolve(None, None, False, environ={"MLFLOW_TRACKING_URI": "http://x"})
    assert not tracking.resolve(None, None, False, environ={}).enabled  # not asked: no error


def test_tracker_logs_params_tags_epochs_and_artifacts(mlflow_server, tmp_path):
    settings = tracking.TrackingSettings(enabled=True, tracking_uri=mlflow_server, experiment="unit")
    tracker = tracking.RunTracker.start(settings, run_name="unit-run")
    artifact = tmp_path / "metrics.csv"
    artifact.write_text("epoch\n1\n")
    tracker.log_params({"epochs": 2, "weights": "none", "long": "x" * 7000})
    tracker.set_tags({"data_sha256": "abc"})
    records = [{"epoch": e, **{key: 0.1 * e for key in EPOCH_FIELDS}} for e in (1, 2)]
    tracker.log_epochs(records, EPOCH_FIELDS)
    tracker.log_epochs(records, EPOCH_FIELDS)  # again (a resumed run): no duplicated steps
    tracker.log_metrics({"best_val_logloss": 0.2})
    tracker.log_artifacts([artifact])
    tracker.finish()
    client = MlflowClient(mlflow_server)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "unit-run"
    assert run.data.params["epochs"] == "2" and len(run.data.params["long"]) == tracking.PARAM_VALUE_CHARS
    assert run.data.tags["data_sha256"] == "abc"
    assert [m.step for m in client.get_metric_history(tracker.run_id, "val_logloss")] == [1, 2]
    assert run.data.metrics["best_val_logloss"] == pytest.approx(0.2)
    assert [a.path for a in client.list_artifacts(tracker.run_id)] == ["metrics.csv"]


def test_a_server_that_is_down_costs_one_warning(capsys):
    from dss import cli
    cli.setup_logging()
    settings = tracking.TrackingSettings(enabled=True, tracking_uri=f"http://127.0.0.1:{_free_port()}")
    started = time.monotonic()
    tracker = tracking.RunTracker.start(settings, run_name="down")
    tracker.log_params({"a": 1})
    tracker.log_epochs([{"epoch": 1, "val_loss": 1.0}], ("val_loss",))
    tracker.finish()
    seconds = time.monotonic() - started
    output = capsys.readouterr().out
    assert not tracker.active and tracker.run_id is None
    assert output.count("warning: MLflow tracking at") == 1, output
    assert seconds < 60, f"a down server stalled tracking for {seconds:.1f} s"  # catches hangs only


# --------------------------------------------------------------------------- training runs
TRAIN_ARGS = ["--weights", "none", "--epochs", "2", "--image-size", "32", "--batch-size", "16", "--num-threads", "1"]
EPOCH_METRICS = outputs.EPOCH_FIELDS[1:]


def _train(data_dir: Path, models: Path, uri: str | None, *extra) -> subprocess.CompletedProcess:
    env = clean_env(**({"MLFLOW_TRACKING_URI": uri} if uri else {}))
    return run_script("dss_train.py", ["--data-dir", data_dir, "--model-dir", models, *TRAIN_ARGS, *extra], env=env)


def _runs(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id])


def test_a_training_run_appears_with_params_metrics_tags_and_artifacts(mlflow_server, demo_pickles, tmp_path):
    models = tmp_path / "models"
    result = _train(demo_pickles, models, mlflow_server, "--mlflow-experiment", "it-run", "--mlflow-log-model", "true")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "MLflow tracking at" not in result.stdout + result.stderr  # no failure warning
    (run,) = _runs(mlflow_server, "it-run")
    client = MlflowClient(mlflow_server)
    config = json.loads((models / "config.json").read_text())
    metrics = json.loads((models / "metrics.json").read_text())
    assert run.info.status == "FINISHED" and run.info.run_name == f"models resnet18 e2 lr0.001 b16 {config['run_id']}"
    for key in ("epochs", "batch_size", "learning_rate", "weights", "data_sha256", "split_by", "num_train_images"):
        assert run.data.params[key] == str(config[key]), key  # the same content as config.json
    assert run.data.tags["data_sha256"] == config["data_sha256"]
    assert int(run.data.tags["preprocess.train.written"]) == config["num_train_images"] + config["num_val_images"]
    assert int(run.data.tags["preprocess.test.written"]) == config["num_test_images"]
    for name in EPOCH_METRICS:  # one point per epoch, the epoch as step, the values of metrics.json
        history = client.get_metric_history(run.info.run_id, name)
        assert [point.step for point in history] == [1, 2], name
        assert [point.value for point in history] == pytest.approx([e[name] for e in metrics["epochs"]]), name
    assert run.data.metrics["best_val_logloss"] == pytest.approx(metrics["best"]["val_logloss"])
    assert run.data.metrics["best_val_logloss_calibrated"] == pytest.approx(metrics["best"]["val_logloss_calibrated"])
    assert run.data.metrics["served_val_logloss"] == pytest.approx(metrics["calibration"]["logloss_after"])
    assert run.data.metrics["best_epoch"] == metrics["best"]["epoch"]
    artifacts = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    assert {"metrics.csv", "metrics.json", "val_predictions.csv", "test_predictions.csv", "training_curves.png",
            "confusion_matrix.png", "config.json", "model.pth"} <= artifacts, artifacts


def test_a_kfold_run_is_one_mlflow_run_with_each_folds_epochs_and_the_cv_scores(mlflow_server, demo_pickles,
                                                                               tmp_path):
    models = tmp_path / "models"
    result = _train(demo_pickles, models, mlflow_server, "--mlflow-experiment", "it-folds", "--folds", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    (run,) = _runs(mlflow_server, "it-folds")
    client = MlflowClient(mlflow_server)
    metrics = json.loads((models / "metrics.json").read_text())
    for fold in (1, 2):
        history = client.get_metric_history(run.info.run_id, f"fold{fold}_val_logloss")
        epochs = [e for e in metrics["epochs"] if e["fold"] == fold]
        assert [point.step for point in history] == [1, 2]
        assert [point.value for point in history] == pytest.approx([e["val_logloss"] for e in epochs])
    assert run.data.metrics["cv_logloss"] == pytest.approx(metrics["cv"]["logloss"])
    assert run.data.params["folds"] == "2"


def test_without_mlflow_asked_for_nothing_is_tracked(mlflow_server, demo_pickles, tmp_path):
    result = _train(demo_pickles, tmp_path / "models", None, "--mlflow-experiment", "never", "--mlflow", "false")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "MLflow" not in result.stdout and not _runs(mlflow_server, "never")


class _Refusing(http.server.BaseHTTPRequestHandler):
    """A tracking server that answers every request with 403 Forbidden."""

    def _refuse(self):
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error_code": "PERMISSION_DENIED", "message": "no"}')

    do_GET = do_POST = do_PATCH = do_PUT = _refuse

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("server", ["down", "refusing"])
def test_a_tracking_server_that_is_down_or_refuses_costs_one_warning(server, demo_pickles, tmp_path):
    refusing = None
    if server == "down":
        uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    else:
        refusing = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
        threading.Thread(target=refusing.serve_forever, daemon=True).start()
        uri = f"http://127.0.0.1:{refusing.server_address[1]}"
    try:
        started = time.monotonic()
        untracked = _train(demo_pickles, tmp_path / "untracked", None)
        untracked_seconds = time.monotonic() - started
        started = time.monotonic()
        result = _train(demo_pickles, tmp_path / "models", uri, "--mlflow-experiment", "unreachable")
        tracked_seconds = time.monotonic() - started
    finally:
        if refusing is not None:
            refusing.shutdown()
    output = result.stdout + result.stderr
    assert result.returncode == 0 and untracked.returncode == 0, output
    assert output.count("warning: MLflow tracking at") == 1, output
    for name in ("model.pth", "config.json", "metrics.json", "metrics.csv", "test_predictions.csv"):
        assert (tmp_path / "models" / name).is_file(), name  # every local output written
    # The cost (import of mlflow + one refused request) is reported; the bound only catches hangs.
    print(f"{server} tracking server: {tracked_seconds:.1f} s vs {untracked_seconds:.1f} s untracked")
    assert tracked_seconds < untracked_seconds + 60


def test_a_resumed_run_continues_the_same_mlflow_run(mlflow_server, demo_pickles, tmp_path):
    models, ckpt = tmp_path / "models", tmp_path / "ckpt"
    command = [PYTHON, str(REPO_ROOT / "dss_train.py"), "--data-dir", str(demo_pickles), "--model-dir", str(models),
               "--checkpoint-dir", str(ckpt), *TRAIN_ARGS, "--mlflow-experiment", "it-resume"]
    env = clean_env(MLFLOW_TRACKING_URI=mlflow_server)
    process = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + 300
    while not list(ckpt.glob("ckpt-*.json")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # the worst moment: queued MLflow calls of epoch 1 may be lost
    process.communicate(timeout=60)
    assert list(ckpt.glob("ckpt-*.json")), "no checkpoint before the kill"
    result = run_script("dss_train.py", command[2:], env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resuming from" in result.stdout and "MLflow: continuing run" in result.stdout
    (run,) = _runs(mlflow_server, "it-resume")  # one MLflow run for the whole training run
    assert run.info.status == "FINISHED"
    history = MlflowClient(mlflow_server).get_metric_history(run.info.run_id, "val_logloss")
    assert sorted(point.step for point in history) == [1, 2]  # no step duplicated, none missing


@pytest.mark.slow  # six training runs of examples/sweep.sh: make test-all
def test_the_local_sweep_example_logs_one_run_per_combination(mlflow_server, demo_pickles, tmp_path):
    env = clean_env(MLFLOW_TRACKING_URI=mlflow_server, PYTHON=PYTHON, EXPERIMENT="it-sweep",
                    LEARNING_RATES="0.001 0.003", LABEL_SMOOTHINGS="0.1", MODELS=str(tmp_path / "sweep"),
                    EXTRA_ARGS="--weights none --epochs 1 --image-size 32 --batch-size 16 --num-threads 1")
    result = subprocess.run(["bash", str(REPO_ROOT / "examples" / "sweep.sh"), str(demo_pickles)], env=env,
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    runs = _runs(mlflow_server, "it-sweep")
    assert sorted(run.data.params["learning_rate"] for run in runs) == ["0.001", "0.003"]
    assert all(run.data.params["label_smoothing"] == "0.1" and run.info.status == "FINISHED" for run in runs)
    assert all("best_val_logloss" in run.data.metrics for run in runs)
