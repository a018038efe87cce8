"""Stopping a run without losing it: SIGINT / SIGTERM handling and the non-finite-gradient stop."""
from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)


class TrainingDiverged(Exception):
    """Too many optimizer updates in a row had non-finite gradients; the message says where and what to try."""

    def __init__(self, step: int, in_a_row: int):
        super().__init__(
            f"training stopped at step {step}: the gradients were not finite (inf or NaN) for {in_a_row} optimizer "
            "updates in a row, so none of them was applied. Likely causes: a learning rate too high for this "
            "optimizer (try it 3-10x lower), fp16 overflow on a GPU without bf16 (try a lower learning rate or "
            "disable_amp), a base model with NaN weights, or an extreme loss setting (min_snr_gamma, loss_type). "
            "Raise max_skipped_updates to let the run try longer.")


class StopSignals:
    """While active, the first SIGINT (Ctrl-C) or SIGTERM asks the training loop to stop after the current step,
    so it can save a resumable checkpoint; a second SIGINT raises KeyboardInterrupt at once. Signal handlers can
    only be set in the main thread; elsewhere (e.g. a run started from a test's thread) nothing is installed."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._announced = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        # Logging here could re-enter a write to the console that the signal interrupted ("reentrant call": the
        # message lost, a logging error printed instead); the loop says it at its next check (`announce`).
        self.received = signal.Signals(signum).name

    def announce(self) -> None:
        """Says once, outside the handler, that a signal was received."""
        if self.received is not None and not self._announced:
            self._announced = True
            log.warning("%s received: stopping after this step and saving a resumable checkpoint (Ctrl-C again to "
                        "quit at once, without saving).", self.received)

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal's number."""
        return 128 + signal.Signals[self.received].value
