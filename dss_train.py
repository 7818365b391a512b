"""Fine-tune a torchvision ResNet18 on preprocess.py's pickles; write the model, metrics, plots
and test predictions. Also the SageMaker script-mode entry point and hosting script.

Local runs (after ``python preprocess.py --output-dir ./output``):

    python dss_train.py --data-dir ./output --model-dir ./models --epochs 10 --batch-size 32 --learning-rate 0.001
    python dss_train.py --data-dir ./output --model-dir ./models --weights none --epochs 3      # offline
    python dss_train.py --data-dir ./output --model-dir ./models --checkpoint-dir ./checkpoints  # resumable
    python dss_train.py --data-dir ./new_deployment --model-dir ./models --predict-only          # classify new images

Outputs. Model dir: ``model.pth`` (weights + class names + preprocessing, loadable with
``torch.load(weights_only=True)``), ``config.json`` (the resolved configuration). Output dir
(``--output-dir``; default the model dir, ``SM_OUTPUT_DATA_DIR`` under SageMaker): metrics.json,
metrics.csv, splits.csv, val_predictions.csv, test_predictions.csv (only when the data dir has a
test split), training_curves.png, confusion_matrix.png. A re-run replaces all of them together once
they are all written; a run that fails leaves the previous run's files as they were. Each epoch
prints a per-class F1 line and one line for SageMaker ``metric_definitions``:

    [METRICS] epoch=3 train_loss=0.4123 train_acc=0.8512 val_loss=0.5000 val_acc=0.8000 val_logloss=0.5100

SageMaker (PyTorch estimator, ``entry_point="dss_train.py"``): hyperparameters arrive as
``--key value`` strings with the key exactly as written in the estimator's ``hyperparameters``
dict, so use the dashed names: ``{"epochs": 10, "batch-size": 64, "weights": "imagenet"}``.
Unknown names are an error. Paths default from SM_CHANNEL_TRAINING/SM_CHANNEL_TRAIN, SM_MODEL_DIR
and SM_OUTPUT_DATA_DIR; checkpoints go to /opt/ml/checkpoints (set ``checkpoint_s3_uri`` for spot
training) and a restarted job resumes from the newest valid one. A failure's reason is written to
``$SM_OUTPUT_DIR/failure``. ``model_fn``/``input_fn``/``predict_fn``/``output_fn`` below serve the
model after ``estimator.deploy()``.

Exit status: 0 success; 1 error (message on stderr); 2 bad arguments; 143 stopped by SIGTERM
after saving a checkpoint (re-run with the same --checkpoint-dir to continue).
"""


from __future__ import annotations

import argparse
import signal
import sys
import time
import traceback

import numpy as np
import torch

from dss import checkpoint, cli, dataset, distributed, engine, loader, metrics, outputs, sagemaker, split, streaming
from dss import model as model_lib
from dss import training, training_data
from dss.cli import log
from dss.serve import input_fn, model_fn, output_fn, predict_fn

SIGTERM_EXIT_CODE = 128 + signal.SIGTERM
# SageMaker hosting loads these from the entry point, so this script also serves the model it trains.
HOSTING_HANDLERS = (model_fn, input_fn, predict_fn, output_fn)


# --------------------------------------------------------------------------- arguments
class _ArgumentParser(argparse.ArgumentParser):
    """An argument error is a failed job too: SageMaker shows the reason from the failure file."""

    def error(self, message: str):
        sagemaker.write_failure(f"invalid arguments: {message}")
        super().error(message)


def _add_path_arguments(parser: argparse.ArgumentParser) -> None:
    paths = parser.add_argument_group("paths")
    paths.add_argument("--data-dir", default=None,
                       help="folder with train_data.pkl/test_data.pkl (or their shards) "
                            "[default: $SM_CHANNEL_TRAINING, else $SM_CHANNEL_TRAIN, else ./output]")
    paths.add_argument("--model-dir", default=None,
                       help="where model.pth and config.json go [default: $SM_MODEL_DIR, else ./models]")
    paths.add_argument("--output-dir", default=None,
                       help="where metrics, predictions and plots go "
                            "[default: $SM_OUTPUT_DATA_DIR under SageMaker, else the model dir]")
    paths.add_argument("--checkpoint-dir", default=None,
                       help="resume from / save per-epoch checkpoints here "
                            "[default: none locally; /opt/ml/checkpoints under SageMaker]")


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
    train.add_argument("--class-weights", choices=("none", "balanced"), default="none",
                       help="'balanced' weights the loss by inverse class frequency")
    train.add_argument("--patience", type=cli.non_negative_int, default=0,
                       help="stop after this many epochs without a better val_logloss (0 = never)")
    train.add_argument("--weights", default="imagenet",
                       help="initial weights: 'imagenet' (torchvision download/cache), 'none' (random) "
                            "or a PATH to a state dict / model.pth")
    train.add_argument("--image-size", type=cli.positive_int, default=None,
                       help="network input size in px [default: the size stored in the pickles]")
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
                     help="no training: load model.pth from --model-dir and write test_predictions.csv "
                          "for --data-dir (true/false; the flag alone means true)")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                     help="'auto' uses the GPU when there is one")
    run.add_argument("--compile", type=cli.str2bool, default=False,
                     help="torch.compile the model (true/false; ~20 s compile, faster epochs on GPU)")
    run.add_argument("--tta", type=cli.str2bool, default=False,
                     help="average predictions over the image and its horizontal flip (true/false)")
    run.add_argument("--data-in-memory", choices=streaming.MEMORY_MODES, default="auto",
                     help="where the images live while training: 'device' (all on the GPU; pinned host memory "
                          "when they do not fit), 'host' (pinned host memory, batches copied), 'stream' (read "
                          "shard by shard from --data-dir with double buffering: data bigger than memory); "
                          f"'auto' streams when the train pickles exceed {streaming.HOST_MEMORY_SHARE * 100:.0f}%% "
                          "of the available host memory, else 'device'")
    run.add_argument("--eval-batch-size", type=cli.positive_int, default=256,
                     help="images per forward pass when evaluating and predicting")
    run.add_argument("--num-threads", type=cli.positive_int, default=None,
                     help="CPU threads for torch [default: torch's choice]")


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        description="Fine-tune ResNet18 on preprocess.py pickles (also the SageMaker entry point).",
        formatter_class=cli.HelpFormatter, allow_abbrev=False)
    _add_path_arguments(parser)
    _add_training_arguments(parser)
    _add_run_arguments(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # parse_args (not parse_known_args): a misspelt SageMaker hyperparameter must stop the job.
    return build_parser().parse_args(argv)


# --------------------------------------------------------------------------- training
def train(settings: training.Settings, context: distributed.Context) -> None:
    """Train in this process (under torchrun, one rank of a DDP job); rank 0 writes the outputs."""
    started, device = time.monotonic(), context.device
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    if context.is_main:
        training.sweep_leftovers([settings.model_dir, settings.output_dir])
    amp_dtype, use_scaler = engine.select_precision(device)
    log.info(training.describe_device(context, settings.batch_size))
    # Leaving the block stops the reader threads of streamed data, however the run ends.
    with training_data.load(settings, device) as data:
        generator = training.seed_everything(settings.seed, device)
        network = training.to_device(training.build_network(data.num_classes, settings.weights), context)
        optimizer = engine.build_optimizer(network, settings.optimizer, settings.learning_rate, settings.weight_decay)
        schedule = training.Schedule.of(settings, len(data.train_index), context.world_size)
        scheduler = engine.build_scheduler(optimizer, schedule.total_steps, schedule.warmup_steps)
        scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
        state = checkpoint.TrainingState(network, optimizer, scheduler, scaler, generator)
        checkpoints = checkpoint.RunCheckpoints(
            settings.checkpoint_dir, training.checkpoint_fingerprint(settings, data, context), context)
        resumed_from = checkpoints.resume(state)
        train_model, eval_model = training.wrap(network, settings.compile, context)
        loss_fn = training.make_loss(data.labels[data.train_index], data.num_classes, settings.class_weights,
                                     settings.label_smoothing, device)
        loop = engine.TrainLoop(train_model, optimizer, scheduler, scaler, loss_fn, loader.GpuAugment(data.input_size),
                                generator, settings.batch_size, amp_dtype, context.rank, context.world_size,
                                progress=sys.stderr.isatty())
        inference = engine.Inference(settings.eval_batch_size, data.input_size, amp_dtype, settings.tta,
                                     context.rank, context.world_size)
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
                    raise training.TrainingError(
                        f"non-finite loss at epoch {exc.epoch}, step {exc.step}: training stopped, no checkpoint or "
                        "model written from these weights; lower --learning-rate or check the data") from exc
                state.add_epoch_part(stats)
                if stats["stopped_early"]:
                    checkpoints.save(state)
                    raise training.TrainingInterrupted.at(epoch, state.step_in_epoch, schedule.steps_per_epoch,
                                                          saved=checkpoints.enabled)
                train_stats = state.finish_epoch()
                train_model.eval()
                distributed.broadcast_buffers(network, context)  # rank 0's BatchNorm statistics
                eval_stats = engine.evaluate(eval_model, val_images, val_labels, loss_fn, inference)
                record = training.epoch_record(epoch, train_stats, eval_stats, optimizer.param_groups[0]["lr"],
                                               time.monotonic() - tick)
                matrix = metrics.confusion_matrix(val_labels, np.argmax(eval_stats["probs"], axis=1), data.num_classes)
                # Only in metrics.json: metrics.csv and the [METRICS] line keep their fixed EPOCH_FIELDS.
                record["per_class"] = metrics.per_class_report(matrix, data.class_names)
                improved = state.record_epoch(record, eval_stats["probs"], matrix)
                for line in training.epoch_lines(record, settings.epochs, improved):
                    log.info(line)
                if settings.patience and state.epochs_without_improvement >= settings.patience:
                    state.early_stopped = True
                    log.info(f"early stopping: no better val_logloss for {settings.patience} epochs "
                             f"(best: epoch {state.best['epoch']})")
                checkpoints.save(state)

        if state.best is None:
            raise training.TrainingError("no epoch finished, nothing to save")
        network.load_state_dict(state.best_model)  # the final model and outputs are the best epoch's
        train_model.eval()
        test = (None, {"skipped": f"no test_data.pkl in {settings.data_dir}"})
        if data.test is not None:
            tick = time.monotonic()
            test_probs = engine.predict_probs(eval_model, data.place(data.test["images"]), inference)
            test = (test_probs, {"tta": bool(settings.tta), "seconds": time.monotonic() - tick})
        if not context.is_main:
            return
        config = training.run_config(settings, data, context, schedule, resumed_from)
        outputs.write_all_outputs(training.run_result(settings, state, data, test, config))
    log.info(f"done in {time.monotonic() - started:.1f} s: best epoch {state.best['epoch']} "
             f"(val_logloss {state.best['val_logloss']:.4f}, val_acc {state.best['val_acc']:.4f}); "
             f"model in {settings.model_dir}, outputs in {settings.output_dir}")


# --------------------------------------------------------------------------- predict only
def predict_only(settings: training.Settings) -> None:
    """No training: write test_predictions.csv for the data dir with the model in the model dir."""
    device = training.resolve_device(settings.device)
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    model_path = settings.model_dir / model_lib.MODEL_FILENAME
    if not model_path.is_file():
        raise FileNotFoundError(f"--predict-only needs {model_path}; train first or point --model-dir at a trained model")
    network, artifact = model_lib.load_model_artifact(model_path, map_location=device)
    network.to(device).eval()
    class_names, preprocessing = list(artifact["class_names"]), artifact["preprocessing"]
    test_data = dataset.load_split(settings.data_dir, "test")
    trained = {"image_shape": (int(preprocessing["stored_image_size"]),) * 2,
               "resize_policy": preprocessing.get("resize_policy"), "class_names": class_names}
    training_data.check_agreement(test_data, trained, str(settings.data_dir), str(model_path))
    amp_dtype, _ = engine.select_precision(device)
    inference = engine.Inference(settings.eval_batch_size, int(preprocessing["image_size"]), amp_dtype, settings.tta)
    probs = engine.predict_probs(network, loader.DeviceImages(test_data["images"], device), inference)
    prior = np.asarray(preprocessing.get("class_prior") or np.full(len(class_names), 1.0 / len(class_names)))
    test_path = settings.output_dir / "test_predictions.csv"
    summary = outputs.write_test_predictions(test_path, settings.data_dir, test_data, probs, prior, class_names)
    log.info(f"test predictions: {summary['num_images']} rows -> {test_path}")


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.setup_logging(enabled=True)
    try:
        settings = training.Settings.from_args(args)
        if settings.predict_only:
            # Under torchrun the other ranks have nothing to do: one process writes the predictions.
            if distributed.ranks_from_env()[0] == 0:
                predict_only(settings)
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
    except training.TrainingInterrupted as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sagemaker.write_failure(str(exc))
        return SIGTERM_EXIT_CODE
    except Exception as exc:  # noqa: BLE001 - every failure must reach stderr and SageMaker's failure file
        expected = (dataset.DatasetError, FileNotFoundError, model_lib.WeightsError,
                    checkpoint.CheckpointMismatchError, training.TrainingError, distributed.DistributedSetupError,
                    ValueError, OSError)
        if not isinstance(exc, expected):
            traceback.print_exc()
        reason = f"{type(exc).__name__}: {exc}"
        print(f"error: {reason}", file=sys.stderr, flush=True)
        sagemaker.write_failure(reason)
        return 1


if __name__ == "__main__":
    sys.exit(main())
