"""Stopping a run cleanly: ``StopFlag`` turns SIGTERM (SageMaker spot interruption, ``docker
stop``) and Ctrl-C into one flag for the whole run: the training loop polls it once per step, and
the run checks it between phases (after loading, after each epoch's checkpoint, after each
member, before and after writing the outputs), so a stop is never lost.
"""

from __future__ import annotations

import signal
import threading

from dss import distributed
from dss.cli import log
from dss.training import SIGNAL_NAMES, TrainingInterrupted


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
