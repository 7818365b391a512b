"""Site-grouped K-fold training (``--folds K``): the folds of a run, the member model each fold
trains, what the members of one run share, and the out-of-fold scores.

K = 1 is the single validation split (one member, the split ``training_data.load`` made). K > 1:
``split.make_folds`` deals the labelled images into K folds grouped by site (random folds when the
run splits at random), stratified by class as far as the sites allow. Member k trains on the other
folds and is validated on fold k, so every labelled image gets one out-of-fold prediction from the
model that never saw its site; the test set gets the mean of the K members' probabilities. Each
fold keeps its checkpoints in ``<checkpoint dir>/fold-<k>``: a killed run re-uses the finished
folds (their last checkpoint holds the best weights) and resumes the one in progress, so it redoes
at most the epoch that was running.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dss import metrics
from dss.train import checkpoint, split, training
from dss.cli import log
from dss.models import model as model_lib

if TYPE_CHECKING:
    from dss import distributed
    from dss.train import tracking
    from dss.train.checkpoint import TrainingState
    from dss.train.training import Schedule
    from dss.train.training_args import Settings
    from dss.train.training_data import TrainingData


@dataclass(frozen=True)
class Fold:
    """Fold ``number`` (1..``count``) of a run: ``is_val`` bool (N_train,), True = validated on it."""

    number: int
    count: int
    is_val: np.ndarray

    @property
    def in_ensemble(self) -> bool:
        return self.count > 1

    @property
    def name(self) -> str:
        return f"fold {self.number}/{self.count}"

    def seed(self, seed: int) -> int:
        """The member's seed (initialisation, batches): --seed for the first, then one more per
        fold, so the members differ also where their training data overlaps."""
        return seed + self.number - 1

    def checkpoint_dir(self, root: Path | None) -> Path | None:
        return root / f"fold-{self.number}" if root is not None and self.in_ensemble else root

    def fingerprint(self) -> dict:
        """What a checkpoint of this member must also have been made with, beside the run's
        settings (which hold --folds): its fold number (nothing for K = 1)."""
        return {"fold": self.number} if self.in_ensemble else {}

    def tag(self, record: dict) -> dict:
        """An epoch record of this member: with its "fold" when K > 1."""
        return {"fold": self.number, **record} if self.in_ensemble else record


def run_checkpoints(settings: Settings, data: TrainingData, context: distributed.Context,
                    fold: Fold) -> checkpoint.RunCheckpoints:
    """A member's checkpoints: --checkpoint-dir (``fold-<k>`` in it for K > 1), --keep-checkpoints,
    the fingerprint a checkpoint must match, and the model.pth a refusal may suggest fine-tuning from."""
    return checkpoint.RunCheckpoints(fold.checkpoint_dir(settings.checkpoint_dir),
                                     training.checkpoint_fingerprint(settings, data, context, fold.fingerprint()), context,
                                     keep=settings.keep_checkpoints,
                                     model_path=settings.model_dir / model_lib.MODEL_FILENAME)


def plan(folds: int, data: TrainingData, seed: int) -> list[Fold]:
    """The run's folds: one (the loaded split) when ``folds`` is 1, else ``folds`` from
    ``split.make_folds`` by site (or at random when the run splits at random)."""
    if folds == 1:
        return [Fold(1, 1, data.is_val)]
    sites = data.train["sites"] if data.split_by == "site" else None
    fold_of = split.make_folds(data.labels, sites, folds, seed)
    plan_ = [Fold(k + 1, folds, fold_of == k) for k in range(folds)]
    site_array = np.asarray(data.train["sites"], dtype=object)
    log.info(f"{folds} folds by {data.split_by}: " + ", ".join(
        f"{int(fold.is_val.sum())} images / {len(set(site_array[fold.is_val]))} sites" for fold in plan_))
    return plan_


def for_fold(data: TrainingData, fold: Fold) -> TrainingData:
    """``data`` with ``fold``'s validation split (the same splits and placed views)."""
    return data if fold.is_val is data.is_val else dataclasses.replace(data, is_val=fold.is_val)


@dataclass
class Member:
    """One fold's trained model, as the run's outputs need it."""

    fold: Fold
    history: list[dict]             # its epoch records (with "fold" when K > 1)
    best: dict                      # its best epoch's scores, per-class report and confusion matrix
    best_model: dict                # its best epoch's weights (CPU state dict)
    val_probs: np.ndarray           # float64 (N_val of the fold, C): best epoch, after TTA, not calibrated
    test_logits: np.ndarray | None  # float64 (N_test, C): ``dss.models.prediction.predict_logits`` of the best weights
    test_seconds: float


class SharedRun:
    """What the members of one run share: config.json (resolved when the first member starts) and
    the MLflow run (one per run; a resumed run continues the one its checkpoints name). Closing it
    ends the MLflow run."""

    def __init__(self, settings: Settings, context: distributed.Context, tracker_settings: tracking.TrackingSettings):
        self.settings, self.context, self.tracker_settings = settings, context, tracker_settings
        self.config: dict | None = None
        self.tracker: tracking.RunTracker | None = None
        self._scope = contextlib.ExitStack()

    def __enter__(self) -> SharedRun:
        return self

    def __exit__(self, *exc_info) -> None:
        self._scope.__exit__(*exc_info)

    def join(self, state: TrainingState, data: TrainingData, schedule: Schedule, resumed_from: Path | None,
             folds: list[Fold]) -> tracking.RunTracker:
        """The run's tracker, started (and config.json resolved) by the first member to join."""
        if self.tracker is not None:
            state.tracking_run_id = self.tracker.run_id or state.tracking_run_id
            return self.tracker
        self.config = training.run_config(self.settings, data, self.context, schedule, resumed_from)
        if len(folds) > 1:
            self.config.update(num_train_images=int(len(data.labels)), num_val_images=int(len(data.labels)),
                               fold_val_images=[int(fold.is_val.sum()) for fold in folds])
        self.tracker = self._scope.enter_context(training.start_tracking(
            self.tracker_settings, self.settings, state, data, self.config, self.context))
        return self.tracker


def tracked_epochs(records: list[dict], fold: Fold, fields: tuple[str, ...]) -> tuple[list[dict], tuple[str, ...]]:
    """(records, fields) for MLflow's per-epoch metrics: fold k's under ``fold<k>_<field>`` when K > 1,
    so the folds' epochs do not share a step."""
    if not fold.in_ensemble:
        return records, fields
    prefix = f"fold{fold.number}_"
    return ([{"epoch": record["epoch"], **{prefix + name: record[name] for name in fields}} for record in records],
            tuple(prefix + name for name in fields))


def fold_numbers(members: list[Member], num_images: int) -> np.ndarray:
    """int64 (N_train,): the fold (1..K) that validated each labelled image; 0 = none (K = 1: train rows)."""
    fold_of = np.zeros(num_images, dtype=np.int64)
    for member in members:
        fold_of[member.fold.is_val] = member.fold.number
    return fold_of


def raw_validation_probs(members: list[Member], is_val: np.ndarray, num_classes: int) -> np.ndarray:
    """float64 (N_val, C): each validated image's probabilities from the member that held it out,
    in the rows of ``np.flatnonzero(is_val)`` (K = 1: the validation split; K > 1: every image)."""
    probs = np.full((len(is_val), num_classes), np.nan)
    for member in members:
        probs[member.fold.is_val] = member.val_probs
    return probs[is_val]


def oof_best(members: list[Member], labels: np.ndarray, probs: np.ndarray, class_names: list[str]) -> dict:
    """metrics.json's "best" for K > 1: the members' best epochs and the out-of-fold scores of
    their (not calibrated) probabilities, with per-class report and confusion matrix."""
    matrix = metrics.confusion_matrix(labels, np.argmax(probs, axis=1), len(class_names))
    return {"epoch": None, "fold_epochs": [int(member.best["epoch"]) for member in members],
            "val_loss": float(np.mean([member.best["val_loss"] for member in members])),
            "val_logloss": float(metrics.log_loss(probs, labels)),
            "val_acc": metrics.accuracy(probs, labels),
            "per_class": metrics.per_class_report(matrix, class_names), "confusion_matrix": matrix.tolist()}


def cv_record(members: list[Member], labels: np.ndarray, raw_probs: np.ndarray, probs: np.ndarray,
              sites: np.ndarray) -> dict:
    """metrics.json's "cv": out-of-fold log loss and accuracy of the calibrated probabilities
    (``logloss``, ``acc``), the log loss before calibration, and per fold its images, sites and
    best epoch's scores. ``sites``: (N_train,) object array."""
    return {
        "folds": len(members), "images": int(len(labels)),
        "logloss": float(metrics.log_loss(probs, labels)),
        "acc": metrics.accuracy(probs, labels),
        "logloss_before_temperature": float(metrics.log_loss(raw_probs, labels)),
        "per_fold": [{"fold": member.fold.number, "images": int(member.fold.is_val.sum()),
                      "sites": len(set(sites[member.fold.is_val])), "best_epoch": int(member.best["epoch"]),
                      "val_logloss": float(member.best["val_logloss"]), "val_acc": float(member.best["val_acc"])}
                     for member in members],
    }


def cv_metrics_line(cv: dict) -> str:
    """``[METRICS] cv_logloss=0.7012 cv_acc=0.7400 cv_logloss_before_temperature=0.7342``: the
    out-of-fold scores of a K-fold run, printed once at the end (a tuning job's objective)."""
    return (f"[METRICS] cv_logloss={cv['logloss']:.4f} cv_acc={cv['acc']:.4f} "
            f"cv_logloss_before_temperature={cv['logloss_before_temperature']:.4f}")
