"""Graceful stop for training loops: the first Ctrl-C (SIGINT) or SIGTERM asks the loop to finish its current step,
save a resumable checkpoint and exit; a second Ctrl-C aborts at once. Shared by every recipe (pretrain, finetune
sft, dpo, cpt); a loop polls `requested` once per step.

    with StopRequest(log) as stop:
        while not budget.done(step, tokens, seconds) and not stop.requested:
            ...
    if stop.requested:
        return rundir.interrupted(run_dir, step, save, keep_last, kind, log)   # save, prune, log, 130

Outside the main thread signal handlers cannot be installed: Ctrl-C then raises KeyboardInterrupt as usual.
"""

from __future__ import annotations

import signal
from collections.abc import Callable


class StopRequest:
    def __init__(self, log: Callable[[str], None]):
        self.requested = False
        self._log = log
        self._old: dict = {}

    def __enter__(self) -> StopRequest:
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread
            self._old = {}
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self._log("stopping after this step and saving a checkpoint (Ctrl-C again to abort without saving)")

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
