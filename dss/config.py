"""Command-line value parsing and SageMaker environment conventions.

SageMaker passes every hyperparameter as a ``--key value`` string, so booleans
arrive as ``True``/``False``/``true``/``1``...; ``str2bool`` accepts all of them.
Paths default from the ``SM_*`` variables when they exist, so the same script runs
on a laptop and as a training job; an explicit flag always wins.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def str2bool(value: str | bool) -> bool:
    """Parse a boolean flag value: true/false/True/False/1/0/yes/no."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false/1/0), got {value!r}")


def positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}")
    return number


def fraction(value: str) -> float:
    number = float(value)
    if not 0.0 < number < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction strictly between 0 and 1, got {value!r}")
    return number


def under_sagemaker(environ: os._Environ | dict | None = None) -> bool:
    """True when SageMaker's training toolkit started us (it sets SM_* variables)."""
    env = os.environ if environ is None else environ
    return "SM_TRAINING_ENV" in env or "SM_MODEL_DIR" in env


def sagemaker_data_dir(environ=None) -> str | None:
    """The training channel: SM_CHANNEL_TRAINING, else SM_CHANNEL_TRAIN."""
    env = os.environ if environ is None else environ
    return env.get("SM_CHANNEL_TRAINING") or env.get("SM_CHANNEL_TRAIN")


def sagemaker_model_dir(environ=None) -> str | None:
    env = os.environ if environ is None else environ
    return env.get("SM_MODEL_DIR")


def sagemaker_output_data_dir(environ=None) -> str | None:
    env = os.environ if environ is None else environ
    return env.get("SM_OUTPUT_DATA_DIR")


def sagemaker_checkpoint_dir(environ=None) -> str | None:
    """/opt/ml/checkpoints is where SageMaker syncs spot checkpoints; only used under SageMaker."""
    env = os.environ if environ is None else environ
    if not under_sagemaker(env):
        return None
    return env.get("SM_CHECKPOINT_DIR", "/opt/ml/checkpoints")


def write_sagemaker_failure(reason: str, environ=None) -> Path | None:
    """Write the failure reason where SageMaker shows it (``$SM_OUTPUT_DIR/failure``).

    Does nothing outside SageMaker. Returns the path written, if any.
    """
    env = os.environ if environ is None else environ
    if not under_sagemaker(env):
        return None
    output_dir = Path(env.get("SM_OUTPUT_DIR", "/opt/ml/output"))
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        path = output_dir / "failure"
        path.write_text(reason.rstrip() + "\n", encoding="utf-8")
        return path
    except OSError:
        return None
