"""Reading plain values out of foreign checkpoints: numbers, counters, model state dicts."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from savegame.errors import CorruptCheckpointError

#: Model state-dict keys whose value may be anything: nn.Module.get_extra_state().
EXTRA_STATE = "_extra_state"


def as_float(value: Any) -> float | None:
    """A plain float of a number, a NumPy scalar or a one-element tensor; None for anything else."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            return None
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def as_count(value: Any, source: str) -> int:
    """A non-negative int (also from a NumPy integer or a one-element integer tensor)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, np.integer):
        value = int(value)
    if type(value) is not int or value < 0:
        raise CorruptCheckpointError(f"{source} is {value!r:.80}, not a non-negative int")
    return value


def plain_json(value: Any, where: str = "") -> Any:
    """``value`` as plain JSON values (tuples become lists).

    Raises TypeError (a value of another type) or ValueError (a non-finite float) saying which value and where.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where or 'it'} is {value}, which JSON cannot hold")
        return value
    if isinstance(value, (list, tuple)):
        return [plain_json(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where or 'it'} has the key {key!r:.40}, not a str")
            out[key] = plain_json(item, f"{where}.{key}" if where else key)
        return out
    raise TypeError(f"{where or 'it'} is a {type(value).__name__}")


def not_weights(value: Any) -> str | None:
    """Why ``value`` is not a model state dict (str -> tensor), or None when it is one."""
    if not isinstance(value, Mapping):
        return f"a {type(value).__name__}, not a dict"
    for key, item in value.items():
        if not isinstance(key, str):
            return f"keyed by a {type(key).__name__} ({key!r:.60})"
        if not isinstance(item, torch.Tensor) and not key.endswith(EXTRA_STATE):
            return f"{key!r} holds a {type(item).__name__}, not a tensor"
    return None


def is_weights(value: Any) -> bool:
    return not_weights(value) is None
