"""Which checkpoints to keep, which to delete, and why: pure functions over records.

A step saved more than once has one *current* save, its newest; the older saves
are *superseded*. Policies judge current saves only, so a re-saved step counts once.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from savegame.errors import ConfigurationError
from savegame.policies._common import (
    CheckpointRecord,
    Policy,
    check_count,
    check_mode,
    finite,
    named,
    recency,
)


def keep_last(n: int) -> Policy:
    """Keep exactly the ``min(n, len(records))`` newest records."""
    n = check_count(n, "keep_last(n)")

    def policy(records: Sequence[CheckpointRecord]) -> set[str]:
        return {r.name for r in sorted(records, key=recency)[-n:]}

    return named(policy, f"keep_last({n})")


def keep_every(n: int) -> Policy:
    """Keep every record whose step is a multiple of ``n`` (step 0 included), forever."""
    n = check_count(n, "keep_every(n)")

    def policy(records: Sequence[CheckpointRecord]) -> set[str]:
        return {r.name for r in records if r.step % n == 0}

    return named(policy, f"keep_every({n})")


def rank_best(records: Iterable[CheckpointRecord], metric: str, mode: str) -> list[CheckpointRecord]:
    """The records with a finite ``metric``, best first; equal values: the earlier step, then the older save.

    The one ranking of "best" in savegame: retention, aliases, ``restore("best")`` and
    the best state stored in each checkpoint all use it.
    """
    sign = 1.0 if check_mode(mode) == "min" else -1.0
    # (rank_key, recency, position): the position breaks full ties without comparing records
    scored = [(sign * v, r.step, recency(r), i, r) for i, r in enumerate(records)
              if (v := finite(r.metrics.get(metric))) is not None]
    scored.sort(key=_without_record)
    return [s[-1] for s in scored]


def _without_record(scored: tuple[float, int, tuple[int, bool, int, float, str], int, CheckpointRecord]) -> tuple[
        float, int, tuple[int, bool, int, float, str], int]:
    return scored[:4]


def keep_best(metric: str, mode: str, k: int = 1) -> Policy:
    """Keep the ``k`` records with the best finite ``metric`` (see :func:`rank_best`).

    Records without the metric, or with NaN/inf, are never kept by this policy.
    """
    mode, k = check_mode(mode), check_count(k, "keep_best(k)")

    def policy(records: Sequence[CheckpointRecord]) -> set[str]:
        return {r.name for r in rank_best(records, metric, mode)[:k]}

    return named(policy, f"keep_best({metric!r}, {mode!r}, {k})")


def keep_pinned() -> Policy:
    """Keep every record saved with ``pin=True``."""

    def policy(records: Sequence[CheckpointRecord]) -> set[str]:
        return {r.name for r in records if r.pinned}

    return named(policy, "keep_pinned()")


def latest_saves(records: Iterable[CheckpointRecord]) -> list[CheckpointRecord]:
    """The current save of each step (its newest), oldest step first."""
    newest: dict[int, CheckpointRecord] = {}
    for record in records:
        held = newest.get(record.step)
        if held is None or recency(record) > recency(held):
            newest[record.step] = record
    return sorted(newest.values(), key=recency)


def superseded(records: Iterable[CheckpointRecord]) -> dict[str, str]:
    """Older saves of a step saved again, pinned ones exempt: ``{old name: the newer save's name}``."""
    rows = list(records)
    return _superseded(rows, latest_saves(rows))


def _superseded(rows: Sequence[CheckpointRecord], current: Sequence[CheckpointRecord]) -> dict[str, str]:
    names = {r.step: r.name for r in current}
    return {r.name: names[r.step] for r in rows if r.name != names[r.step] and not r.pinned}


def ahead_of(records: Iterable[CheckpointRecord], resumed: CheckpointRecord) -> list[str]:
    """Saves made after ``resumed`` on the line it started: a higher step, or the same step saved later.

    A run that resumed from ``resumed`` and saves again has abandoned them. Oldest first.
    """
    ahead = [r for r in records if r.name != resumed.name
             and (r.step > resumed.step or (r.step == resumed.step and recency(r) > recency(resumed)))]
    return [r.name for r in sorted(ahead, key=recency)]


def select_keep(records: Iterable[CheckpointRecord], policies: Iterable[Policy], *,
                protected: Collection[str] = ()) -> set[str]:
    """Names of the records to keep: those any policy keeps, the protected ones and the newest.

    Guarantees: the newest record and every protected record present are kept; nothing
    else is kept unless a policy asked for it; without policies everything is kept. The
    answer is a subset of the records' names and does not depend on their order.
    """
    _check_protected(protected)
    rows, chosen = list(records), list(policies)
    names = {r.name for r in rows}
    if not chosen or not rows:
        return names
    keep = set(protected)
    for policy in chosen:
        keep |= policy(rows)
    keep.add(max(rows, key=recency).name)
    return keep & names


def to_delete(records: Iterable[CheckpointRecord], policies: Iterable[Policy], *,
              protected: Collection[str] = ()) -> list[str]:
    """The complement of :func:`select_keep`, oldest first (the order to delete them in)."""
    rows = sorted(records, key=recency)
    keep = select_keep(rows, policies, protected=protected)
    return [r.name for r in rows if r.name not in keep]


@dataclass(frozen=True)
class RetentionPlan:
    """A retention decision with its reasons.

    ``keep`` maps each kept name to why it stays (never empty); ``delete`` maps each name
    to delete to why it goes, in the order to delete them (oldest first).
    """

    keep: Mapping[str, tuple[str, ...]]
    delete: Mapping[str, str]


def plan_retention(records: Iterable[CheckpointRecord], policies: Iterable[Policy], *,
                   protected: Collection[str] = ()) -> RetentionPlan:
    """What the Checkpointer keeps after a save, and why.

    - Always kept: the newest record, the protected ones, the pinned ones.
    - A superseded save (an older save of a step saved again) is deleted unless pinned or
      protected: a re-save replaces the step. While such an earlier save stays, so does
      the step's newest save (it never falls back to the earlier one).
    - The policies judge the current saves; a current save stays if any policy keeps it.
      Without policies every current save stays.
    The answer does not depend on the order of ``records``.
    """
    _check_protected(protected)
    rows, chosen = sorted(records, key=recency), list(policies)
    current = latest_saves(rows)
    replaced = _superseded(rows, current)
    why: dict[str, list[str]] = {r.name: [] for r in rows}
    if rows:
        why[rows[-1].name].append("newest")
    for r in rows:
        if r.name in protected:
            why[r.name].append("protected")
        if r.pinned:
            why[r.name].append("pinned")
    for policy in chosen:
        for name in sorted(policy(current)):
            why[name].append(policy.__name__)
    if not chosen:
        for r in current:
            why[r.name].append("no retention policy")
    # While an earlier save of a step stays (pinned, protected), the step's newest save stays too:
    # otherwise deleting it would silently make the earlier save that step's save again.
    current_names = {c.name for c in current}
    older_kept = {r.step: r.name for r in rows if why[r.name] and r.name not in current_names}
    for r in current:
        if r.step in older_kept and not why[r.name]:
            why[r.name].append(f"newest save of step {r.step}, whose earlier save {older_kept[r.step]} stays")
    labels = ", ".join(p.__name__ for p in chosen)
    delete = {r.name: (f"superseded by {replaced[r.name]}" if r.name in replaced else f"kept by none of {labels}")
              for r in rows if not why[r.name]}
    return RetentionPlan({n: tuple(w) for n, w in why.items() if w}, delete)


def _check_protected(protected: Collection[str]) -> None:
    if isinstance(protected, str):
        raise ConfigurationError(f"protected must be a collection of names, not the string {protected!r}")

