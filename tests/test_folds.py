"""--folds K: site-grouped K-fold training as real dss_train.py subprocesses on the demo pickles.

Every labelled image gets exactly one out-of-fold prediction from the member that never saw its
site; metrics.json "cv" and the final [METRICS] line are those predictions' scores; the test
predictions are the mean of the members' calibrated probabilities, and predict-only and the
hosting handlers compute the same numbers from model.pth's K members; a K-fold run killed in its
second fold resumes there and ends as the uninterrupted run.
"""

from __future__ import annotations

import base64
import json
import re
import signal
import subprocess
import time

import numpy as np
import pandas as pd
import pytest
import torch

from dss.models import calibration
from dss.train import crossval
from dss.data import dataset
from dss import metrics
from dss.predict import serve
from dss.models import model as model_lib
from dss.models.loader import DeviceImages
from dss.models import prediction
from tests.conftest import PYTHON, REPO_ROOT, clean_env, run_script

K = 3
COMMON = ["--epochs", "2", "--batch-size", "16", "--weights", "none", "--num-threads", "1", "--seed", "0"]
CV_LINE = (r"^\[METRICS\] cv_logloss=\d+\.\d{4} cv_acc=\d+\.\d{4} cv_logloss_before_temperature=\d+\.\d{4} "
           r"served_val_logloss=\d+\.\d{4}$")


def train(data_dir, model_dir, *extra, timeout=600):
    return run_script("dss_train.py", ["--data-dir", data_dir, "--model-dir", model_dir, *COMMON, *extra],
                      timeout=timeout)


@pytest.fixture(scope="module")
def kfold(demo_pickles, tmp_path_factory):
    root = tmp_path_factory.mktemp("kfold")
    result = train(demo_pickles, root / "models", "--folds", str(K), "--checkpoint-dir", root / "ckpt")
    assert result.returncode == 0, result.stdout + result.stderr
    return {"models": root / "models", "ckpt": root / "ckpt", "stdout": result.stdout}


def class_columns(frame: pd.DataFrame, class_names: list[str]) -> np.ndarray:
    return frame[class_names].to_numpy(dtype=np.float64)


def test_every_labelled_image_is_predicted_once_by_the_member_that_never_saw_its_site(kfold, demo_pickles):
    train_split = dataset.load_split(demo_pickles, "train")
    class_names = list(train_split["class_names"])
    oof = pd.read_csv(kfold["models"] / "oof_predictions.csv", dtype={"id": str, "site": str})
    assert list(oof.columns) == ["id", "site", "fold", "label", *class_names]
    assert sorted(oof["id"]) == sorted(train_split["ids"])                  # every labelled image, once
    assert set(oof["fold"]) == set(range(1, K + 1))
    assert oof.groupby("site")["fold"].nunique().max() == 1                 # no site in two folds
    truth = dict(zip(train_split["ids"], (class_names[k] for k in train_split["labels"])))
    assert all(truth[image_id] == label for image_id, label in zip(oof["id"], oof["label"]))
    probs = class_columns(oof, class_names)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    # The member of fold k validated fold k: splits.csv says the same, and its training rows are the others.
    splits = pd.read_csv(kfold["models"] / "splits.csv", dtype={"id": str, "site": str})
    assert list(splits.columns) == ["id", "site", "split", "fold"] and set(splits["split"]) == {"val"}
    assert dict(zip(splits["id"], splits["fold"])) == dict(zip(oof["id"], oof["fold"]))
    val = pd.read_csv(kfold["models"] / "val_predictions.csv", dtype={"id": str, "site": str})
    np.testing.assert_array_equal(class_columns(val, class_names), probs)


def test_cv_metrics_are_the_scores_of_the_out_of_fold_predictions(kfold):
    models = kfold["models"]
    report = json.loads((models / "metrics.json").read_text())
    oof = pd.read_csv(models / "oof_predictions.csv", dtype={"id": str, "site": str})
    class_names = list(oof.columns[4:])
    labels = np.array([class_names.index(label) for label in oof["label"]])
    probs = class_columns(oof, class_names)
    cv = report["cv"]
    assert cv["folds"] == K and cv["images"] == len(oof)
    assert cv["logloss"] == pytest.approx(metrics.log_loss(probs, labels), rel=1e-12)
    assert cv["acc"] == metrics.accuracy(probs, labels)
    assert [entry["fold"] for entry in cv["per_fold"]] == list(range(1, K + 1))
    assert sum(entry["images"] for entry in cv["per_fold"]) == len(oof)
    assert report["calibration"]["fitted_on"] == "out-of-fold (TTA)"  # TTA is on by default
    assert report["calibration"]["logloss_after"] == pytest.approx(cv["logloss"], abs=1e-6)
    assert report["calibration"]["logloss_before"] == pytest.approx(cv["logloss_before_temperature"], abs=1e-6)
    assert report["best"]["val_logloss"] == pytest.approx(cv["logloss_before_temperature"], rel=1e-12)
    # One line for SageMaker's metric_definitions / a tuning job's objective, printed once at the end.
    lines = [line for line in kfold["stdout"].splitlines() if line.startswith("[METRICS] cv_")]
    assert len(lines) == 1
    assert re.match(CV_LINE, lines[0]) and f"cv_logloss={cv['logloss']:.4f}" in lines[0]
    # metrics.csv: the K members' epochs, each with its fold.
    frame = pd.read_csv(models / "metrics.csv")
    assert list(frame.columns[:2]) == ["fold", "epoch"]
    assert list(zip(frame["fold"], frame["epoch"])) == [(f, e) for f in range(1, K + 1) for e in (1, 2)]
    for name in ("site_metrics.csv", "calibration.png", "top_losses.png", "training_curves.png"):
        assert (models / name).is_file(), name
    sites = pd.read_csv(models / "site_metrics.csv", dtype={"site": str})
    assert sites["images"].sum() == len(oof) and set(sites["site"]) == set(oof["site"])


def test_test_predictions_are_the_mean_of_the_members_calibrated_probabilities(kfold, demo_pickles):
    models = kfold["models"]
    networks, info = model_lib.load_ensemble(models / "model.pth")
    assert info["members"] == K and len(networks) == K
    assert info["hyperparameters"]["folds"] == K
    temperature = info["hyperparameters"]["temperature"]
    test = dataset.load_split(demo_pickles, "test")
    assert info["hyperparameters"]["tta"] is True  # the default: each member's flip-averaged probabilities
    how = prediction.Inference(64, int(info["preprocessing"]["image_size"]), None, True,
                           normalisation=model_lib.artifact_normalisation(info))
    images = DeviceImages(test["images"], torch.device("cpu"))
    # Independently: each member's probabilities at the temperature (prediction.predict_probs), then the mean.
    expected = np.mean([prediction.predict_probs(network, images, how, temperature) for network in networks], axis=0)
    written = pd.read_csv(models / "test_predictions.csv", dtype={"id": str}).set_index("id").loc[test["ids"]]
    np.testing.assert_allclose(written.to_numpy(dtype=np.float64), expected, rtol=0, atol=1e-9)
    # The members differ (different folds, different seeds): an ensemble, not K copies.
    first = prediction.predict_probs(networks[0], images, how)
    assert not np.allclose(first, prediction.predict_probs(networks[1], images, how))
    # A plain load still gives one working network (the first member).
    single, single_info = model_lib.load_model_artifact(models / "model.pth")
    np.testing.assert_allclose(prediction.predict_probs(single, images, how), first, atol=1e-12)
    assert single_info["members"] == K


def test_predict_only_and_hosting_use_the_whole_ensemble(kfold, demo_pickles, demo_data, tmp_path):
    models = kfold["models"]
    result = run_script("dss_train.py", ["--data-dir", demo_pickles, "--model-dir", models, "--output-dir", tmp_path,
                                         "--predict-only", "--num-threads", "1"])
    assert result.returncode == 0, result.stdout + result.stderr
    ours = pd.read_csv(tmp_path / "test_predictions.csv")
    theirs = pd.read_csv(models / "test_predictions.csv")
    assert ours["id"].tolist() == theirs["id"].tolist()
    np.testing.assert_allclose(ours.iloc[:, 1:].to_numpy(), theirs.iloc[:, 1:].to_numpy(), rtol=0, atol=1e-9)
    assert json.loads((tmp_path / "predictions_info.json").read_text())["members"] == K
    # Hosting: the same frames as bytes, decoded by the handlers, give the same probabilities.
    served = serve.model_fn(str(models))
    assert len(served.networks) == K
    features = pd.read_csv(demo_data / "test_features.csv", dtype={"id": str})
    chosen = features.head(4)
    payload = [(demo_data / path).read_bytes() for path in chosen["filepath"]]
    response = serve.predict_fn(serve.input_fn(json.dumps(
        {"instances": [{"b64": base64.b64encode(data).decode()} for data in payload]}),
        "application/json"), served)
    expected = theirs.set_index("id").loc[chosen["id"]].to_numpy(dtype=np.float64)
    np.testing.assert_allclose(response["probs"], expected, rtol=0, atol=1e-6)


def test_a_kfold_run_stopped_in_its_second_fold_resumes_there_and_ends_as_the_uninterrupted_run(
        kfold, demo_pickles, tmp_path):
    ckpt, models = tmp_path / "ckpt", tmp_path / "models"
    command = [PYTHON, str(REPO_ROOT / "dss_train.py"), "--data-dir", str(demo_pickles), "--model-dir", str(models),
               "--checkpoint-dir", str(ckpt), "--folds", str(K), *COMMON]
    process = subprocess.Popen(command, env=clean_env(), cwd=REPO_ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list((ckpt / "fold-2").glob("ckpt-*.json")):  # fold 2 has finished an epoch
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before fold 2's checkpoint"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stdout + stderr
    assert not (models / "model.pth").exists()
    result = train(demo_pickles, models, "--folds", str(K), "--checkpoint-dir", ckpt)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resuming from {ckpt / 'fold-1'}" in result.stdout and "(end of epoch 2," in result.stdout
    assert f"resuming from {ckpt / 'fold-2'}" in result.stdout
    # Fold 1 was finished: nothing of it is trained again (no fold 1 epoch lines).
    assert "fold 1/3 epoch" not in result.stdout
    ours = pd.read_csv(models / "metrics.csv")
    theirs = pd.read_csv(kfold["models"] / "metrics.csv")
    columns = ["fold", "epoch", "train_loss", "train_acc", "val_loss", "val_logloss", "val_acc", "lr"]
    np.testing.assert_allclose(ours[columns].to_numpy(), theirs[columns].to_numpy(), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(pd.read_csv(models / "test_predictions.csv").iloc[:, 1:].to_numpy(),
                               pd.read_csv(kfold["models"] / "test_predictions.csv").iloc[:, 1:].to_numpy(),
                               rtol=0, atol=1e-12)


def test_checkpoints_of_another_fold_count_are_refused(kfold, demo_pickles, tmp_path):
    result = train(demo_pickles, tmp_path / "models", "--folds", "2", "--checkpoint-dir", kfold["ckpt"])
    assert result.returncode == 1
    assert "folds: checkpoint has 3, this run has 2" in result.stderr
    assert not (tmp_path / "models" / "model.pth").exists()


def test_a_single_split_run_writes_no_out_of_fold_file_and_removes_a_stale_one(kfold, demo_pickles, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "oof_predictions.csv").write_text("id\n")  # an earlier K-fold run's, in the same folder
    result = train(demo_pickles, models, "--epochs", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (models / "oof_predictions.csv").exists()
    assert "cv" not in json.loads((models / "metrics.json").read_text())
    assert list(pd.read_csv(models / "splits.csv").columns) == ["id", "site", "split"]
    assert "[METRICS] best_epoch=1 " in result.stdout and "cv_logloss" not in result.stdout


# --------------------------------------------------------------------------- the pieces, in process
def test_fold_plan_on_the_demo_split(demo_pickles):
    from dss.train.training_data import TrainingData

    train_split = dataset.load_split(demo_pickles, "train")
    data = TrainingData(train_split, None, "host", torch.device("cpu"), 32, "site",
                        np.zeros(len(train_split["ids"]), dtype=bool), "sha")
    folds = crossval.plan(4, data, seed=0)
    assert [fold.number for fold in folds] == [1, 2, 3, 4]
    coverage = np.sum([fold.is_val for fold in folds], axis=0)
    np.testing.assert_array_equal(coverage, 1)                            # each image validated by one fold
    sites = np.asarray(train_split["sites"])
    for one in folds:
        for other in folds:
            if one is not other:
                assert not set(sites[one.is_val]) & set(sites[other.is_val])
    assert [fold.seed(7) for fold in folds] == [7, 8, 9, 10]
    assert folds[1].fingerprint() == {"fold": 2}  # --folds itself is a setting of the run's fingerprint
    single = crossval.plan(1, data, seed=0)
    assert len(single) == 1 and single[0].is_val is data.is_val and single[0].fingerprint() == {}
    assert single[0].checkpoint_dir(None) is None and folds[2].checkpoint_dir(REPO_ROOT) == REPO_ROOT / "fold-3"


def test_tracked_epochs_keep_the_folds_apart():
    fold = crossval.Fold(2, 3, np.zeros(3, dtype=bool))
    records, fields = crossval.tracked_epochs([{"epoch": 1, "val_logloss": 0.5}], fold, ("val_logloss",))
    assert fields == ("fold2_val_logloss",) and records == [{"epoch": 1, "fold2_val_logloss": 0.5}]
    single = crossval.Fold(1, 1, np.zeros(3, dtype=bool))
    assert crossval.tracked_epochs([{"epoch": 1}], single, ("x",)) == ([{"epoch": 1}], ("x",))


def test_ensemble_probs_of_one_member_is_the_calibrated_softmax():
    logits = np.random.default_rng(0).normal(size=(1, 5, 4))
    np.testing.assert_allclose(calibration.ensemble_probs(logits, 1.7), calibration.apply_temperature(logits[0], 1.7),
                               rtol=0, atol=1e-15)


def test_more_folds_than_sites_is_an_error_that_says_what_to_do(demo_pickles, tmp_path):
    result = train(demo_pickles, tmp_path / "models", "--folds", "100")  # 160 images, 24 sites
    assert result.returncode == 1
    assert "100 site-grouped folds need at least 100 distinct sites, found" in result.stderr
    assert "use fewer folds or random folds" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "models" / "model.pth").exists()
