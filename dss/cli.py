"""Command-line conventions shared by both scripts: value parsing, help text and log lines.

SageMaker passes every hyperparameter as a ``--key value`` string, so booleans arrive as
``True``/``False``/``true``/``1``...; ``str2bool`` accepts all of them. Log lines go through the
``dss`` logger as plain text on stdout (SageMaker's log stream and ``metric_definitions`` read
stdout); under DDP only rank 0 prints them.
"""

from __future__ import annotations

import argparse
import logging
import sys

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


# The smallest image side ResNet18 can use: its five stride-2 stages take 32 px down to 1 px; below
# that the last stages have no spatial extent left and the model trains at chance level.
MIN_IMAGE_SIZE = 32
# The largest: one 4096 px square image is 4096 x 4096 x 3 bytes = 48 MiB of uint8 (1,000 of them 48 GiB
# of pickle; as a float32 network input 192 MiB each). Camera-trap frames are at most ~4000 px wide,
# so a larger side only upsamples; 100000 px would be 28 GiB per image and kill the decode workers.
MAX_IMAGE_SIZE = 4096


def image_size(value: str) -> int:
    """An image side in px, from MIN_IMAGE_SIZE to MAX_IMAGE_SIZE."""
    number = int(value)
    if number < MIN_IMAGE_SIZE:
        raise argparse.ArgumentTypeError(f"expected at least {MIN_IMAGE_SIZE} px (ResNet18 halves the image five "
                                         f"times; smaller images train at chance level), got {value!r}")
    if number > MAX_IMAGE_SIZE:
        raise argparse.ArgumentTypeError(
            f"expected at most {MAX_IMAGE_SIZE} px, got {value!r}: one {number} px square image is {number} x "
            f"{number} x 3 bytes = {number * number * 3 / 2**30:,.1f} GiB as uint8, in every decode worker and "
            "every pickle row (camera-trap frames are at most ~4000 px wide: a larger side only upsamples)")
    return number


def fraction(value: str) -> float:
    number = float(value)
    if not 0.0 < number < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction strictly between 0 and 1, got {value!r}")
    return number


def area_share(value: str) -> float:
    """A share of an image's area: above 0, at most 1."""
    number = float(value)
    if not 0.0 < number <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a share of the image area in (0, 1], got {value!r}")
    return number


def decay(value: str) -> float:
    """An EMA decay: 0 (off) up to, not including, 1."""
    number = float(value)
    if not 0.0 <= number < 1.0:
        raise argparse.ArgumentTypeError(f"expected a decay in [0, 1), got {value!r}")
    return number


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's layout and shows "(default: X)", except where the help text already
    explains a computed default (the flag's default is None)."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


LOGGER_NAME = "dss"
log = logging.getLogger(LOGGER_NAME)


class _RankFilter(logging.Filter):
    """Passes records only in the process that prints (rank 0 of a DDP job; not with --quiet)."""

    def __init__(self):
        super().__init__()
        self.enabled = True

    def filter(self, record: logging.LogRecord) -> bool:
        return self.enabled


class _StdoutHandler(logging.StreamHandler):
    """Writes to the current ``sys.stdout`` (pytest and notebooks replace it after import) and
    flushes every line, so a killed job's log is complete up to its last step."""

    def __init__(self):
        super().__init__(sys.stdout)

    def emit(self, record: logging.LogRecord) -> None:
        # Assigned, not setStream: that flushes the old stream, which pytest may have closed.
        self.stream = sys.stdout
        super().emit(record)


_filter = _RankFilter()


def setup_logging(enabled: bool = True) -> logging.Logger:
    """Route ``dss`` log lines to stdout as plain messages; ``enabled=False`` silences them (DDP
    ranks other than 0, ``--quiet``). Idempotent: the scripts call it once per run."""
    if not any(isinstance(handler, _StdoutHandler) for handler in log.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(_filter)
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    _filter.enabled = bool(enabled)
    return log
