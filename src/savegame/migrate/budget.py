"""How much memory loading one foreign file may claim: a byte budget relative to its size.

A pickle is a program: a few bytes can ask an allowlisted constructor for
gigabytes (``bytearray(2**30)``, ``numpy.ndarray((2**30,), "u1")``, a storage
record that claims 2**40 elements, a 1-element tensor expanded to 2**28
elements that the writer would materialise). Every allocation a foreign file can
cause while savegame loads and imports it is charged to a :class:`Budget` first;
going over raises :class:`~savegame.errors.UnsafeCheckpointError` before the
memory is taken.

The default limit is ``FACTOR * file size + SLACK``: a genuine checkpoint holds
its tensor bytes, so what it needs is a small multiple of its size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from savegame.errors import ConfigurationError, UnsafeCheckpointError

FACTOR = 4
SLACK = 64 * 2**20


def default_limit(file_bytes: int) -> int:
    """What a file of ``file_bytes`` bytes may allocate while loading, unless the caller says otherwise."""
    return FACTOR * max(0, file_bytes) + SLACK


def check_max_bytes(max_bytes: int | None) -> None:
    """ConfigurationError unless ``max_bytes`` is None or a positive int."""
    if max_bytes is not None and (type(max_bytes) is not int or max_bytes < 1):
        raise ConfigurationError(f"max_bytes must be a positive int (bytes) or None for the default, got {max_bytes!r}")


class Budget:
    """The bytes one load may still allocate; :meth:`spend` refuses before going over."""

    def __init__(self, source: str, file_bytes: int, max_bytes: int | None = None) -> None:
        check_max_bytes(max_bytes)
        self.source, self.file_bytes = source, file_bytes
        self.explicit = max_bytes is not None
        self.limit = default_limit(file_bytes) if max_bytes is None else max_bytes
        self.spent = 0

    def spend(self, nbytes: int, what: str) -> None:
        """Charge ``nbytes`` for ``what``; UnsafeCheckpointError naming the limit if that is too much."""
        if nbytes < 0:
            raise UnsafeCheckpointError(f"{self.source}: {what} claims a negative size")
        if self.spent + nbytes > self.limit:
            raise UnsafeCheckpointError(self._refusal(nbytes, what))
        self.spent += nbytes

    def _refusal(self, nbytes: int, what: str) -> str:
        rule = ("the limit you set with max_bytes" if self.explicit else
                f"the default limit for a {self.file_bytes}-byte file ({FACTOR} x its size + {SLACK // 2**20} MiB)")
        return (f"{self.source}: refused: {what} needs {nbytes} bytes, which would take loading it past "
                f"{self.limit} bytes, {rule}. A small file that asks for much more memory than it holds is a "
                "memory bomb. If you trust the file and have the memory, raise the limit: "
                "max_bytes=N (savegame migrate --max-bytes N)")


_CURRENT: ContextVar[Budget | None] = ContextVar("savegame_migrate_budget", default=None)


@contextmanager
def charged_to(budget: Budget) -> Iterator[Budget]:
    """Charge every :func:`spend` in the block (this thread/context) to ``budget``."""
    token = _CURRENT.set(budget)
    try:
        yield budget
    finally:
        _CURRENT.reset(token)


def spend(nbytes: int, what: str) -> None:
    """Charge the active budget (outside any load: the default budget of an empty file, per call)."""
    budget = _CURRENT.get()
    (budget or Budget("a foreign pickle", 0)).spend(nbytes, what)


def charge_tensor(size: Any, element_size: int, storage_bytes: int) -> None:
    """Charge a tensor view of ``size`` over a storage of ``storage_bytes``: what importing it writes.

    Importing materialises every element, so a 1-element storage expanded to 2**28
    elements (stride 0) costs 2**28 elements; the message says so.
    """
    if not (isinstance(size, (tuple, list)) and all(type(d) is int and d >= 0 for d in size)):
        raise UnsafeCheckpointError(f"refused a tensor of size {size!r:.80}: not a tuple of non-negative ints")
    numel = math.prod(size)
    nbytes = numel * element_size
    what = f"a tensor of shape {list(size)}"
    if nbytes > storage_bytes:
        what += (f" over only {storage_bytes} bytes of storage (an expanded view, e.g. stride 0: importing it "
                 f"writes all {numel} elements)")
    spend(nbytes, what)
