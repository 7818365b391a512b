"""The end of a training run, after the epoch loops: each member's best weights back in the
network and its test logits (``close_member``); then for the run (``finish``) the temperature
fitted on the validation logits (K = 1) or the out-of-fold logits (K > 1) with
``--temperature-scaling``, the test predictions (the mean of the members' calibrated
probabilities), the validation images with the highest loss, and the ``outputs.RunResult`` that
``outputs.write_all_outputs`` turns into files.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from dss.models import calibration
from dss.train import crossval, diagnostics, outputs, training, training_args
from dss.cli import log
from dss.models import prediction

if TYPE_CHECKING:
    from dss.train.checkpoint import TrainingState
    from dss.train.training_data import TrainingData

TOP_LOSSES = 16  # validation images shown in top_losses.png


def calibrate(enabled: bool, val_probs: np.ndarray, val_labels: np.ndarray, fitted_on: str
              ) -> tuple[float, dict, np.ndarray]:
    """(temperature, metrics.json's "calibration" record, the validation probabilities at that
    temperature). The logits are the log of the best epochs' validation (or out-of-fold)
    probabilities, after TTA when it is on: ``engine.evaluate``'s logits, up to rounding.
    ``fitted_on`` names them in the record. Off: T = 1, probabilities kept."""
    logits = np.log(np.maximum(np.asarray(val_probs, dtype=np.float64), np.finfo(np.float64).tiny))
    temperature = calibration.fit_temperature(logits, val_labels) if enabled else 1.0
    record = {"temperature_scaling": bool(enabled), "fitted_on": fitted_on,
              **calibration.summary(logits, val_labels, temperature)}
    if not enabled:
        return 1.0, record, np.asarray(val_probs, dtype=np.float64)
    log.info(f"temperature scaling on {fitted_on} logits: T={temperature:.4f}, log loss {record['logloss_before']:.4f} -> "
             f"{record['logloss_after']:.4f}, ECE {record['ece_before']:.4f} -> {record['ece_after']:.4f}")
    return temperature, record, calibration.apply_temperature(logits, temperature)


def top_loss_images(data: TrainingData, val_index: np.ndarray, val_probs: np.ndarray, val_labels: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(validation row indices, uint8 (k, H, W, 3) images) of the ``TOP_LOSSES`` highest-loss rows,
    highest first; ``val_index``: the validation rows' indices in the train split."""
    order, _ = diagnostics.top_losses(val_probs, val_labels, TOP_LOSSES)
    if order.size == 0:
        return order, np.zeros((0, 1, 1, 3), dtype=np.uint8)
    rows = val_index[order]
    ascending = np.argsort(rows)  # streamed splits read rows in file order
    shown = data.place(data.train["images"], rows[ascending])  # only these k images
    batch = shown.gather(torch.as_tensor(np.argsort(ascending), dtype=torch.long))  # uint8 (k, 3, H, W), in order
    data.release(shown)
    return order, batch.permute(0, 2, 3, 1).cpu().numpy()


def close_member(state: TrainingState, fold: crossval.Fold, eval_model: torch.nn.Module,
                 inference: prediction.Inference, data: TrainingData) -> crossval.Member:
    """Load the member's best epoch's weights and predict the test split's logits with them
    (every rank must call: under DDP the ranks share the prediction)."""
    state.model.load_state_dict(state.best_model)  # the final model and outputs are the best epoch's
    eval_model.eval()
    test_logits, tick = None, time.monotonic()
    if data.test is not None:
        test_images = data.place(data.test["images"])
        test_logits = prediction.predict_logits(eval_model, test_images, inference)
        data.release(test_images)
    return crossval.Member(fold, state.history, state.best, state.best_model, state.best_val_probs, test_logits,
                           time.monotonic() - tick)


def finish(settings: training_args.Settings, members: list[crossval.Member], data: TrainingData, config: dict
           ) -> outputs.RunResult:
    """Calibrate the validation (K = 1) or out-of-fold (K > 1) probabilities, average the members'
    calibrated test probabilities and gather what the outputs need."""
    ensemble = len(members) > 1
    is_val = np.ones(len(data.labels), dtype=bool) if ensemble else members[0].fold.is_val
    val_index = np.flatnonzero(is_val)
    val_labels = data.labels[val_index]
    raw_probs = crossval.raw_validation_probs(members, is_val, data.num_classes)
    fitted_on = ("out-of-fold" if ensemble else "validation") + (" (TTA)" if settings.tta else "")
    temperature, calibration_record, val_probs = calibrate(settings.temperature_scaling, raw_probs, val_labels,
                                                           fitted_on)
    test_probs, test_info = None, {"skipped": f"no test_data.pkl in {settings.data_dir}"}
    if data.test is not None:
        # The mean of the members' probabilities at the temperature: what predict-only and hosting compute.
        test_probs = calibration.ensemble_probs(np.stack([member.test_logits for member in members]), temperature)
        test_info = {"tta": bool(settings.tta), "temperature": temperature, "members": len(members),
                     "seconds": sum(member.test_seconds for member in members)}
    sites = np.asarray(data.train["sites"], dtype=object)
    cv = crossval.cv_record(members, val_labels, raw_probs, val_probs, sites) if ensemble else None
    best = (crossval.oof_best(members, val_labels, raw_probs, data.class_names) if ensemble
            else members[0].best)
    hyperparameters = {**training.recipe(settings, data), "temperature": temperature,
                       "best_epoch": best["epoch"] if not ensemble else best["fold_epochs"]}
    return outputs.RunResult(
        model_dir=settings.model_dir, output_dir=settings.output_dir, data_dir=settings.data_dir,
        history=[record for member in members for record in member.history], best=best,
        members=[member.best_model for member in members], best_val_probs=val_probs,
        train=data.train, is_val=is_val, fold_of=crossval.fold_numbers(members, len(is_val)) if ensemble else None,
        test=data.test, test_probs=test_probs, test_info=test_info, prior=data.prior, class_names=data.class_names,
        preprocessing=training.artifact_info(settings, data)["preprocessing"], config=config,
        hyperparameters=hyperparameters, calibration=calibration_record, cv=cv,
        top_losses=top_loss_images(data, val_index, val_probs, val_labels))
