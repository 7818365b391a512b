"""dss_train.py's flags, by group (paths, training, validation split, run, tracking): the help
text users read, and for each flag whether it changes results. ``build_parser`` puts them
together; ``dss.train.Settings`` holds their values, field for field in this order.

One declaration per setting: every flag is added through ``_add``, which must be told whether the
flag changes results (what the run learns, the epoch it keeps or the probabilities it serves).
``result_settings()`` lists those flags; the checkpoint fingerprint and model.pth's
hyperparameters are derived from it (``Settings.recipe``), so a new flag cannot be left out of them.
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass, fields
from pathlib import Path

from dss import cli, sagemaker
from dss.cli import log
from dss.data import streaming
from dss.models import backbones
from dss.predict import results
from dss.train import engine, split, tracking

# --best-epoch-by: the epoch record's field that chooses the best epoch (lowest wins).
BEST_EPOCH_FIELDS = {"logloss": "val_logloss", "calibrated-logloss": "val_logloss_calibrated"}
BEST_EPOCH_CHOICES = tuple(BEST_EPOCH_FIELDS)
# --val-fraction when not given (it is None then, so a K-fold run can say it is unused).
DEFAULT_VAL_FRACTION = 0.25
# Earlier runs kept in <model dir>/previous/ when a run with other settings or data replaces them.
DEFAULT_KEEP_PREVIOUS = 5


def _add(group, flag: str, changes_results: bool, **kwargs) -> argparse.Action:
    """``group.add_argument(flag, **kwargs)``, marked with whether the flag changes results."""
    action = group.add_argument(flag, **kwargs)
    action.changes_results = changes_results
    return action


def build_parser() -> argparse.ArgumentParser:
    """dss_train.py's parser: SageMaker's conventions (dss.sagemaker), every group below."""
    parser = sagemaker.ArgumentParser(
        description="Fine-tune a torchvision network on preprocess.py pickles (also the SageMaker entry point).",
        formatter_class=cli.HelpFormatter, allow_abbrev=False)
    for add_group in (add_path_arguments, add_training_arguments, add_run_arguments, add_tracking_arguments):
        add_group(parser)
    return parser


@functools.cache
def result_settings() -> tuple[str, ...]:
    """The settings (``Settings`` field names, in the parser's order) whose flags change results."""
    actions = [action for action in build_parser()._actions if action.dest != "help"]
    return tuple(action.dest for action in actions if action.changes_results)


def add_path_arguments(parser: argparse.ArgumentParser) -> None:
    paths = parser.add_argument_group("paths")
    _add(paths, "--data-dir", False, default=None,
                       help="folder with train_data.pkl/test_data.pkl (or their shards) "
                            "[default: $SM_CHANNEL_TRAINING, else $SM_CHANNEL_TRAIN, else ./output]")
    _add(paths, "--model-dir", False, default=None,
                       help="where model.pth and config.json go [default: $SM_MODEL_DIR, else ./models]")
    _add(paths, "--output-dir", False, default=None,
                       help="where metrics, predictions and plots go [default: $SM_OUTPUT_DATA_DIR under SageMaker, "
                            "else the model dir; with --predict-only <model dir>/predictions/<data dir name>]")
    _add(paths, "--checkpoint-dir", False, default=None,
                       help="resume from / save per-epoch checkpoints here; {job_name} becomes the SageMaker "
                            "training job's name [default: none locally; /opt/ml/checkpoints under SageMaker]")
    _add(paths, "--keep-checkpoints", False, type=cli.positive_int, default=1,
                       help="checkpoints kept in --checkpoint-dir: the newest N, plus the one being written until it "
                            "is complete. Each holds the weights, the best epoch's weights and the optimizer state: "
                            "about 224 MB for ResNet18 with adamw and the EMA (179 MB with --ema-decay 0, 45 MB less "
                            "with sgd)")
    _add(paths, "--keep-previous", False, type=cli.non_negative_int, default=DEFAULT_KEEP_PREVIOUS,
         help="a run with other settings or data moves the earlier run's model and outputs into "
              "<model dir>/previous/<its run id>/ (and <output dir>/previous/ when apart); keep the newest N there "
              "(0: keep none, the earlier run is deleted)")


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    train = parser.add_argument_group("training")
    _add(train, "--epochs", True, type=cli.positive_int, default=10, help="passes over the training split")
    _add(train, "--batch-size", True, type=cli.positive_int, default=32,
                       help="training images per optimizer step (on a GPU use 256 or more for throughput)")
    _add(train, "--learning-rate", True, type=float, default=1e-3, help="peak learning rate after warm-up")
    _add(train, "--optimizer", True, choices=engine.OPTIMIZERS, default="adamw", help="optimizer")
    _add(train, "--weight-decay", True, type=float, default=0.01, help="weight decay (decoupled for adamw)")
    _add(train, "--warmup-epochs", True, type=float, default=0.5,
                       help="epochs of linear learning-rate warm-up before the cosine decay (may be fractional)")
    _add(train, "--label-smoothing", True, type=float, default=0.0, help="label smoothing of the loss, 0..1")
    _add(train, "--crop-scale", True, type=cli.area_share, default=1.0,
                       help="random resized crops of training images cover this share of the frame's area up to "
                            "all of it (aspect 3/4..4/3); 1 = no crops, only flips and colour jitter")
    _add(train, "--ema-decay", True, type=cli.decay, default=0.999,
                       help="average of the weights over steps, evaluated and saved instead of them (0: off)")
    _add(train, "--class-weights", True, choices=("none", "balanced"), default="none",
                       help="'balanced' weights the loss by inverse class frequency")
    _add(train, "--patience", True, type=cli.non_negative_int, default=0,
                       help="stop after this many epochs without a better best epoch (0 = never)")
    _add(train, "--best-epoch-by", True, choices=BEST_EPOCH_CHOICES, default="calibrated-logloss",
                       help="the epoch kept: lowest validation log loss ('logloss'), or lowest log loss after "
                            "a temperature fitted on that epoch's validation logits ('calibrated-logloss': the "
                            "predictions temperature scaling delivers)")
    _add(train, "--arch", True, choices=backbones.ARCHITECTURES, default=backbones.DEFAULT_ARCH,
                       help="network: a torchvision model with its own ImageNet weights, normalisation, new head")
    _add(train, "--weights", True, default="imagenet",
                       help="initial weights: 'imagenet' (torchvision download/cache), 'none' (random) "
                            "or a PATH to a state dict / model.pth")
    _add(train, "--image-size", True, type=cli.image_size, default=None,
         help=f"network input size in px, {cli.MIN_IMAGE_SIZE} to {cli.MAX_IMAGE_SIZE} [default: the size "
              "stored in the pickles]")
    _add(train, "--seed", True, type=int, default=0, help="seed for the split, initialisation and batches")
    split_group = parser.add_argument_group("validation split")
    _add(split_group, "--val-fraction", True, type=cli.fraction, default=None,
         help=f"share of the labelled images held out for validation [default: {DEFAULT_VAL_FRACTION}; "
              "unused with --folds K > 1]")
    _add(split_group, "--split-by", True, choices=split.SPLIT_CHOICES, default=None,
                             help="'site' keeps every camera site on one side (what the test set needs); "
                                  "[default: site when the data has sites, else random]")
    _add(split_group, "--folds", True, type=cli.positive_int, default=1,
                             help="K > 1: train K models on K folds grouped by site (by --split-by), score every "
                                  "labelled image out of fold (oof_predictions.csv, metrics.json 'cv') and predict the "
                                  "test set with their mean; --val-fraction is then unused. 1: one validation split")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    run = parser.add_argument_group("run")
    _add(run, "--predict-only", False, type=cli.str2bool, nargs="?", const=True, default=False,
                     help="no training: load model.pth from --model-dir and write predictions.csv and "
                          "test_predictions.csv for --data-dir into --output-dir (true/false; the flag alone means true)")
    _add(run, "--overwrite", False, type=cli.str2bool, nargs="?", const=True, default=False,
                     help="let --predict-only replace predictions in --output-dir that another model or other data "
                          "made (a re-run of the same model on the same data replaces its own without it)")
    _add(run, "--device", True, choices=("auto", "cpu", "cuda"), default="auto",
                     help="'auto' uses the GPU when there is one")
    _add(run, "--compile", False, type=cli.str2bool, default=False,
                     help="torch.compile the model (true/false; ~20 s compile, faster epochs on GPU)")
    _add(run, "--tta", True, type=cli.str2bool, default=None, metavar="{true,false}",
                     help="average predictions over the image and its horizontal flip [default: true when training; "
                          "with --predict-only, as the model was trained]")
    _add(run, "--temperature-scaling", True, type=cli.str2bool, default=True,
                     help="fit a temperature on the best epoch's validation logits (after TTA); applied to val/test "
                          "probabilities, stored in model.pth (true/false)")
    _add(run, "--data-in-memory", True, choices=streaming.MEMORY_MODES, default="auto",
                     help="where the images live while training: 'device' (all on the GPU; pinned host memory "
                          "when they do not fit), 'host' (pinned host memory, batches copied), 'stream' (read "
                          "shard by shard from --data-dir with double buffering: data bigger than memory); "
                          f"'auto' streams when the train pickles exceed {streaming.HOST_MEMORY_SHARE * 100:.0f}%% "
                          "of the available host memory, else 'device'")
    _add(run, "--eval-batch-size", False, type=cli.positive_int, default=256,
                     help="images per forward pass when evaluating and predicting")
    _add(run, "--num-threads", False, type=cli.positive_int, default=None,
                     help="CPU threads for torch; give 1 or 2 to leave CPUs to other heavy work [default: the CPUs "
                          "this process may use (affinity mask, cgroup quota), at most torch's own count]")


def add_tracking_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tracking (MLflow, optional: pip install -r requirements-mlflow.txt)")
    _add(group, "--mlflow", False, type=cli.str2bool, default=None, metavar="{true,false}",
                       help="log this run to MLflow [default: when MLFLOW_TRACKING_URI is set or "
                            "--mlflow-experiment is given]")
    _add(group, "--mlflow-experiment", False, default=None, metavar="NAME",
                       help=f"MLflow experiment [default: $MLFLOW_EXPERIMENT_NAME, else {tracking.DEFAULT_EXPERIMENT}]")
    _add(group, "--mlflow-log-model", False, type=cli.str2bool, default=False, metavar="{true,false}",
                       help="also upload model.pth to MLflow (about 45 MB for ResNet18)")


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Settings:
    """dss_train.py's flags, in the parser's order (config.json keeps it), with the four paths
    resolved. Units: learning rate per step at the peak, warm-up in epochs, sizes in px, batch
    sizes in images per process."""

    data_dir: Path
    model_dir: Path
    output_dir: Path
    checkpoint_dir: Path | None
    keep_checkpoints: int
    keep_previous: int
    epochs: int
    batch_size: int
    learning_rate: float
    optimizer: str
    weight_decay: float
    warmup_epochs: float
    label_smoothing: float
    crop_scale: float
    ema_decay: float
    class_weights: str
    patience: int
    best_epoch_by: str
    arch: str
    weights: str
    image_size: int | None
    seed: int
    val_fraction: float
    split_by: str | None
    folds: int
    predict_only: bool
    overwrite: bool
    device: str
    compile: bool
    tta: bool | None  # None only with --predict-only: the model's own
    temperature_scaling: bool
    data_in_memory: str
    eval_batch_size: int
    num_threads: int | None
    mlflow: bool | None
    mlflow_experiment: str | None
    mlflow_log_model: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        """Paths: a flag wins; then SageMaker's SM_* variables; then the local defaults (the output
        dir of --predict-only: a folder per data dir under the model dir, never the model dir).
        --tta: true when training unless given; None with --predict-only (the model's own)."""
        model_dir = args.model_dir or sagemaker.model_dir() or "./models"
        data_dir = args.data_dir or sagemaker.training_channel() or "./output"
        sagemaker_output = sagemaker.output_data_dir() if sagemaker.under_sagemaker() else None
        local_output = results.predictions_dir(model_dir, data_dir) if args.predict_only else model_dir
        checkpoint_dir = sagemaker.expand_job_name(args.checkpoint_dir or sagemaker.checkpoint_dir() or "")
        # --tta: on by default when training; predict-only follows the model unless told otherwise.
        tta = args.tta if args.tta is not None or args.predict_only else True
        if args.val_fraction is not None and args.folds > 1:
            log.warning(f"warning: --val-fraction {args.val_fraction} is unused with --folds {args.folds}: "
                        "every fold is validated once")
        # Unused with K > 1 folds: None then, so it neither refuses a resume nor tells runs apart.
        val_fraction = (None if args.folds > 1 else
                        DEFAULT_VAL_FRACTION if args.val_fraction is None else args.val_fraction)
        resolved = {"tta": tta, "val_fraction": val_fraction, "data_dir": Path(data_dir), "model_dir": Path(model_dir),
                    "output_dir": Path(args.output_dir or sagemaker_output or local_output),
                    "checkpoint_dir": Path(checkpoint_dir) if checkpoint_dir else None}
        return cls(**{**vars(args), **resolved})

    def tracking(self) -> tracking.TrackingSettings:
        """MLflow tracking as asked for by the flags and MLFLOW_TRACKING_URI; raises
        tracking.TrackingError when it is asked for and mlflow is not installed."""
        return tracking.resolve(self.mlflow, self.mlflow_experiment, self.mlflow_log_model)

    def recipe(self, resolved: dict) -> dict:
        """Every setting that changes results (``result_settings()``), in the
        parser's order, with the values this run resolved (``resolved``: e.g. split_by, image_size)."""
        names = result_settings()
        unknown = set(resolved) - set(names)
        if unknown:
            raise ValueError(f"not settings that change results: {sorted(unknown)}")
        return {name: resolved.get(name, getattr(self, name)) for name in names}

    def flags(self) -> dict:
        """Every flag in the parser's order, paths as strings."""
        values = {item.name: getattr(self, item.name) for item in fields(self)}
        return {name: str(value) if isinstance(value, Path) else value for name, value in values.items()}
