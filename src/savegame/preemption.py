"""When to save: every N steps, every T seconds, or when a preemption signal arrives.

Signal handlers only set a flag (a handler must not run a save: it could
interrupt the training step half-way). The save happens in the training thread
at the next ``maybe_save`` call, which then sets ``should_stop``.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

from savegame.errors import ConfigurationError

log = logging.getLogger("savegame.preemption")


class SaveSchedule:
    def __init__(self, *, every_steps: int | None, every_seconds: float | None, signals: Sequence[int]) -> None:
        if every_steps is not None and (type(every_steps) is not int or every_steps < 1):
            raise ConfigurationError(f"every_steps must be a positive int or None, got {every_steps!r}")
        if every_seconds is not None and (isinstance(every_seconds, bool) or not isinstance(every_seconds, (int, float))
                                          or every_seconds <= 0):
            raise ConfigurationError(f"every_seconds must be a positive number or None, got {every_seconds!r}")
        self.every_steps, self.every_seconds = every_steps, every_seconds
        self.stop_requested = False
        self._signalled: int | None = None
        self._last_step: int | None = None
        self._last_time = time.monotonic()
        self._previous: dict[int, Any] = {}
        for sig in signals:
            self._install(sig)

    def _install(self, sig: int) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise ConfigurationError("save_on_signals needs the Checkpointer to be created in the main thread")
        try:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        except (ValueError, OSError, TypeError) as exc:
            raise ConfigurationError(f"save_on_signals: cannot handle signal {sig!r}: {exc}") from exc

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signalled = signum

    def due(self, step: int) -> tuple[bool, bool]:
        """(a save is due, it is due because of a signal)."""
        if self._signalled is not None:
            log.info("signal %d received; saving at step %d", self._signalled, step)
            self._signalled = None
            return True, True
        if step == self._last_step:
            return False, False
        if self.every_steps is not None and step % self.every_steps == 0:
            return True, False
        if self.every_seconds is not None and time.monotonic() - self._last_time >= self.every_seconds:
            return True, False
        return False, False

    def saved(self, step: int) -> None:
        self._last_step, self._last_time = step, time.monotonic()

    def close(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
