"""Stopping a training run cleanly: ``StopFlag`` turns SIGTERM (SageMaker spot interruption,
``docker stop``) and Ctrl-C into a flag the training loop polls once per step.
"""

from __future__ import annotations

import signal
import threading

from dss import distributed
from dss.cli import log
from dss.training import SIGNAL_NAMES


class StopFlag:
    """Set by SIGTERM (SageMaker spot interruption, ``docker stop``) or Ctrl-C (SIGINT); training
    stops at the next step (and saves a checkpoint when it has a checkpoint dir). A second Ctrl-C
    stops at once: the handler raises KeyboardInterrupt.

    ``with StopFlag(context) as stop_requested:`` installs the handlers for the block (from the main
    thread only; Python delivers signals there) and ``stop_requested()`` is the poll the training
    loop calls once per step on every rank; ``signum`` is the signal that set it. Under DDP all
    ranks must stop at the same step, so every ``every_steps`` calls the ranks agree (one small
    all-reduce) whether any of them got a signal.
    """

    def __init__(self, context: distributed.Context, every_steps: int = 8):
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

    def _handle(self, signum, frame) -> None:
        if self.event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop at once
        self.signum = self.signum or signum
        again = "; press Ctrl-C again to stop at once" if signum == signal.SIGINT else ""
        log.info(f"{SIGNAL_NAMES[signum]} received: stopping at the next step (and saving a checkpoint when "
                 f"there is a --checkpoint-dir){again}")
        self.event.set()

    def __call__(self) -> bool:
        if not self.context.enabled:
            return self.event.is_set()
        self.calls += 1
        return self.calls % self.every_steps == 0 and distributed.any_rank(self.context, self.event.is_set())
