"""The end of a training run, after the epoch loop: the best epoch's weights back in the network,
the temperature fitted on its validation logits (``--temperature-scaling``), the test
predictions at that temperature, the validation images with the highest loss, and the
``outputs.RunResult`` that ``outputs.write_all_outputs`` turns into files.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from dss import calibration, diagnostics, engine, outputs
from dss.cli import log

if TYPE_CHECKING:
    from dss.checkpoint import TrainingState
    from dss.training import Settings
    from dss.training_data import TrainingData

TOP_LOSSES = 16  # validation images shown in top_losses.png


def calibrate(enabled: bool, val_probs: np.ndarray, val_labels: np.ndarray, tta: bool
              ) -> tuple[float, dict, np.ndarray]:
    """(temperature, metrics.json's "calibration" record, the validation probabilities at that
    temperature). The logits are the log of the best epoch's validation probabilities (after TTA
    when it is on): ``engine.evaluate``'s logits, up to rounding. Off: T = 1, probabilities kept."""
    logits = np.log(np.maximum(np.asarray(val_probs, dtype=np.float64), np.finfo(np.float64).tiny))
    temperature = calibration.fit_temperature(logits, val_labels) if enabled else 1.0
    record = {"temperature_scaling": bool(enabled), "fitted_on": "validation" + (" (TTA)" if tta else ""),
              **calibration.summary(logits, val_labels, temperature)}
    if not enabled:
        return 1.0, record, np.asarray(val_probs, dtype=np.float64)
    log.info(f"temperature scaling: T={temperature:.4f}, val log loss {record['logloss_before']:.4f} -> "
             f"{record['logloss_after']:.4f}, ECE {record['ece_before']:.4f} -> {record['ece_after']:.4f}")
    return temperature, record, calibration.apply_temperature(logits, temperature)


def top_loss_images(val_images, val_probs: np.ndarray, val_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(validation row indices, uint8 (k, H, W, 3) images) of the ``TOP_LOSSES`` highest-loss rows,
    highest first; ``val_images`` is the placed view the run evaluated."""
    order, _ = diagnostics.top_losses(val_probs, val_labels, TOP_LOSSES)
    if order.size == 0:
        return order, np.zeros((0, 1, 1, 3), dtype=np.uint8)
    batch = val_images.gather(torch.as_tensor(order, dtype=torch.long))  # uint8 (k, 3, H, W)
    return order, batch.permute(0, 2, 3, 1).cpu().numpy()


def finish(settings: Settings, state: TrainingState, data: TrainingData, eval_model: torch.nn.Module,
           inference: engine.Inference, val_images, config: dict) -> outputs.RunResult:
    """Load the best epoch's weights, calibrate, predict the test split (every rank must call:
    under DDP the ranks share the prediction) and gather what the outputs need."""
    state.model.load_state_dict(state.best_model)  # the final model and outputs are the best epoch's
    eval_model.eval()
    val_labels = data.labels[data.val_index]
    temperature, calibration_record, val_probs = calibrate(settings.temperature_scaling, state.best_val_probs,
                                                           val_labels, settings.tta)
    test_probs, test_info = None, {"skipped": f"no test_data.pkl in {settings.data_dir}"}
    if data.test is not None:
        tick = time.monotonic()
        test_probs = engine.predict_probs(eval_model, data.place(data.test["images"]), inference, temperature)
        test_info = {"tta": bool(settings.tta), "temperature": temperature, "seconds": time.monotonic() - tick}
    norm = inference.normalisation
    hyperparameters = {**settings.recipe(data.split_by), "tta": settings.tta, "temperature": temperature,
                       "best_epoch": state.best["epoch"]}
    return outputs.RunResult(
        model_dir=settings.model_dir, output_dir=settings.output_dir, data_dir=settings.data_dir,
        history=state.history, best=state.best, best_model=state.best_model, best_val_probs=val_probs,
        train=data.train, is_val=data.is_val, test=data.test, test_probs=test_probs, test_info=test_info,
        prior=data.prior, class_names=data.class_names,
        preprocessing={**data.preprocessing(), "mean": list(norm.mean), "std": list(norm.std)}, config=config,
        hyperparameters=hyperparameters, calibration=calibration_record,
        top_losses=top_loss_images(val_images, val_probs, val_labels))
