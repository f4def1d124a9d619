"""Pausing the cyclic garbage collector while a save or restore builds many small objects.

Encoding a state of 50,000 tensors allocates a few hundred thousand dicts and
lists; the collector then runs dozens of times over every object of the
process, which measured at about a third of a save's time. None of these
objects form cycles, so nothing is gained by collecting during that work.

The pause nests and works across threads (the training thread encodes while the
writer thread serialises): the collector is re-enabled when the last pause
ends, and only if it was enabled when the first began, so a program that turned
it off keeps it off.
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

P = ParamSpec("P")
R = TypeVar("R")


@contextmanager
def paused() -> Iterator[None]:
    global _depth, _was_enabled
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
    """Decorate ``fn`` to run with the collector paused."""
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with paused():
            return fn(*args, **kwargs)
    return wrapper
