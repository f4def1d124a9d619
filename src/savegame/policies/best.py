"""Best-k tracking: which evaluations are the best so far, per metric."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from typing import Any

from savegame.errors import IncompatibleStateError
from savegame.policies._common import (
    CheckpointRecord,
    check_count,
    check_min_delta,
    check_mode,
    finite,
    rank_key,
)
from savegame.policies.retention import latest_saves, rank_best


def is_better(value: float | None, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """True when ``value`` beats ``best`` by more than ``min_delta`` in direction ``mode``.

    A None, NaN or infinite value is never better; any finite value beats a best of None or NaN.
    """
    mode, min_delta = check_mode(mode), check_min_delta(min_delta)
    v = finite(value)
    if v is None:
        return False
    if best is None or math.isnan(best):
        return True
    return v < best - min_delta if mode == "min" else v > best + min_delta


def _held_entries(state: Mapping[str, Any], metric: str, mode: str) -> list[tuple[float, int]]:
    """The entries held for ``metric``, best first; none when they were ranked under another mode."""
    held = state.get(metric)
    if held is None:
        return []
    try:
        if held["mode"] != mode:
            return []  # a ranking under the old mode says nothing under the new one
        entries = [(float(v), int(s)) for v, s in held["entries"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise IncompatibleStateError(
            f"best-tracking state for {metric!r} is malformed: {held!r}; expected "
            "{'mode': 'min'|'max', 'entries': [[value, step], ...]}") from exc
    return sorted(entries, key=lambda e: rank_key(e[0], e[1], mode))


def update_best(state: Mapping[str, Any], metrics: Mapping[str, float | None], step: int,
                modes: Mapping[str, str], k: int = 1) -> tuple[dict[str, Any], dict[str, bool]]:
    """Fold one evaluation into the best-k state; return the new state and, per metric of ``modes``, whether it improved.

    A metric improves only when its value is finite and strictly better than the k-th entry
    (or fewer than k entries are held). ``state`` is never mutated; metrics it holds that
    ``modes`` does not name are carried over unchanged. An entry of the same ``step`` is
    replaced (a step saved again supersedes its old checkpoint). Entries ranked under a
    different mode than ``modes`` asks for are dropped.
    """
    k = check_count(k, "best_k")
    new: dict[str, Any] = {m: copy.deepcopy(held) for m, held in state.items() if m not in modes}
    improved: dict[str, bool] = {}
    for metric, mode in modes.items():
        mode = check_mode(mode, f"mode of {metric!r}")
        entries = [e for e in _held_entries(state, metric, mode) if e[1] != step][:k]
        value = finite(metrics.get(metric))
        better = value is not None and (len(entries) < k or is_better(value, entries[-1][0], mode))
        if better and value is not None:
            entries = sorted([*entries, (value, step)], key=lambda e: rank_key(e[0], e[1], mode))[:k]
        new[metric] = {"mode": mode, "entries": [[v, s] for v, s in entries]}
        improved[metric] = better
    return new, improved


def best_from_records(records: Iterable[CheckpointRecord], modes: Mapping[str, str], k: int = 1) -> dict[str, Any]:
    """The best-k state of a run: per metric, the ``k`` best current saves by :func:`rank_best`.

    This is the state stored in every checkpoint, so what a checkpoint says is the best
    and what the run directory ranks as the best are the same by construction.
    """
    k = check_count(k, "best_k")
    current = latest_saves(records)
    out: dict[str, Any] = {}
    for metric, mode in modes.items():
        ranked = rank_best(current, metric, check_mode(mode, f"mode of {metric!r}"))[:k]
        out[metric] = {"mode": mode, "entries": [[float(r.metrics[metric]), r.step] for r in ranked]}
    return out
