"""Stopping a run cleanly (dss_train.py training, --predict-only): ``StopFlag`` turns SIGTERM (SageMaker spot interruption, ``docker
stop``) and Ctrl-C into one flag for the whole run: the training loop polls it once per step, and
the run checks it between phases (after loading, after each epoch's checkpoint, after each
member, before and after writing the outputs), so a stop is never lost.
"""

from __future__ import annotations

import signal
import threading

from dss import distributed
from dss.cli import log


# The signals that stop a run at the next step, as its messages name them.
SIGNAL_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C (SIGINT)"}


class TrainingInterrupted(Exception):
    """SIGTERM or Ctrl-C (SIGINT) stopped the run; ``exit_code`` is 128 + the signal's number
    (143, 130). Stopped at a step, a checkpoint was saved when there is a checkpoint dir."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.exit_code = 128 + int(signum)

    @classmethod
    def at(cls, epoch: int, step_in_epoch: int, steps_per_epoch: int, saved: bool,
           signum: int | None = signal.SIGTERM) -> TrainingInterrupted:
        signum = signum or signal.SIGTERM  # a DDP rank stopped by another rank's signal
        where = f"stopped by {SIGNAL_NAMES[signum]} in epoch {epoch} at step {step_in_epoch} of {steps_per_epoch}"
        what = ("checkpoint saved, re-run with the same --checkpoint-dir to resume" if saved
                else "nothing saved: no --checkpoint-dir was given")
        return cls(f"{where}; {what}", signum)

    @classmethod
    def after(cls, where: str, resumable: bool | None, signum: int | None) -> TrainingInterrupted:
        """A stop that arrived outside the steps of an epoch, taken when ``where`` finished
        (``resumable`` None: a --predict-only run, which writes nothing when stopped)."""
        signum = signum or signal.SIGTERM  # a DDP rank stopped by another rank's signal
        what = ("no predictions written" if resumable is None else
                "re-run with the same --checkpoint-dir to resume" if resumable
                else "nothing saved: no --checkpoint-dir was given")
        return cls(f"stopped by {SIGNAL_NAMES[signum]} {where}; {what}", signum)

    @classmethod
    def at_once(cls, checkpoint_dir: str | None, predict_only: bool = False) -> TrainingInterrupted:
        """Ctrl-C outside the training loop, or a second Ctrl-C in it: the run stopped where it was."""
        what = ("no predictions written" if predict_only else
                "re-run with the same --checkpoint-dir to resume from its newest complete checkpoint"
                if checkpoint_dir else "nothing saved: no --checkpoint-dir was given")
        return cls(f"stopped at once by {SIGNAL_NAMES[signal.SIGINT]}; {what}", signal.SIGINT)



class StopFlag:
    """Set by SIGTERM (SageMaker spot interruption, ``docker stop``) or Ctrl-C (SIGINT) anywhere in
    a run; training stops at the next step (saving a checkpoint when it has a checkpoint dir), any
    other phase at its end (``check``). A second Ctrl-C stops at once: the handler raises
    KeyboardInterrupt.

    ``with StopFlag() as stop:`` installs the handlers for the block (from the main thread only;
    Python delivers signals there); ``bind(context)`` once the DDP context exists. ``stop()`` is
    the poll the training loop calls once per step on every rank; ``signum`` is the signal that set
    it. Under DDP all ranks must stop at the same step, so every ``every_steps`` calls the ranks
    agree (one small all-reduce) whether any of them got a signal; ``check`` agrees at once.
    """

    def __init__(self, context: distributed.Context | None = None, every_steps: int = 8):
        self.context, self.every_steps = context, every_steps
        self.event = threading.Event()
        self.signum: int | None = None
        self.previous: dict = {}
        self.calls = 0

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            self.previous = {signum: signal.signal(signum, self._handle) for signum in SIGNAL_NAMES}
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def bind(self, context: distributed.Context) -> StopFlag:
        """Agree with the other ranks of ``context`` from now on."""
        self.context = context
        return self

    def _handle(self, signum, frame) -> None:
        if self.event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop at once
        self.signum = self.signum or signum
        again = "; press Ctrl-C again to stop at once" if signum == signal.SIGINT else ""
        log.info(f"{SIGNAL_NAMES[signum]} received: stopping at the next step or at the end of this phase (saving a "
                 f"checkpoint when there is a --checkpoint-dir){again}")
        self.event.set()

    def _agreed(self) -> bool:
        requested = self.event.is_set()
        if self.context is not None and self.context.enabled:
            requested = distributed.any_rank(self.context, requested)
        return requested

    def __call__(self) -> bool:
        if self.context is None or not self.context.enabled:
            return self.event.is_set()
        self.calls += 1
        return self.calls % self.every_steps == 0 and self._agreed()

    def check(self, where: str, resumable: bool | None) -> None:
        """Raise ``TrainingInterrupted`` (exit 143 or 130) when a stop was asked for; every rank
        calls it at the same point. ``where``: the phase just finished, for the message;
        ``resumable``: whether a re-run with the same --checkpoint-dir continues from here."""
        if self._agreed():
            raise TrainingInterrupted.after(where, resumable, self.signum)
