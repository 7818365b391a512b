"""dss_train.py's flags, by group (paths, training, validation split, run, tracking): the help
text users read. ``dss_train.build_parser`` puts them together; ``dss.training.Settings`` holds
their values, field for field in this order.
"""

from __future__ import annotations

import argparse

from dss import backbones, cli, engine, split, streaming, tracking, training


def add_path_arguments(parser: argparse.ArgumentParser) -> None:
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
                            "about 224 MB for ResNet18 with adamw and the EMA (179 MB with --ema-decay 0, 45 MB less "
                            "with sgd)")


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
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
    train.add_argument("--crop-scale", type=cli.area_share, default=1.0,
                       help="random resized crops of training images cover this share of the frame's area up to "
                            "all of it (aspect 3/4..4/3); 1 = no crops, only flips and colour jitter")
    train.add_argument("--ema-decay", type=cli.decay, default=0.999,
                       help="average of the weights over steps, evaluated and saved instead of them (0: off)")
    train.add_argument("--class-weights", choices=("none", "balanced"), default="none",
                       help="'balanced' weights the loss by inverse class frequency")
    train.add_argument("--patience", type=cli.non_negative_int, default=0,
                       help="stop after this many epochs without a better best epoch (0 = never)")
    train.add_argument("--best-epoch-by", choices=training.BEST_EPOCH_CHOICES, default="calibrated-logloss",
                       help="the epoch kept: lowest validation log loss ('logloss'), or lowest log loss after "
                            "a temperature fitted on that epoch's validation logits ('calibrated-logloss': the "
                            "predictions temperature scaling delivers)")
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
    split_group.add_argument("--folds", type=cli.positive_int, default=1,
                             help="K > 1: train K models on K folds grouped by site (by --split-by), score every "
                                  "labelled image out of fold (oof_predictions.csv, metrics.json 'cv') and predict the "
                                  "test set with their mean; --val-fraction is then unused. 1: one validation split")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
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
    run.add_argument("--tta", type=cli.str2bool, default=None, metavar="{true,false}",
                     help="average predictions over the image and its horizontal flip [default: true when training; "
                          "with --predict-only, as the model was trained]")
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


def add_tracking_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tracking (MLflow, optional: pip install -r requirements-mlflow.txt)")
    group.add_argument("--mlflow", type=cli.str2bool, default=None, metavar="{true,false}",
                       help="log this run to MLflow [default: when MLFLOW_TRACKING_URI is set or "
                            "--mlflow-experiment is given]")
    group.add_argument("--mlflow-experiment", default=None, metavar="NAME",
                       help=f"MLflow experiment [default: $MLFLOW_EXPERIMENT_NAME, else {tracking.DEFAULT_EXPERIMENT}]")
    group.add_argument("--mlflow-log-model", type=cli.str2bool, default=False, metavar="{true,false}",
                       help="also upload model.pth to MLflow (about 45 MB for ResNet18)")
