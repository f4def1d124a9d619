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
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from savegame.errors import ConfigurationError

log = logging.getLogger("savegame.run.schedule")


class SaveSchedule:
    """Arguments are validated by :class:`savegame.options.Options`; ``clock`` is monotonic seconds."""

    def __init__(self, *, every_steps: int | None, every_seconds: float | None, signals: Sequence[int],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.every_steps, self.every_seconds, self.clock = every_steps, every_seconds, clock
        self.stop_requested = False
        self._signalled: int | None = None
        self._last_step: int | None = None
        self._last_time = clock()
        self._previous: dict[int, Any] = {}
        try:
            for sig in signals:
                self._install(sig)
        except BaseException:
            self.close()
            raise

    def _install(self, sig: int) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise ConfigurationError("save_on_signals needs the Checkpointer to be created in the main thread")
        try:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        except (ValueError, OSError, TypeError) as exc:
            raise ConfigurationError(f"save_on_signals: cannot handle signal {sig!r}: {exc}") from exc

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signalled = signum

    def due(self, step: int) -> tuple[bool, int | None]:
        """(a save is due, the signal that made it due or None); taking a signal clears it."""
        if self._signalled is not None:
            sig, self._signalled = self._signalled, None
            log.info("signal %d received; saving at step %d", sig, step)
            return True, sig
        if step == self._last_step:
            return False, None
        if self.every_steps is not None and step % self.every_steps == 0:
            return True, None
        if self.every_seconds is not None and self.clock() - self._last_time >= self.every_seconds:
            return True, None
        return False, None

    def rearm(self, sig: int) -> None:
        """A signal-driven save failed: the next ``due`` tries again."""
        if self._signalled is None:
            self._signalled = sig

    @property
    def needs_agreement(self) -> bool:
        """Whether ranks of a job may disagree on :meth:`due` (a clock or a signal decides, not the step)."""
        return self.every_seconds is not None or bool(self._previous)

    def saved(self, step: int) -> None:
        self._last_step, self._last_time = step, self.clock()

    def close(self) -> None:
        """Put the previous handlers back (only possible in the main thread; elsewhere they stay)."""
        if not self._previous:
            return
        if threading.current_thread() is not threading.main_thread():
            log.warning("signal handlers of a Checkpointer closed outside the main thread stay installed")
            return
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
