"""The few records a save's decisions depend on, so that a save in a long run costs what one in a short run does.

After a save, a checkpoint that retention kept for a reason that cannot lapse (pinned, a
multiple of ``keep_every``, no retention policy at all) stays kept until a later save of
its step supersedes it. The decisions of the next save (its best state, the aliases,
what retention deletes) therefore depend only on its *scope*: the new record, the newest
current saves (``keep_last`` and ``latest``), the best ``k`` per metric, the records kept
for reasons that can lapse, and every save of the steps of those. :func:`scope` returns
them; the policies give the same answers over the scope as over every record (tested
with hypothesis), and :func:`next_window` carries the window to the next save.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass

from savegame.policies._common import CheckpointRecord, recency
from savegame.policies.retention import RetentionPlan, latest_saves, rank_best

PERMANENT = "pinned"
"""Reasons a kept record stays kept while it is its step's current save: pinned, ``keep_every(n)`` and
"no retention policy" (see :func:`plan_retention`)."""


@dataclass(frozen=True)
class Window:
    """What the last save left: the newest current saves, the best per metric, and the records kept for
    reasons that can lapse (by name)."""

    recent: tuple[CheckpointRecord, ...]
    top: Mapping[str, tuple[CheckpointRecord, ...]]
    unsettled: frozenset[str]


def is_permanent(reason: str) -> bool:
    return reason == PERMANENT or reason.startswith("keep_every(") or reason == "no retention policy"


def next_window(records: Iterable[CheckpointRecord], plan: RetentionPlan, *, modes: Mapping[str, str],
                best_k: int, keep_last: int | None) -> Window:
    """The window after ``plan`` was carried out over ``records`` (its scope, or every record)."""
    rows = [r for r in records if r.name not in plan.delete]
    current = latest_saves(rows)
    recent = tuple(current[-max(keep_last or 0, 1):])
    top = {metric: tuple(rank_best(current, metric, mode)[:best_k]) for metric, mode in modes.items()}
    unsettled = frozenset(name for name, why in plan.keep.items() if not any(map(is_permanent, why)))
    return Window(recent, top, unsettled)


def scope(window: Window, new: CheckpointRecord, saves_of: Callable[[int], Collection[CheckpointRecord]],
          records_of: Callable[[Iterable[str]], list[CheckpointRecord]], *,
          protected: Collection[str] = ()) -> list[CheckpointRecord] | None:
    """The records the save of ``new`` is decided over, ``new`` included; None when every record is needed.

    ``saves_of(step)`` gives the committed saves of a step, ``records_of(names)`` the records of
    those names still present. Every record is needed when ``new`` is not the newest save, or
    replaces a save that is among the best (the next best is not in the window).
    """
    if window.recent and recency(new) <= recency(window.recent[-1]):
        return None
    same_step = saves_of(new.step)
    if any(r.step == new.step for held in window.top.values() for r in held) and same_step:
        return None
    names = {r.name for r in window.recent} | {r.name for held in window.top.values() for r in held}
    names |= window.unsettled | set(protected)
    chosen = {r.name: r for r in records_of(names)}
    for step in {r.step for r in chosen.values()} | {new.step}:
        chosen.update((r.name, r) for r in saves_of(step))
    chosen[new.name] = new
    return list(chosen.values())
