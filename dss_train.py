"""Fine-tune a torchvision network (--arch, default ResNet18) on preprocess.py's pickles; write the
model, metrics, plots and test predictions. Also the SageMaker script-mode entry point and hosting script.

Local runs (after ``python preprocess.py --output-dir ./output``):

    python dss_train.py --data-dir ./output --model-dir ./models --epochs 10 --batch-size 32 --learning-rate 0.001
    python dss_train.py --data-dir ./output --model-dir ./models --weights none --epochs 3      # offline
    python dss_train.py --data-dir ./output --model-dir ./models --checkpoint-dir ./checkpoints  # resumable
    python dss_train.py --data-dir ./output --model-dir ./models --folds 5    # 5 site-fold members, out-of-fold scores
    python dss_train.py --data-dir ./weekly/2026-w48 --model-dir ./models --predict-only  # -> models/predictions/2026-w48/

Outputs (docs/training.md). Model dir: ``model.pth`` (weights, K members with --folds K, class names,
preprocessing, the temperature; ``torch.load(weights_only=True)``), ``config.json``. Output dir (``--output-dir``; default
the model dir, ``SM_OUTPUT_DATA_DIR`` under SageMaker): metrics, splits, validation and test
predictions, plots and where it fails (site_metrics.csv, calibration.png, top_losses.png), replaced
together once all are written. ``--predict-only`` writes into a folder per data dir
(dss/predict/predicting.py). Each epoch prints a per-class F1 line and one line for SageMaker ``metric_definitions``:

    [METRICS] epoch=3 train_loss=0.4123 train_acc=0.8512 val_loss=0.5000 val_acc=0.8000 val_logloss=0.5100

SageMaker (PyTorch estimator, ``entry_point="dss_train.py"``): hyperparameters arrive as
``--key value`` strings with the key exactly as written in the estimator's ``hyperparameters``
dict, so use the dashed names: ``{"epochs": 10, "batch-size": 64, "weights": "imagenet"}``.
Unknown names are an error. Paths default from SM_CHANNEL_TRAINING/SM_CHANNEL_TRAIN, SM_MODEL_DIR
and SM_OUTPUT_DATA_DIR; checkpoints go to /opt/ml/checkpoints (set ``checkpoint_s3_uri`` for spot
training) and a restarted job resumes from the newest valid one. A failure's reason is written to
``$SM_OUTPUT_DIR/failure``. ``model_fn``/``input_fn``/``predict_fn``/``output_fn`` serve the model after deploy.

Exit status: 0 success; 1 error (message on stderr); 2 bad arguments; 143 stopped by SIGTERM, 130 by
Ctrl-C, in any phase: at the next training step (saving a checkpoint when there is a --checkpoint-dir;
re-run with the same one to continue), else when the phase running (loading, an epoch's evaluation,
test prediction, writing outputs) ends; a second Ctrl-C stops at once.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
import traceback

from dss import threads

threads.limit_spin_wait()  # before torch loads its OpenMP runtime, which reads the setting once (dss.threads)
import numpy as np
import torch

from dss import cli, distributed, fileio, metrics, sagemaker, stopping
from dss.cli import log
from dss.data import dataset
from dss.models import model as model_lib
from dss.models import prediction
from dss.predict import predicting
from dss.train import checkpoint, crossval, engine, finishing, outputs, tracking, training, training_args, training_data
from dss.predict.serve import input_fn, model_fn, output_fn, predict_fn

SIGTERM_EXIT_CODE = 128 + signal.SIGTERM
# SageMaker hosting loads these from the entry point, so this script also serves the model it trains.
HOSTING_HANDLERS = (model_fn, input_fn, predict_fn, output_fn)


# --------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    return training_args.build_parser()  # the flag groups, each flag marked whether it changes results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # parse_args (not parse_known_args): a misspelt SageMaker hyperparameter must stop the job.
    return build_parser().parse_args(argv)


# --------------------------------------------------------------------------- training
def train(settings: training_args.Settings, context: distributed.Context, stop: stopping.StopFlag) -> None:
    """Train in this process (under torchrun, one rank of a DDP job) one member per fold (one for
    --folds 1), then rank 0 writes the outputs of the run. ``stop`` is checked between phases."""
    started, device, resumable = time.monotonic(), context.device, settings.checkpoint_dir is not None
    threads.apply(settings.num_threads)
    if context.is_main:
        fileio.sweep_leftovers([settings.model_dir, settings.output_dir])
    tracker_settings = settings.tracking()  # MLflow asked for but not installed: an error before any work
    log.info(training.describe_device(context, settings.batch_size))
    # Leaving the block stops the reader threads of streamed data and ends the MLflow run, however the run ends.
    with training_data.load(settings, device) as data, crossval.SharedRun(settings, context, tracker_settings) as run:
        stop.check("while loading the data", resumable)
        threads.rebalance(wait=True)  # without --num-threads: as many threads as other work leaves CPUs idle
        folds = crossval.plan(settings.folds, data, settings.seed)
        members = []
        for fold in folds:
            members.append(train_member(settings, context, crossval.for_fold(data, fold), fold, run, folds, stop))
            stop.check(f"after {fold.name if fold.in_ensemble else 'training'} (test predictions made)", resumable)
        result = finishing.finish(settings, members, data, run.config)
        stop.check("before writing the outputs", resumable)
        if not context.is_main:
            return
        outputs.write_all_outputs(result, settings.keep_previous)
        run.tracker.log_metrics({**result.headline(), "test_images": data.num_test_images})
        run.tracker.log_outputs(settings.output_dir, settings.model_dir, settings.mlflow_log_model)
    log.info(result.metrics_line())
    log.info(f"done in {time.monotonic() - started:.1f} s: {result.summary()}; "
             f"model in {settings.model_dir}, outputs in {settings.output_dir}")


def train_member(settings: training_args.Settings, context: distributed.Context, data: training_data.TrainingData,
                 fold: crossval.Fold, run: crossval.SharedRun, folds: list[crossval.Fold],
                 stop_requested: stopping.StopFlag) -> crossval.Member:
    """Train the model of one fold (the only one for --folds 1): the epoch loop, with checkpoints."""
    device = context.device
    amp_dtype, use_scaler = prediction.select_precision(device)
    generator = training.seed_everything(fold.seed(settings.seed), device)
    network = training.to_device(training.build_network(data.num_classes, settings), context)
    optimizer = engine.build_optimizer(network, settings.optimizer, settings.learning_rate, settings.weight_decay)
    schedule = training.Schedule.of(settings, len(data.train_index), context.world_size)
    scheduler = engine.build_scheduler(optimizer, schedule.total_steps, schedule.warmup_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    ema = training.make_ema(network, settings.ema_decay)  # --ema-decay: evaluated, kept and saved when on
    state = checkpoint.TrainingState(network, optimizer, scheduler, scaler, generator, ema,
                                     best_by=training_args.BEST_EPOCH_FIELDS[settings.best_epoch_by])
    checkpoints = crossval.run_checkpoints(settings, data, context, fold)
    resumed_from = checkpoints.resume(state)
    tracker = run.join(state, data, schedule, resumed_from, folds)
    train_model, eval_model = training.wrap(network, settings.compile, context)
    inference = training.inference(settings, data, context)
    loss_fn = training.make_loss(data.labels[data.train_index], data.num_classes, settings.class_weights,
                                 settings.label_smoothing, device)
    loop = engine.TrainLoop(train_model, optimizer, scheduler, scaler, loss_fn,
                            training.augment(settings, data, inference.normalisation), generator,
                            settings.batch_size, amp_dtype, context.rank, context.world_size,
                            progress=sys.stderr.isatty(), ema=ema)
    train_images = data.place(data.train["images"], data.train_index)
    val_images = data.place(data.train["images"], data.val_index)
    train_labels = torch.as_tensor(data.labels[data.train_index], device=device)  # int64 (N_train,)
    val_labels = data.labels[data.val_index]
    fold_prefix = f"{fold.name} " if fold.in_ensemble else ""

    for epoch in range(state.epoch + 1, settings.epochs + 1):
        if state.early_stopped:
            break
        state.begin_epoch()
        threads.rebalance()  # other work on the CPUs may have come or gone (nothing without --num-threads)
        tick = time.monotonic()
        try:
            stats = engine.train_one_epoch(loop, train_images, train_labels, epoch, state.step,
                                           skip_batches=state.step_in_epoch, stop_requested=stop_requested)
        except engine.NonFiniteLossError as exc:
            raise training.TrainingError.non_finite(exc) from exc
        state.add_epoch_part(stats)
        if stats["stopped_early"]:
            checkpoints.save(state)
            raise stopping.TrainingInterrupted.at(epoch, state.step_in_epoch, schedule.steps_per_epoch,
                                                  saved=checkpoints.enabled, signum=stop_requested.signum)
        train_stats = state.finish_epoch()
        train_model.eval()
        evaluated = state.evaluated(eval_model)  # the EMA's weights when --ema-decay is on
        distributed.broadcast_buffers(evaluated, context)  # rank 0's BatchNorm statistics
        eval_stats = engine.evaluate(evaluated, val_images, val_labels, loss_fn, inference)
        record = fold.tag(training.epoch_record(epoch, train_stats, eval_stats, optimizer.param_groups[0]["lr"],
                                                time.monotonic() - tick))
        matrix = metrics.confusion_matrix(val_labels, np.argmax(eval_stats["probs"], axis=1), data.num_classes)
        # Only in metrics.json: metrics.csv and the [METRICS] line keep their fixed EPOCH_FIELDS.
        record["per_class"] = metrics.per_class_report(matrix, data.class_names)
        improved = state.record_epoch(record, eval_stats["probs"], matrix)
        for line in training.epoch_lines(record, settings.epochs, improved, fold_prefix):
            log.info(line)
        tracker.log_epochs(*crossval.tracked_epochs(state.history, fold, outputs.EPOCH_FIELDS[1:]))
        if settings.patience and state.epochs_without_improvement >= settings.patience:
            state.early_stopped = True
            log.info(f"{fold_prefix}early stopping: no better {state.best_by} for {settings.patience} epochs "
                     f"(best: epoch {state.best['epoch']})")
        checkpoints.save(state)
        stop_requested.check(f"after {fold_prefix}epoch {epoch}", checkpoints.enabled)

    if state.best is None:
        raise training.TrainingError("no epoch finished, nothing to save")
    train_model.eval()
    data.release(train_images, val_images)  # streamed views stop reading; the next fold places its own
    return finishing.close_member(state, fold, eval_model, inference, data)


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.setup_logging(enabled=True)
    # One stop flag for the whole run: a SIGTERM or Ctrl-C in any phase stops it at the next check.
    with stopping.StopFlag() as stop:
        try:
            run(training_args.Settings.from_args(args), stop)
            return 0
        except (stopping.TrainingInterrupted, KeyboardInterrupt) as exc:
            if isinstance(exc, KeyboardInterrupt):  # a second Ctrl-C: stopped at once
                exc = stopping.TrainingInterrupted.at_once(args.checkpoint_dir, args.predict_only)
            print(f"error: {exc}", file=sys.stderr, flush=True)
            sagemaker.write_failure(str(exc))
            return exc.exit_code
        except Exception as exc:  # noqa: BLE001 - every failure must reach stderr and SageMaker's failure file
            expected = (dataset.DatasetError, FileNotFoundError, model_lib.WeightsError,
                        checkpoint.CheckpointMismatchError, training.TrainingError, distributed.DistributedSetupError,
                        tracking.TrackingError, ValueError, OSError)
            if not isinstance(exc, expected):
                traceback.print_exc()
            reason = f"{type(exc).__name__}: {exc}"
            print(f"error: {reason}", file=sys.stderr, flush=True)
            sagemaker.write_failure(reason)
            return 1


def run(settings: training_args.Settings, stop: stopping.StopFlag) -> None:
    """--predict-only, or a training run (under torchrun, this rank of a DDP job)."""
    if settings.predict_only:
        # Under torchrun the other ranks have nothing to do: one process writes the predictions.
        if distributed.ranks_from_env()[0] == 0:
            predicting.predict_only(predicting.PredictOptions.of(settings), stop)
        return
    context = distributed.setup(distributed.resolve_device(settings.device))
    cli.setup_logging(enabled=context.is_main)  # one copy of each log line per DDP job
    try:
        train(settings, context, stop.bind(context))
        distributed.barrier(context)  # rank 0 has written every output
        # Every rank checks here (not only rank 0 after its outputs: the ranks agree through a collective).
        stop.check("after writing every output (the run is complete)", settings.checkpoint_dir is not None)
    finally:
        distributed.teardown(context)
        cli.setup_logging(enabled=True)


if __name__ == "__main__":
    sys.exit(main())
