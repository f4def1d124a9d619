"""Loaded foreign values -> plain values, within limits on how far they unfold.

A pickle can reference one object many times (the memo), so a few hundred bytes
can describe a list whose elements are the same list, 60 levels deep: a tree
of 2**60 nodes. Walking it naively hangs, and so would anything that walks the
imported state later (the writer's encoder). :func:`plain` visits each object once
and refuses values that would unfold into more than :data:`MAX_UNFOLDED` nodes or
nest deeper than :data:`MAX_DEPTH`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np

from savegame.errors import UnsafeCheckpointError
from savegame.migrate.allowlist import SafeArray, clean_dtype

MAX_DEPTH = 100
MAX_UNFOLDED = 5_000_000


def plain(value: Any) -> Any:
    """``value`` with every SafeArray turned into a plain ndarray and every dtype re-checked.

    Containers are rebuilt only where something inside changed, so tensors and large
    dicts pass through untouched. Shared objects stay shared.
    """
    return _Walk().visit(value, 0)[0]


class _Walk:
    def __init__(self) -> None:
        self.done: dict[int, tuple[Any, int]] = {}  # id -> (plain value, unfolded size)
        self.keep: list[Any] = []  # keeps visited objects alive, so their ids stay unique

    def visit(self, value: Any, depth: int) -> tuple[Any, int]:
        if depth > MAX_DEPTH:  # the unpicklers are iterative; walking deeper would exhaust Python's stack
            raise UnsafeCheckpointError(f"refused a pickle nested more than {MAX_DEPTH} levels deep")
        if id(value) in self.done:
            return self.done[id(value)]
        result = self._convert(value, depth)
        if result[1] > MAX_UNFOLDED:
            raise UnsafeCheckpointError(
                f"refused a pickle whose values unfold into more than {MAX_UNFOLDED} items (the same objects "
                "referenced over and over): importing it would never finish")
        self.done[id(value)] = result
        self.keep.append(value)
        return result

    def _convert(self, value: Any, depth: int) -> tuple[Any, int]:
        if isinstance(value, SafeArray):
            clean_dtype(value.dtype)
            return np.array(value, dtype=value.dtype, copy=True, subok=False), 1
        if isinstance(value, np.dtype):
            return clean_dtype(value), 1
        if isinstance(value, np.generic):
            clean_dtype(value.dtype)
            return value, 1
        if isinstance(value, dict):
            return self._mapping(value, depth)
        if isinstance(value, (list, tuple, set, frozenset)):
            pairs = [self.visit(v, depth + 1) for v in value]
            size = 1 + sum(s for _, s in pairs)
            if all(a is b for (a, _), b in zip(pairs, value)):
                return value, size
            items = [a for a, _ in pairs]
            kind = type(value) if type(value) in (list, tuple, set, frozenset) else list
            return kind(items), size
        return value, 1

    def _mapping(self, value: dict[Any, Any], depth: int) -> tuple[Any, int]:
        pairs = [(self.visit(k, depth + 1), self.visit(v, depth + 1)) for k, v in value.items()]
        size = 1 + sum(ks + vs for (_, ks), (_, vs) in pairs)
        if all(a is k and b is v for ((a, _), (b, _)), (k, v) in zip(pairs, value.items())):
            return value, size
        rebuilt: dict[Any, Any] = type(value)() if type(value) in (dict, OrderedDict) else {}
        rebuilt.update((a, b) for (a, _), (b, _) in pairs)
        return rebuilt, size
