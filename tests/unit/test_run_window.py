"""A save decided over its scope (the window the last save left) decides exactly as over every record."""

from __future__ import annotations

import math

from hypothesis import example, given, settings
from hypothesis import strategies as st

from savegame import policies
from savegame.policies import CheckpointRecord

MODES = {"loss": "min", "acc": "max"}


def retention(keep_last, keep_every, best_k):
    chosen = [policies.keep_last(keep_last)] if keep_last else []
    chosen += [policies.keep_every(keep_every)] if keep_every else []
    if chosen:
        chosen += [policies.keep_best(m, mode, best_k) for m, mode in MODES.items()]
    return chosen


def lookups(store: dict[str, CheckpointRecord]):
    """``saves_of`` and ``records_of`` over ``store``, as the run directory answers them."""
    return (lambda step: [r for r in store.values() if r.step == step],
            lambda names: [store[n] for n in names if n in store])


saves = st.lists(st.tuples(st.sampled_from([1, 1, 1, 1, 1, 1, 2, 0, -2]),
                           st.sampled_from([0.1, 0.2, 0.3, 0.5, 0.9, math.nan]),
                           st.sampled_from([0.1, 0.4, 0.8, math.inf]),
                           st.sampled_from([False, False, False, True])), min_size=1, max_size=40)


@settings(max_examples=400, deadline=None)
@given(saves, st.none() | st.integers(1, 4), st.none() | st.integers(1, 5), st.integers(1, 3),
       st.none() | st.integers(0, 5))
@example([(1, 0.5, 0.4, False)] * 7, 3, 2, 1, None)  # keep_last and keep_every keep the same newest ones
@example([(1, 0.5, 0.4, False)] * 4 + [(0, 0.9, 0.1, False)] + [(1, 0.2, 0.4, False)] * 2, 2, None, 1, None)
def test_the_scope_of_a_save_decides_as_every_record(plan, keep_last, keep_every, best_k, resumed_at):
    chosen = retention(keep_last, keep_every, best_k)
    store: dict[str, CheckpointRecord] = {}
    window, step, scoped = None, 0, 0
    resumed = None
    for seq, (delta, loss, acc, pinned) in enumerate(plan):
        step = max(0, step + delta)
        new = CheckpointRecord(step, f"c{seq}", time=float(seq % 3), seq=seq, pinned=pinned,
                               metrics={"loss": loss, "acc": acc})
        if resumed is None and resumed_at is not None and seq == resumed_at and store:
            resumed = max(store.values(), key=lambda r: (r.step, r.seq)).name  # as after a restore
            window = None
        protected = [resumed] if resumed in store else []
        every = [*store.values(), new]

        scope = policies.scope(window, new, *lookups(store), protected=protected) if window else None
        full = policies.plan_retention(every, chosen, protected={new.name, *protected})
        if scope is not None:
            scoped += 1
            assert new in scope and len({r.name for r in scope}) == len(scope)
            assert policies.best_from_records(scope, MODES, best_k) == policies.best_from_records(every, MODES, best_k)
            assert policies.alias_targets(scope, MODES) == policies.alias_targets(every, MODES)
            part = policies.plan_retention(scope, chosen, protected={new.name, *protected})
            assert dict(part.delete) == dict(full.delete)
            assert {n: w for n, w in full.keep.items() if n in part.keep} == dict(part.keep)
        used = scope if scope is not None else every
        done = policies.plan_retention(used, chosen, protected={new.name, *protected})
        store = {r.name: r for r in every if r.name not in done.delete}
        window = policies.next_window(used, done, modes=MODES, best_k=best_k, keep_last=keep_last)


def test_a_long_run_without_retention_decides_each_save_over_a_few_records():
    store: dict[str, CheckpointRecord] = {}
    window, sizes = None, []
    for seq in range(300):
        new = CheckpointRecord(seq, f"c{seq}", time=0.0, seq=seq, metrics={"loss": (seq * 37 % 101) / 101},
                               pinned=seq % 50 == 0)
        every = [*store.values(), new]
        scope = policies.scope(window, new, *lookups(store)) if window else None
        used = scope if scope is not None else every
        sizes.append(len(used))
        done = policies.plan_retention(used, [], protected={new.name})
        store = {r.name: r for r in every if r.name not in done.delete}
        window = policies.next_window(used, done, modes={"loss": "min"}, best_k=2, keep_last=None)
    assert len(store) == 300 and max(sizes[1:]) <= 5, sizes
