"""The files dss_train.py leaves behind, with the column names users and tests depend on.

Model dir: model.pth (dss.models.model's artifact; K members with --folds K) and config.json. Output
dir: metrics.json, metrics.csv, splits.csv, val_predictions.csv (with --folds K > 1 also
oof_predictions.csv), test_predictions.csv (the submission) with predictions.csv (the same rows,
readable: site, predicted class), and the plots drawn by dss.metrics and dss.train.diagnostics. Every file is written atomically through dss.fileio, and a training run's files
are published together (``fileio.StagedFiles``, ``write_all_outputs``): a run that fails while writing
its outputs leaves the previous run's files as they were.
Also the fixed ``[METRICS]`` stdout line that SageMaker ``metric_definitions`` regexes parse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from dss import fileio, metrics
from dss.cli import log
from dss.models import model as model_lib
from dss.predict import results
from dss.predict.results import PREDICTIONS, TEST_PREDICTIONS, write_probabilities
from dss.train import diagnostics, previous_runs

# Order of the per-epoch fields in metrics.csv and in metrics.json's "epochs" records.
EPOCH_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_logloss", "val_acc", "lr",
                "epoch_seconds", "train_images_per_s", "val_logloss_calibrated")
# Order of the fields on the stdout [METRICS] line (fixed: users' regexes depend on it).
# val_logloss_calibrated (what the default --best-epoch-by compares) comes last, after the fields earlier
# versions printed, so their regexes keep matching.
METRICS_LINE_FIELDS = ("train_loss", "train_acc", "val_loss", "val_acc", "val_logloss", "val_logloss_calibrated")
# The run's objective on the final [METRICS] line, for a one-split and a K-fold run alike: the validation
# (K > 1: out-of-fold) log loss of the probabilities the run serves, after temperature scaling when it is on.
SERVED_METRIC = "served_val_logloss"
def metrics_line(record: dict) -> str:
    """``[METRICS] epoch=3 train_loss=0.4123 train_acc=0.8512 val_loss=0.5000 val_acc=0.8000 val_logloss=0.5100``"""
    values = " ".join(f"{name}={float(record[name]):.4f}" for name in METRICS_LINE_FIELDS)
    return f"[METRICS] epoch={int(record['epoch'])} {values}"


def best_metrics_line(best: dict, served_logloss: float) -> str:
    """``[METRICS] best_epoch=7 best_val_loss=... best_val_acc=... best_val_logloss=...
    best_val_logloss_calibrated=... served_val_logloss=...``, printed once at the end;
    ``served_val_logloss`` is what a SageMaker hyperparameter tuning job should minimise: the
    validation log loss of the probabilities the run serves."""
    names = ("val_loss", "val_acc", "val_logloss", "val_logloss_calibrated")
    values = " ".join(f"best_{name}={float(best[name]):.4f}" for name in names)
    return f"[METRICS] best_epoch={int(best['epoch'])} {values} {SERVED_METRIC}={served_logloss:.4f}"


def _number(value) -> str:
    # repr keeps every digit, so a log loss recomputed from the CSV matches metrics.json.
    value = float(value)
    return repr(value) if math.isfinite(value) else str(value)


def write_metrics(json_path: str | Path, csv_path: str | Path, epochs: list[dict], best: dict, test: dict,
                  extra: dict | None = None) -> None:
    """metrics.json ({"epochs", "best", "test"}, then the sections of ``extra``, e.g. "calibration";
    an epoch record may carry more than EPOCH_FIELDS, e.g. "per_class") and metrics.csv (one row per
    epoch, exactly EPOCH_FIELDS; after a "fold" column when the records have one: --folds K > 1)."""
    fileio.write_json(json_path, {"epochs": epochs, "best": best, "test": test, **(extra or {})})
    leading = ("fold", "epoch") if epochs and "fold" in epochs[0] else ("epoch",)
    rows = [[int(record[name]) for name in leading] + [_number(record[name]) for name in EPOCH_FIELDS[1:]]
            for record in epochs]
    fileio.write_text(csv_path, results.csv_text(leading + EPOCH_FIELDS[1:], rows))


def write_splits(path: str | Path, ids: Sequence[str], sites: Sequence[str], is_val: np.ndarray,
                 fold_of: np.ndarray | None = None) -> None:
    """splits.csv: id, site, split in {train, val}; one row per training image, pickle order. With
    ``fold_of`` (--folds K > 1) a "fold" column (1..K) too: every image is "val" in its own fold."""
    rows = [[image_id, site, "val" if flag else "train"] for image_id, site, flag in zip(ids, sites, is_val)]
    header = ("id", "site", "split")
    if fold_of is not None:
        rows, header = [row + [int(fold)] for row, fold in zip(rows, fold_of)], header + ("fold",)
    fileio.write_text(path, results.csv_text(header, rows))


@dataclass
class RunResult:
    """A finished training run as its outputs need it (``write_all_outputs`` writes them)."""

    model_dir: Path
    output_dir: Path
    data_dir: Path                 # preprocess's summaries there name the skipped test images
    history: list[dict]            # one record per epoch (per member): EPOCH_FIELDS, "per_class" (K > 1: "fold")
    best: dict                     # the best epoch's (K > 1: out-of-fold) scores, per-class report, confusion matrix
    members: list[dict]            # the best epoch's state dict of each member (one for --folds 1)
    best_val_probs: np.ndarray     # float64 (N_val, C), validation (K > 1: out-of-fold) rows in split order (calibrated)
    train: dict                    # the train split: ids, sites, labels
    is_val: np.ndarray             # bool (N_train,), True = validation (K > 1: all)
    fold_of: np.ndarray | None     # int64 (N_train,): the fold 1..K that validated each image; None for K = 1
    test: dict | None              # the test split; None when preprocess wrote train data only
    test_probs: np.ndarray | None  # float64 (N_test, C)
    test_info: dict                # TTA and seconds, or why there are no test predictions
    prior: np.ndarray              # float64 (C,): class shares of the labelled training images
    class_names: list[str]
    preprocessing: dict            # stored in model.pth, so inference preprocesses as training did
    config: dict                   # config.json
    hyperparameters: dict          # stored in model.pth: the recipe (with "arch"), "tta", "temperature"
    calibration: dict              # metrics.json's "calibration": temperature, log loss and ECE before/after
    cv: dict | None                # metrics.json's "cv" (out-of-fold scores, dss.train.crossval.cv_record); None for K = 1
    top_losses: tuple              # (validation row indices, uint8 (k, H, W, 3) images), highest loss first

    @property
    def served_logloss(self) -> float:
        """The validation (K > 1: out-of-fold) log loss of the probabilities the run serves: after
        the fitted temperature when temperature scaling is on (what the epoch was chosen by with the
        default --best-epoch-by), else as predicted. One number for K = 1 and K > 1 alike."""
        return float(self.calibration["logloss_after"])

    def headline(self) -> dict:
        """The run's numbers to compare runs by (MLflow run metrics): the best epoch's validation
        scores (best_epoch, best_val_*), or with --folds K > 1 the out-of-fold ones (cv_*), and
        ``served_val_logloss``, the same figure for both."""
        if self.cv is not None:  # the cv_* fields first, as earlier versions printed them
            return {"cv_logloss": self.cv["logloss"], "cv_acc": self.cv["acc"],
                    "cv_logloss_before_temperature": self.cv["logloss_before_temperature"],
                    SERVED_METRIC: self.served_logloss}
        names = ("epoch", "val_loss", "val_logloss", "val_logloss_calibrated", "val_acc")
        return {SERVED_METRIC: self.served_logloss, **{f"best_{name}": self.best[name] for name in names}}

    def metrics_line(self) -> str:
        """The final [METRICS] line: ``best_metrics_line``, or with --folds K > 1 the out-of-fold scores."""
        if self.cv is None:
            return best_metrics_line(self.best, self.served_logloss)
        return "[METRICS] " + " ".join(f"{name}={value:.4f}" for name, value in self.headline().items())

    def summary(self) -> str:
        """The run's result in words, for the last log line."""
        served = (f"served log loss {self.served_logloss:.4f}"
                  + (" after temperature scaling" if self.calibration.get("temperature_scaling") else ""))
        if self.cv is None:
            return (f"best epoch {self.best['epoch']} (val_logloss {self.best['val_logloss']:.4f}, "
                    f"val_acc {self.best['val_acc']:.4f}; {served})")
        return (f"{self.cv['folds']} folds, best epochs {self.best['fold_epochs']} (out-of-fold log loss "
                f"{self.cv['logloss']:.4f}, accuracy {self.cv['acc']:.4f}; {served})")


OOF_PREDICTIONS = "oof_predictions.csv"


def write_validation_files(stage: fileio.StagedFiles, result: RunResult) -> None:
    """splits.csv and val_predictions.csv (id, site, label, probabilities of the validation rows);
    with --folds K > 1 oof_predictions.csv (id, site, fold, label, probabilities of every labelled
    image, from the member that did not train on its fold), else an earlier run's one is removed."""
    folder, train, class_names = result.output_dir, result.train, result.class_names
    val_index = np.flatnonzero(result.is_val)
    write_splits(stage.path(folder / "splits.csv"), train["ids"], train["sites"], result.is_val, result.fold_of)
    columns = {"id": [train["ids"][i] for i in val_index], "site": [train["sites"][i] for i in val_index],
               "label": [class_names[int(k)] for k in train["labels"][val_index]]}
    write_probabilities(stage.path(folder / "val_predictions.csv"), columns, result.best_val_probs, class_names)
    if result.fold_of is None:
        stage.remove(folder / OOF_PREDICTIONS)
        return
    oof_columns = {"id": columns["id"], "site": columns["site"], "fold": [int(result.fold_of[i]) for i in val_index],
                   "label": columns["label"]}
    write_probabilities(stage.path(folder / OOF_PREDICTIONS), oof_columns, result.best_val_probs, class_names)


def write_diagnostics(stage: fileio.StagedFiles, result: RunResult) -> dict:
    """Where the model fails, from the validation predictions as val_predictions.csv holds them:
    site_metrics.csv, calibration.png and top_losses.png (staged in the output dir). Returns
    metrics.json's "calibration" record with the ECE of those predictions ("ece")."""
    folder, train, val_index = result.output_dir, result.train, np.flatnonzero(result.is_val)
    labels, probs = np.asarray(train["labels"])[val_index], result.best_val_probs
    table = diagnostics.site_metrics([train["sites"][i] for i in val_index], labels, probs, result.class_names)
    diagnostics.write_site_metrics(stage.path(folder / "site_metrics.csv"), table)
    ece = diagnostics.plot_calibration(probs, labels, stage.path(folder / "calibration.png"))
    order, images = result.top_losses
    diagnostics.plot_top_losses(images, labels[order], probs[order], result.class_names,
                                stage.path(folder / "top_losses.png"), k=len(order),
                                ids=[train["ids"][val_index[i]] for i in order])
    return {**result.calibration, "ece": ece}


# Every file a training run leaves: in the model dir, and in the output dir. An earlier run's are
# moved aside together (dss.train.previous_runs) before another run's are published.
MODEL_FILES = (model_lib.MODEL_FILENAME, "config.json")
OUTPUT_FILES = ("metrics.json", "metrics.csv", "splits.csv", "val_predictions.csv", OOF_PREDICTIONS, TEST_PREDICTIONS,
                PREDICTIONS, "site_metrics.csv", "calibration.png", "top_losses.png", "training_curves.png",
                "confusion_matrix.png")


def members_bytes(members: list[dict]) -> int:
    """Bytes of the members' tensors: about the size of model.pth."""
    return sum(tensor.numel() * tensor.element_size() for member in members for tensor in member.values())


def write_all_outputs(result: RunResult, keep_previous: int) -> None:
    """Every output, rendered into staging folders first and published together only when all of
    them were written: a failure here leaves the previous run's files as they were. Before they
    are published, an earlier run with other settings or data moves into ``previous/``
    (``dss.train.previous_runs``; the newest ``keep_previous`` kept there)."""
    model_dir, output_dir, class_names = result.model_dir, result.output_dir, result.class_names
    model_dir.mkdir(parents=True, exist_ok=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    with fileio.StagedFiles() as stage:
        write_validation_files(stage, result)
        test_path, readable_path = output_dir / TEST_PREDICTIONS, output_dir / PREDICTIONS
        if result.test is not None:
            test_summary = results.write_test_predictions((stage.path(test_path), stage.path(readable_path)), result.data_dir,
                                                  result.test, result.test_probs, result.prior, class_names)
        else:
            # An earlier run's predictions beside this run's model would be taken for this model's.
            stage.remove(test_path)
            stage.remove(readable_path)
            test_summary = {}
        test_summary.update(result.test_info)
        calibration_record = write_diagnostics(stage, result)
        extra = {"calibration": calibration_record, **({"cv": result.cv} if result.cv is not None else {})}
        write_metrics(stage.path(output_dir / "metrics.json"), stage.path(output_dir / "metrics.csv"),
                      result.history, result.best, test_summary, extra)
        metrics.plot_training_curves(result.history, stage.path(output_dir / "training_curves.png"),
                                     result.best.get("fold_epochs") or [result.best["epoch"]])
        metrics.plot_confusion_matrix(np.asarray(result.best["confusion_matrix"]), class_names,
                                      stage.path(output_dir / "confusion_matrix.png"))
        fileio.write_json(stage.path(model_dir / "config.json"), result.config)
        network = model_lib.build_model(len(class_names), "none", result.hyperparameters["arch"])
        network.load_state_dict(result.members[0])
        log.info(f"writing {model_dir / model_lib.MODEL_FILENAME}: {len(result.members)} member(s), about "
                 f"{members_bytes(result.members) / 1e6:.0f} MB")
        # model.pth staged (so published) last: its presence means the whole run succeeded.
        model_lib.save_model_artifact(stage.path(model_dir / model_lib.MODEL_FILENAME), network, class_names,
                                      result.preprocessing, result.hyperparameters, other_members=result.members[1:])
        stage.check()  # what could stop the publishing fails here, before the earlier run is moved
        moved = previous_runs.set_aside(model_dir, output_dir, result.config["run_key"], MODEL_FILES, OUTPUT_FILES)
        for removed in stage.publish():
            log.info(f"removed {removed} (from an earlier run; this data has no test split)")
        previous_runs.prune(moved, keep_previous)
    if result.test is not None:
        log.info(f"test predictions: {test_summary['num_images']} rows -> {test_path} (submission), {readable_path}")
