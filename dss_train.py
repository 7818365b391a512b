"""Fine-tune a torchvision network (--arch, default ResNet18) on preprocess.py's pickles; write the
model, metrics, plots and test predictions. Also the SageMaker script-mode entry point and hosting script.

Local runs (after ``python preprocess.py --output-dir ./output``):

    python dss_train.py --data-dir ./output --model-dir ./models --epochs 10 --batch-size 32 --learning-rate 0.001
    python dss_train.py --data-dir ./output --model-dir ./models --weights none --epochs 3      # offline
    python dss_train.py --data-dir ./output --model-dir ./models --checkpoint-dir ./checkpoints  # resumable
    python dss_train.py --data-dir ./weekly/2026-w48 --model-dir ./models --predict-only  # -> models/predictions/2026-w48/

Outputs (docs/training.md). Model dir: ``model.pth`` (weights, class names, preprocessing, the
temperature; ``torch.load(weights_only=True)``), ``config.json``. Output dir (``--output-dir``; default
the model dir, ``SM_OUTPUT_DATA_DIR`` under SageMaker): metrics, splits, validation and test
predictions, plots and where it fails (site_metrics.csv, calibration.png, top_losses.png), replaced
together once all are written. ``--predict-only`` writes into a folder per data dir
(dss/predicting.py). Each epoch prints a per-class F1 line and one line for SageMaker ``metric_definitions``:

    [METRICS] epoch=3 train_loss=0.4123 train_acc=0.8512 val_loss=0.5000 val_acc=0.8000 val_logloss=0.5100

SageMaker (PyTorch estimator, ``entry_point="dss_train.py"``): hyperparameters arrive as
``--key value`` strings with the key exactly as written in the estimator's ``hyperparameters``
dict, so use the dashed names: ``{"epochs": 10, "batch-size": 64, "weights": "imagenet"}``.
Unknown names are an error. Paths default from SM_CHANNEL_TRAINING/SM_CHANNEL_TRAIN, SM_MODEL_DIR
and SM_OUTPUT_DATA_DIR; checkpoints go to /opt/ml/checkpoints (set ``checkpoint_s3_uri`` for spot
training) and a restarted job resumes from the newest valid one. A failure's reason is written to
``$SM_OUTPUT_DIR/failure``. ``model_fn``/``input_fn``/``predict_fn``/``output_fn`` serve the model after deploy.

Exit status: 0 success; 1 error (message on stderr); 2 bad arguments; 143 stopped by SIGTERM, 130 by
Ctrl-C, at the next step after saving a checkpoint when there is a --checkpoint-dir (re-run with the same
one to continue); a second Ctrl-C stops at once.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
import traceback

from dss import threads

threads.limit_spin_wait()  # before torch loads its OpenMP runtime, which reads the setting once (dss.threads)
import numpy as np
import torch

from dss import backbones, checkpoint, cli, dataset, distributed, engine, loader, metrics, outputs, sagemaker, split
from dss import model as model_lib
from dss import finishing, predicting, streaming, tracking, training, training_data
from dss.cli import log
from dss.serve import input_fn, model_fn, output_fn, predict_fn

SIGTERM_EXIT_CODE = 128 + signal.SIGTERM
# SageMaker hosting loads these from the entry point, so this script also serves the model it trains.
HOSTING_HANDLERS = (model_fn, input_fn, predict_fn, output_fn)


# --------------------------------------------------------------------------- arguments
def _add_path_arguments(parser: argparse.ArgumentParser) -> None:
    paths = parser.add_argument_group("paths")
    paths.add_argument("--data-dir", default=None,
                       help="folder with train_data.pkl/test_data.pkl (or their shards) "
                            "[default: $SM_CHANNEL_TRAINING, else $SM_CHANNEL_TRAIN, else ./output]")
    paths.add_argument("--model-dir", default=None,
                       help="where model.pth and config.json go [default: $SM_MODEL_DIR, else ./models]")
    paths.add_argument("--output-dir", default=None,
                       help="where metrics, predictions and plots go [default: $SM_OUTPUT_DATA_DIR under SageMaker, "
                            "else the model dir; with --predict-only <model dir>/predictions/<data dir name>]")
    paths.add_argument("--checkpoint-dir", default=None,
                       help="resume from / save per-epoch checkpoints here; {job_name} becomes the SageMaker "
                            "training job's name [default: none locally; /opt/ml/checkpoints under SageMaker]")
    paths.add_argument("--keep-checkpoints", type=cli.positive_int, default=1,
                       help="checkpoints kept in --checkpoint-dir: the newest N, plus the one being written until it "
                            "is complete. Each holds the weights, the best epoch's weights and the optimizer state: "
                            "about 179 MB for ResNet18 with adamw (134 MB with sgd; 45 MB more with --ema-decay)")


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=cli.positive_int, default=10, help="passes over the training split")
    train.add_argument("--batch-size", type=cli.positive_int, default=32,
                       help="training images per optimizer step (on a GPU use 256 or more for throughput)")
    train.add_argument("--learning-rate", type=float, default=1e-3, help="peak learning rate after warm-up")
    train.add_argument("--optimizer", choices=engine.OPTIMIZERS, default="adamw", help="optimizer")
    train.add_argument("--weight-decay", type=float, default=0.01, help="weight decay (decoupled for adamw)")
    train.add_argument("--warmup-epochs", type=float, default=0.5,
                       help="epochs of linear learning-rate warm-up before the cosine decay (may be fractional)")
    train.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing of the loss, 0..1")
    train.add_argument("--ema-decay", type=cli.decay, default=0.0,
                       help="average of the weights over steps, evaluated and saved instead of them (0.999; 0: off)")
    train.add_argument("--class-weights", choices=("none", "balanced"), default="none",
                       help="'balanced' weights the loss by inverse class frequency")
    train.add_argument("--patience", type=cli.non_negative_int, default=0,
                       help="stop after this many epochs without a better val_logloss (0 = never)")
    train.add_argument("--arch", choices=backbones.ARCHITECTURES, default=backbones.DEFAULT_ARCH,
                       help="network: a torchvision model with its own ImageNet weights, normalisation, new head")
    train.add_argument("--weights", default="imagenet",
                       help="initial weights: 'imagenet' (torchvision download/cache), 'none' (random) "
                            "or a PATH to a state dict / model.pth")
    train.add_argument("--image-size", type=cli.image_size, default=None,
                       help=f"network input size in px, at least {cli.MIN_IMAGE_SIZE} [default: the size stored in "
                            "the pickles]")
    train.add_argument("--seed", type=int, default=0, help="seed for the split, initialisation and batches")
    split_group = parser.add_argument_group("validation split")
    split_group.add_argument("--val-fraction", type=cli.fraction, default=0.25,
                             help="share of the labelled images held out for validation")
    split_group.add_argument("--split-by", choices=split.SPLIT_CHOICES, default=None,
                             help="'site' keeps every camera site on one side (what the test set needs); "
                                  "[default: site when the data has sites, else random]")


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    run = parser.add_argument_group("run")
    run.add_argument("--predict-only", type=cli.str2bool, nargs="?", const=True, default=False,
                     help="no training: load model.pth from --model-dir and write predictions.csv and "
                          "test_predictions.csv for --data-dir into --output-dir (true/false; the flag alone means true)")
    run.add_argument("--overwrite", type=cli.str2bool, nargs="?", const=True, default=False,
                     help="let --predict-only replace predictions in --output-dir that another model or other data "
                          "made (a re-run of the same model on the same data replaces its own without it)")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                     help="'auto' uses the GPU when there is one")
    run.add_argument("--compile", type=cli.str2bool, default=False,
                     help="torch.compile the model (true/false; ~20 s compile, faster epochs on GPU)")
    run.add_argument("--tta", type=cli.str2bool, default=False,
                     help="average predictions over the image and its horizontal flip (true/false)")
    run.add_argument("--temperature-scaling", type=cli.str2bool, default=True,
                     help="fit a temperature on the best epoch's validation logits (after TTA); applied to val/test "
                          "probabilities, stored in model.pth (true/false)")
    run.add_argument("--data-in-memory", choices=streaming.MEMORY_MODES, default="auto",
                     help="where the images live while training: 'device' (all on the GPU; pinned host memory "
                          "when they do not fit), 'host' (pinned host memory, batches copied), 'stream' (read "
                          "shard by shard from --data-dir with double buffering: data bigger than memory); "
                          f"'auto' streams when the train pickles exceed {streaming.HOST_MEMORY_SHARE * 100:.0f}%% "
                          "of the available host memory, else 'device'")
    run.add_argument("--eval-batch-size", type=cli.positive_int, default=256,
                     help="images per forward pass when evaluating and predicting")
    run.add_argument("--num-threads", type=cli.positive_int, default=None,
                     help="CPU threads for torch; give 1 or 2 to leave CPUs to other heavy work [default: the CPUs "
                          "this process may use (affinity mask, cgroup quota), at most torch's own count]")


def _add_tracking_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tracking (MLflow, optional: pip install -r requirements-mlflow.txt)")
    group.add_argument("--mlflow", type=cli.str2bool, default=None, metavar="{true,false}",
                       help="log this run to MLflow [default: when MLFLOW_TRACKING_URI is set or "
                            "--mlflow-experiment is given]")
    group.add_argument("--mlflow-experiment", default=None, metavar="NAME",
                       help=f"MLflow experiment [default: $MLFLOW_EXPERIMENT_NAME, else {tracking.DEFAULT_EXPERIMENT}]")
    group.add_argument("--mlflow-log-model", type=cli.str2bool, default=False, metavar="{true,false}",
                       help="also upload model.pth to MLflow (about 45 MB for ResNet18)")


def build_parser() -> argparse.ArgumentParser:
    parser = sagemaker.ArgumentParser(
        description="Fine-tune a torchvision network on preprocess.py pickles (also the SageMaker entry point).",
        formatter_class=cli.HelpFormatter, allow_abbrev=False)
    _add_path_arguments(parser)
    _add_training_arguments(parser)
    _add_run_arguments(parser)
    _add_tracking_arguments(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # parse_args (not parse_known_args): a misspelt SageMaker hyperparameter must stop the job.
    return build_parser().parse_args(argv)


# --------------------------------------------------------------------------- training
def train(settings: training.Settings, context: distributed.Context) -> None:
    """Train in this process (under torchrun, one rank of a DDP job); rank 0 writes the outputs."""
    started, device = time.monotonic(), context.device
    threads.apply(settings.num_threads)
    if context.is_main:
        training.sweep_leftovers([settings.model_dir, settings.output_dir])
    tracker_settings = settings.tracking()  # MLflow asked for but not installed: an error before any work
    amp_dtype, use_scaler = engine.select_precision(device)
    log.info(training.describe_device(context, settings.batch_size))
    # Leaving the block stops the reader threads of streamed data and ends the MLflow run, however the run ends.
    with training_data.load(settings, device) as data, contextlib.ExitStack() as run_scope:
        generator = training.seed_everything(settings.seed, device)
        network = training.to_device(training.build_network(data.num_classes, settings), context)
        optimizer = engine.build_optimizer(network, settings.optimizer, settings.learning_rate, settings.weight_decay)
        schedule = training.Schedule.of(settings, len(data.train_index), context.world_size)
        scheduler = engine.build_scheduler(optimizer, schedule.total_steps, schedule.warmup_steps)
        scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
        ema = training.make_ema(network, settings.ema_decay)  # --ema-decay: evaluated, kept and saved when on
        state = checkpoint.TrainingState(network, optimizer, scheduler, scaler, generator, ema)
        checkpoints = training.run_checkpoints(settings, data, context)
        resumed_from = checkpoints.resume(state)
        config = training.run_config(settings, data, context, schedule, resumed_from)
        tracker = run_scope.enter_context(training.start_tracking(tracker_settings, settings, state, data, config,
                                                                  context))
        train_model, eval_model = training.wrap(network, settings.compile, context)
        inference = engine.Inference(settings.eval_batch_size, data.input_size, amp_dtype, settings.tta,
                                     context.rank, context.world_size, training.normalisation(settings.arch))
        loss_fn = training.make_loss(data.labels[data.train_index], data.num_classes, settings.class_weights,
                                     settings.label_smoothing, device)
        loop = engine.TrainLoop(train_model, optimizer, scheduler, scaler, loss_fn,
                                loader.GpuAugment(data.input_size, normalisation=inference.normalisation), generator,
                                settings.batch_size, amp_dtype, context.rank, context.world_size,
                                progress=sys.stderr.isatty(), ema=ema)
        train_images = data.place(data.train["images"], data.train_index)
        val_images = data.place(data.train["images"], data.val_index)
        train_labels = torch.as_tensor(data.labels[data.train_index], device=device)  # int64 (N_train,)
        val_labels = data.labels[data.val_index]

        with training.StopFlag(context) as stop_requested:
            for epoch in range(state.epoch + 1, settings.epochs + 1):
                if state.early_stopped:
                    break
                state.begin_epoch()
                tick = time.monotonic()
                try:
                    stats = engine.train_one_epoch(loop, train_images, train_labels, epoch, state.step,
                                                   skip_batches=state.step_in_epoch, stop_requested=stop_requested)
                except engine.NonFiniteLossError as exc:
                    raise training.TrainingError.non_finite(exc) from exc
                state.add_epoch_part(stats)
                if stats["stopped_early"]:
                    checkpoints.save(state)
                    raise training.TrainingInterrupted.at(epoch, state.step_in_epoch, schedule.steps_per_epoch,
                                                          saved=checkpoints.enabled, signum=stop_requested.signum)
                train_stats = state.finish_epoch()
                train_model.eval()
                evaluated = state.evaluated(eval_model)  # the EMA's weights when --ema-decay is on
                distributed.broadcast_buffers(evaluated, context)  # rank 0's BatchNorm statistics
                eval_stats = engine.evaluate(evaluated, val_images, val_labels, loss_fn, inference)
                record = training.epoch_record(epoch, train_stats, eval_stats, optimizer.param_groups[0]["lr"],
                                               time.monotonic() - tick)
                matrix = metrics.confusion_matrix(val_labels, np.argmax(eval_stats["probs"], axis=1), data.num_classes)
                # Only in metrics.json: metrics.csv and the [METRICS] line keep their fixed EPOCH_FIELDS.
                record["per_class"] = metrics.per_class_report(matrix, data.class_names)
                improved = state.record_epoch(record, eval_stats["probs"], matrix)
                for line in training.epoch_lines(record, settings.epochs, improved):
                    log.info(line)
                tracker.log_epochs(state.history, outputs.EPOCH_FIELDS[1:])
                if settings.patience and state.epochs_without_improvement >= settings.patience:
                    state.early_stopped = True
                    log.info(f"early stopping: no better val_logloss for {settings.patience} epochs "
                             f"(best: epoch {state.best['epoch']})")
                checkpoints.save(state)

        if state.best is None:
            raise training.TrainingError("no epoch finished, nothing to save")
        train_model.eval()  # then the best weights, the temperature, the test predictions (every rank)
        result = finishing.finish(settings, state, data, eval_model, inference, val_images, config)
        if not context.is_main:
            return
        outputs.write_all_outputs(result)
        tracker.log_best(state.best, {"test_images": data.num_test_images})
        tracker.log_outputs(settings.output_dir, settings.model_dir, settings.mlflow_log_model)
    log.info(outputs.best_metrics_line(state.best))
    log.info(f"done in {time.monotonic() - started:.1f} s: best epoch {state.best['epoch']} "
             f"(val_logloss {state.best['val_logloss']:.4f}, val_acc {state.best['val_acc']:.4f}); "
             f"model in {settings.model_dir}, outputs in {settings.output_dir}")


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.setup_logging(enabled=True)
    try:
        settings = training.Settings.from_args(args)
        if settings.predict_only:
            # Under torchrun the other ranks have nothing to do: one process writes the predictions.
            if distributed.ranks_from_env()[0] == 0:
                predicting.predict_only(settings)
            return 0
        context = distributed.setup(training.resolve_device(settings.device))
        cli.setup_logging(enabled=context.is_main)  # one copy of each log line per DDP job
        try:
            train(settings, context)
            distributed.barrier(context)  # rank 0 has written every output
        finally:
            distributed.teardown(context)
            cli.setup_logging(enabled=True)
        return 0
    except (training.TrainingInterrupted, KeyboardInterrupt) as exc:
        if isinstance(exc, KeyboardInterrupt):  # Ctrl-C outside the training loop, or a second one in it
            exc = training.TrainingInterrupted.at_once(args.checkpoint_dir, args.predict_only)
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


if __name__ == "__main__":
    sys.exit(main())
