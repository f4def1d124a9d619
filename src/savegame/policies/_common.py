"""What every policy shares: the checkpoint record, argument checks and the orderings."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from savegame.errors import ConfigurationError

MODES = ("min", "max")


@dataclass(frozen=True)
class CheckpointRecord:
    """What the policies know about one committed checkpoint; ``name`` identifies it.

    ``seq`` is the save's place in its run directory (increasing with every commit), or
    None for a checkpoint written before savegame recorded it.
    """

    step: int
    name: str
    time: float
    epoch: int | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    pinned: bool = False
    seq: int | None = None


Policy = Callable[[Sequence[CheckpointRecord]], set[str]]
"""A retention policy: the records of a run -> the names it wants kept."""
RetentionPolicy = Policy


def check_mode(mode: object, arg: str = "mode") -> str:
    if not isinstance(mode, str) or mode not in MODES:
        raise ConfigurationError(f"{arg} must be 'min' or 'max', got {mode!r}")
    return mode


def check_count(value: object, arg: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{arg} must be a positive int, got {value!r}")
    return value


def check_min_delta(value: object) -> float:
    if not isinstance(value, numbers.Real) or not 0 <= float(value) < math.inf:
        raise ConfigurationError(f"min_delta must be a finite number >= 0, got {value!r}")
    return float(value)


def finite(value: object) -> float | None:
    """The value as a float when it is a finite real number, else None (never ranks)."""
    if type(value) is float:  # the common case, without the slower check against numbers.Real
        return value if math.isfinite(value) else None
    if isinstance(value, numbers.Real):
        try:
            result = float(value)
        except OverflowError:  # an int too large for a float never ranks
            return None
        return result if math.isfinite(result) else None
    return None


def recency(record: CheckpointRecord) -> tuple[int, bool, int, float, str]:
    """Sort key of "newest": the step, then the commit sequence, then the save time, then the name.

    The sequence orders the saves of one step even when the wall clock stepped back between
    them; a save without one (written before it existed) is older than any save with one.
    """
    seq = record.seq
    return (record.step, seq is not None, seq or 0, record.time, record.name)


def rank_key(value: float, step: int, mode: str) -> tuple[float, int]:
    """Sort key: best first, and the earlier step first among equal values."""
    return (value if mode == "min" else -value, step)


def named(policy: Policy, label: str) -> Policy:
    policy.__name__ = policy.__qualname__ = label
    return policy
