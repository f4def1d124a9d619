"""Pausing the cyclic garbage collector while the caller's thread builds many small objects.

Encoding a state of 50,000 tensors allocates a few hundred thousand dicts and
lists; the collector then runs dozens of times over every object of the
process, which measured at about a third of a save's time. None of these
objects form cycles, so nothing is gained by collecting during that work.

The collector is one switch for the whole process, so a pause is kept short
and happens only in the thread that called savegame (``save()`` encoding its
state, ``restore()`` decoding one), which waits for it anyway. savegame's own
background threads never pause it (:func:`never_in_this_thread`): a background
write lasts seconds, and the training threads that go on meanwhile must keep
their garbage collected.

The pause nests and is thread-safe: the collector is re-enabled when the last
pause ends, and only if it was enabled when the first began, so a program that
turned it off keeps it off.
"""

from __future__ import annotations

import functools
import gc
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

_lock = threading.Lock()
_depth = 0
_was_enabled = False
_background = threading.local()

P = ParamSpec("P")
R = TypeVar("R")


def never_in_this_thread() -> None:
    """Called first by savegame's background threads: pauses they ask for leave the collector running."""
    _background.active = True


@contextmanager
def paused() -> Iterator[None]:
    global _depth, _was_enabled
    if getattr(_background, "active", False):
        yield
        return
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()


def pausing(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorate ``fn`` to run with the collector paused (unless in a background thread)."""
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with paused():
            return fn(*args, **kwargs)
    return wrapper
