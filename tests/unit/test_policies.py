"""Pure decisions: retention, best-k tracking, early stopping (property tests with hypothesis)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from savegame.errors import ConfigurationError, IncompatibleStateError
from savegame.policies import (
    CheckpointRecord,
    EarlyStopping,
    EarlyStoppingConfig,
    ahead_of,
    best_from_records,
    early_stopping_step,
    initial_early_stopping_state,
    is_better,
    keep_best,
    keep_every,
    keep_last,
    keep_pinned,
    latest_saves,
    parse_best_spec,
    plan_retention,
    rank_best,
    select_keep,
    superseded,
    to_delete,
    update_best,
)

FAST = settings(deadline=None, max_examples=150)

# --- strategies -------------------------------------------------------------------------

metric_values = st.one_of(
    st.floats(-10, 10, allow_nan=False),
    st.sampled_from([0.0, 1.0, 0.5]),  # frequent ties
    st.sampled_from([math.nan, math.inf, -math.inf]),
)


@st.composite
def record_lists(draw: st.DrawFn) -> list[CheckpointRecord]:
    rows = draw(st.lists(st.tuples(
        st.integers(0, 40),                             # steps repeat: ties on step
        st.sampled_from([0.0, 1.0, 2.0, 3.5]),          # times repeat: ties on time
        st.dictionaries(st.sampled_from(["loss", "acc"]), metric_values, max_size=2),
        st.booleans(),
    ), max_size=25))
    return [CheckpointRecord(step=s, name=f"ckpt-{i:03d}", time=t, metrics=m, pinned=p)
            for i, (s, t, m, p) in enumerate(rows)]


modes = st.sampled_from(["min", "max"])
policy_lists = st.lists(st.one_of(
    st.builds(keep_last, st.integers(1, 6)),
    st.builds(keep_every, st.integers(1, 10)),
    st.builds(keep_best, st.sampled_from(["loss", "acc"]), modes, st.integers(1, 3)),
    st.builds(keep_pinned),
), max_size=4)


def newest(records: list[CheckpointRecord]) -> CheckpointRecord:
    return max(records, key=lambda r: (r.step, r.time, r.name))


def rank(value: float, step: int, mode: str) -> tuple[float, int]:
    return (value if mode == "min" else -value, step)


def finite(value: object) -> bool:
    return isinstance(value, float) and math.isfinite(value)


# --- CheckpointRecord ---------------------------------------------------------------------

def test_record_is_frozen_and_defaults_are_not_shared() -> None:
    a, b = CheckpointRecord(1, "a", 0.0), CheckpointRecord(2, "b", 0.0)
    assert a.metrics == {} and a.metrics is not b.metrics and a.epoch is None and not a.pinned
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.step = 3  # type: ignore[misc]


# --- retention: properties -------------------------------------------------------------------

@FAST
@given(record_lists(), policy_lists, st.data())
def test_select_keep_is_exactly_policies_plus_protected_plus_newest(records, policies, data) -> None:
    names = [r.name for r in records]
    protected = data.draw(st.sets(st.sampled_from(names))) if names else set()
    kept = select_keep(records, policies, protected=protected)
    deleted = to_delete(records, policies, protected=protected)
    assert kept.isdisjoint(deleted) and kept | set(deleted) == set(names)
    if not records:
        return
    assert newest(records).name in kept
    assert protected <= kept
    if policies:
        wanted = set().union(*(p(records) for p in policies)) | protected | {newest(records).name}
        assert kept == wanted
    else:
        assert kept == set(names)


@FAST
@given(record_lists(), policy_lists, st.randoms(use_true_random=False))
def test_retention_does_not_depend_on_input_order(records, policies, rnd) -> None:
    shuffled = list(records)
    rnd.shuffle(shuffled)
    protected = {r.name for r in records[:2]}
    assert select_keep(shuffled, policies, protected=protected) == select_keep(records, policies, protected=protected)
    assert to_delete(shuffled, policies, protected=protected) == to_delete(records, policies, protected=protected)


@FAST
@given(record_lists(), policy_lists)
def test_to_delete_is_oldest_first(records, policies) -> None:
    by_name = {r.name: r for r in records}
    keys = [(by_name[n].step, by_name[n].time, n) for n in to_delete(records, policies)]
    assert keys == sorted(keys)


@FAST
@given(record_lists(), st.integers(1, 8))
def test_keep_last_keeps_exactly_the_n_newest(records, n) -> None:
    kept = keep_last(n)(records)
    assert len(kept) == min(n, len(records))
    key = lambda r: (r.step, r.time, r.name)
    assert all(key(a) > key(b) for a in records if a.name in kept for b in records if b.name not in kept)


@FAST
@given(record_lists(), st.integers(1, 10), policy_lists)
def test_keep_every_keeps_all_multiples_and_they_are_never_deleted(records, n, others) -> None:
    multiples = {r.name for r in records if r.step % n == 0}
    assert keep_every(n)(records) == multiples
    assert multiples.isdisjoint(to_delete(records, [keep_every(n), *others]))


@FAST
@given(record_lists(), st.sampled_from(["loss", "acc"]), modes, st.integers(1, 4))
def test_keep_best_keeps_the_k_best_finite_earlier_step_on_ties(records, metric, mode, k) -> None:
    kept = keep_best(metric, mode, k)(records)
    candidates = [r for r in records if finite(r.metrics.get(metric))]
    assert len(kept) == min(k, len(candidates))
    assert kept <= {r.name for r in candidates}  # NaN/inf/missing never kept
    inside = [r for r in candidates if r.name in kept]
    outside = [r for r in candidates if r.name not in kept]
    assert all(rank(a.metrics[metric], a.step, mode) <= rank(b.metrics[metric], b.step, mode)
               for a in inside for b in outside)


@FAST
@given(record_lists())
def test_keep_pinned_keeps_pinned(records) -> None:
    assert keep_pinned()(records) == {r.name for r in records if r.pinned}


# --- retention: examples ---------------------------------------------------------------------

def steps(*pairs: tuple[int, dict[str, float]]) -> list[CheckpointRecord]:
    return [CheckpointRecord(step=s, name=f"s{s}", time=float(s), metrics=m) for s, m in pairs]


def test_keep_last_and_keep_every_compose() -> None:
    records = steps(*[(s, {}) for s in range(1, 11)])
    assert to_delete(records, [keep_last(2), keep_every(4)]) == ["s1", "s2", "s3", "s5", "s6", "s7"]


def test_best_per_metric_survives_keep_last() -> None:
    records = steps((1, {"l": 0.5, "p": 0.1}), (2, {"l": 0.2, "p": 0.3}), (3, {"l": 0.4, "p": 0.9}),
                    (4, {"l": 0.6, "p": 0.2}), (5, {"l": 0.7, "p": 0.1}))
    policies = [keep_last(1), keep_best("l", "min"), keep_best("p", "max")]
    assert select_keep(records, policies) == {"s2", "s3", "s5"}


def test_ties_in_best_go_to_the_earlier_step_and_nan_never_wins() -> None:
    records = steps((1, {"l": math.nan}), (2, {"l": 0.3}), (3, {"l": 0.3}), (4, {"l": -math.inf}))
    assert keep_best("l", "min", 1)(records) == {"s2"}
    assert keep_best("l", "max", 5)(records) == {"s2", "s3"}


def test_newest_breaks_step_ties_by_time() -> None:
    records = [CheckpointRecord(5, "late", 2.0), CheckpointRecord(5, "early", 1.0), CheckpointRecord(4, "old", 9.0)]
    assert select_keep(records, [keep_pinned()]) == {"late"}
    assert to_delete(records, [keep_pinned()], protected={"early"}) == ["old"]


def test_without_policies_everything_is_kept() -> None:
    records = steps((1, {}), (2, {}))
    assert select_keep(records, []) == {"s1", "s2"} and to_delete(records, []) == []
    assert select_keep([], [keep_last(1)]) == set()


@pytest.mark.parametrize("make", [lambda: keep_last(0), lambda: keep_every(-1), lambda: keep_last(True),
                                  lambda: keep_best("l", "mean"), lambda: keep_best("l", "min", 0)])
def test_bad_policy_arguments_raise(make) -> None:
    with pytest.raises(ConfigurationError):
        make()


def test_protected_must_not_be_a_bare_string() -> None:
    with pytest.raises(ConfigurationError, match="protected"):
        select_keep(steps((1, {})), [keep_last(1)], protected="s1")


# --- best tracking ---------------------------------------------------------------------------

def test_is_better() -> None:
    assert is_better(0.1, 0.2, "min") and not is_better(0.2, 0.2, "min") and is_better(0.3, 0.2, "max")
    assert is_better(0.1, None, "min") and is_better(0.1, math.nan, "max")
    assert not any(is_better(v, 0.5, m) for v in (None, math.nan, math.inf, -math.inf) for m in ("min", "max"))
    assert not is_better(0.15, 0.2, "min", min_delta=0.1) and is_better(0.05, 0.2, "min", min_delta=0.1)
    assert not is_better(0.25, 0.2, "max", min_delta=0.1) and is_better(0.35, 0.2, "max", min_delta=0.1)
    with pytest.raises(ConfigurationError, match="mode"):
        is_better(0.1, 0.2, "down")
    with pytest.raises(ConfigurationError, match="min_delta"):
        is_better(0.1, 0.2, "min", min_delta=-1.0)


evaluations = st.lists(metric_values, max_size=30)


def brute_force_best(values: list[float], mode: str, k: int) -> list[list[float]]:
    scored = sorted(((v, s) for s, v in enumerate(values) if finite(v)), key=lambda e: rank(e[0], e[1], mode))
    return [[v, s] for v, s in scored[:k]]


@FAST
@given(evaluations, modes, st.integers(1, 4), st.integers(0, 30))
def test_update_best_keeps_the_k_best_and_improves_only_strictly(values, mode, k, resume_at) -> None:
    state: dict = {}
    for step, value in enumerate(values):
        if step == resume_at:
            state = json.loads(json.dumps(state))  # a resume in the middle changes nothing
        old, before = state, copy.deepcopy(state)
        entries = state.get("m", {"entries": []})["entries"]
        kth = entries[-1][0] if len(entries) >= k else None
        expected = finite(value) and (kth is None or (value < kth if mode == "min" else value > kth))
        state, improved = update_best(state, {"m": value}, step, {"m": mode}, k)
        assert old == before  # the state passed in is never mutated
        assert improved == {"m": expected}
        assert len(state["m"]["entries"]) <= k and state["m"]["mode"] == mode
    assert state.get("m", {"entries": []})["entries"] == brute_force_best(values, mode, k)


@FAST
@given(evaluations, modes, st.integers(1, 3))
def test_update_best_never_mutates_its_input(values, mode, k) -> None:
    state: dict = {"other": {"mode": "max", "entries": [[1.0, 0]]}}
    for step, value in enumerate(values):
        frozen = copy.deepcopy(state)
        new, _ = update_best(state, {"m": value}, step, {"m": mode}, k)
        assert state == frozen
        assert new["other"] == frozen["other"] and new["other"] is not state["other"]
        state = new


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, None])
def test_non_finite_or_missing_never_improves(value) -> None:
    state, improved = update_best({}, {"m": value}, 1, {"m": "min"})
    assert improved == {"m": False} and state["m"]["entries"] == []
    state, improved = update_best(state, {}, 2, {"m": "min"})
    assert improved == {"m": False}


def test_each_metric_is_tracked_independently() -> None:
    modes_ = parse_best_spec({"val_loss": "min", "pck": "max"})
    state, improved = update_best({}, {"val_loss": 0.5, "pck": 0.1}, 1, modes_)
    assert improved == {"val_loss": True, "pck": True}
    state, improved = update_best(state, {"val_loss": 0.4, "pck": 0.05}, 2, modes_)
    assert improved == {"val_loss": True, "pck": False}
    assert state == {"val_loss": {"mode": "min", "entries": [[0.4, 2]]},
                     "pck": {"mode": "max", "entries": [[0.1, 1]]}}


def test_a_step_saved_again_replaces_its_entry() -> None:
    state, _ = update_best({}, {"m": 0.1}, 5, {"m": "min"}, k=2)
    state, _ = update_best(state, {"m": 0.3}, 6, {"m": "min"}, k=2)
    state, improved = update_best(state, {"m": 0.5}, 5, {"m": "min"}, k=2)
    assert improved == {"m": True} and state["m"]["entries"] == [[0.3, 6], [0.5, 5]]


def test_a_changed_mode_restarts_tracking_and_bad_state_is_reported() -> None:
    state = {"m": {"mode": "max", "entries": [[0.9, 3]]}}
    new, improved = update_best(state, {"m": 0.5}, 4, {"m": "min"})
    assert improved == {"m": True} and new["m"] == {"mode": "min", "entries": [[0.5, 4]]}
    with pytest.raises(IncompatibleStateError, match="'m'"):
        update_best({"m": {"mode": "min"}}, {"m": 0.5}, 4, {"m": "min"})
    with pytest.raises(ConfigurationError):
        update_best({}, {"m": 0.5}, 4, {"m": "min"}, k=0)


def test_seed_001_best_survives_resume() -> None:
    """Seed 001: best val_loss 0.0987 at epoch 67, resumed at 100; 0.15 at 101 is no new best, 0.05 at 102 is."""
    modes_ = {"val_loss": "min"}
    state: dict = {}
    es = EarlyStopping("val_loss", mode="min", patience=40)
    for epoch in range(1, 101):
        loss = 0.0987 if epoch == 67 else 0.2 + epoch / 1000
        state, _ = update_best(state, {"val_loss": loss}, epoch, modes_)
        es.update(loss, epoch)
    state = json.loads(json.dumps(state))  # the checkpoint at epoch 100
    resumed = EarlyStopping("val_loss", mode="min", patience=40)
    resumed.load_state_dict(json.loads(json.dumps(es.state_dict())))
    assert state["val_loss"]["entries"] == [[0.0987, 67]] and resumed.state_dict()["bad_epochs"] == 33

    state, improved = update_best(state, {"val_loss": 0.15}, 101, modes_)
    assert improved == {"val_loss": False} and state["val_loss"]["entries"] == [[0.0987, 67]]
    assert not resumed.update(0.15, 101) and resumed.state_dict()["bad_epochs"] == 34

    state, improved = update_best(state, {"val_loss": 0.05}, 102, modes_)
    assert improved == {"val_loss": True} and state["val_loss"]["entries"] == [[0.05, 102]]
    assert not resumed.update(0.05, 102) and resumed.state_dict()["bad_epochs"] == 0


# --- early stopping --------------------------------------------------------------------------

def oracle(values: list[float], mode: str, patience: int, min_delta: float) -> list[bool]:
    """An independent, obvious implementation without smoothing: stop after `patience` misses in a row."""
    best, misses, out = None, 0, []
    for v in values:
        ok = math.isfinite(v) and (best is None or (v < best - min_delta if mode == "min" else v > best + min_delta))
        best, misses = (v, 0) if ok else (best, misses + 1)
        out.append(misses >= patience)
    return out


es_values = st.lists(st.one_of(st.floats(-5, 5, allow_nan=False), st.sampled_from([1.0, 2.0, math.nan, math.inf])),
                     max_size=40)


@FAST
@given(es_values, modes, st.integers(1, 6), st.sampled_from([0.0, 0.1, 1.0]))
def test_early_stopping_matches_the_obvious_rule(values, mode, patience, min_delta) -> None:
    es = EarlyStopping("m", mode=mode, patience=patience, min_delta=min_delta)
    decisions = [es.update(v, step) for step, v in enumerate(values)]
    assert decisions == oracle(values, mode, patience, min_delta)
    if True in decisions:  # never before `patience` updates, all of them non-improving
        first_stop = decisions.index(True)
        assert first_stop + 1 >= patience
        assert all(d is False for d in oracle(values[:first_stop], mode, patience, min_delta))


@FAST
@given(es_values, modes, st.integers(1, 6), st.sampled_from([0.0, 0.1]), st.sampled_from([None, 0.0, 0.5, 0.9]))
def test_early_stopping_counter_and_improvement_reset(values, mode, patience, min_delta, smoothing) -> None:
    config = EarlyStoppingConfig("m", mode, patience, min_delta, smoothing)
    state = initial_early_stopping_state()
    for step, value in enumerate(values):
        new = early_stopping_step(state, value, step, config)
        improved = new["bad_epochs"] == 0
        assert improved == (math.isfinite(value) and is_better(new["smoothed"], state["best"], mode, min_delta))
        assert new["bad_epochs"] == (0 if improved else state["bad_epochs"] + 1)
        assert new["stopped"] == (new["bad_epochs"] >= patience)
        assert (new["best"], new["best_step"]) == ((new["smoothed"], step) if improved else (state["best"], state["best_step"]))
        state = new


@FAST
@given(es_values, st.integers(0, 40), modes, st.integers(1, 6), st.sampled_from([None, 0.5, 0.9]))
def test_resuming_early_stopping_decides_exactly_like_never_stopping(values, cut, mode, patience, smoothing) -> None:
    straight = EarlyStopping("m", mode=mode, patience=patience, smoothing=smoothing)
    expected = [straight.update(v, s) for s, v in enumerate(values)]

    first = EarlyStopping("m", mode=mode, patience=patience, smoothing=smoothing)
    got = [first.update(v, s) for s, v in enumerate(values[:cut])]
    second = EarlyStopping("m", mode=mode, patience=patience, smoothing=smoothing)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    got += [second.update(v, s) for s, v in enumerate(values[cut:], start=len(values[:cut]))]
    assert got == expected
    assert second.state_dict() == straight.state_dict()


def test_smoothing_is_an_exponential_moving_average() -> None:
    es = EarlyStopping("m", mode="min", patience=2, smoothing=0.5)
    es.update(4.0, 1)
    es.update(2.0, 2)
    assert es.state_dict()["smoothed"] == 3.0 and es.state_dict()["best"] == 3.0
    es.update(math.nan, 3)  # a NaN neither improves nor poisons the average
    assert es.state_dict()["smoothed"] == 3.0 and es.state_dict()["bad_epochs"] == 1


def test_stops_after_patience_then_a_fresh_improvement_clears_it() -> None:
    es = EarlyStopping("acc", mode="max", patience=2)
    assert [es.update(v, s) for s, v in enumerate([0.5, 0.6, 0.6, 0.55])] == [False, False, False, True]
    assert es.should_stop
    assert not es.update(0.7, 5) and not es.should_stop


@pytest.mark.parametrize("kwargs, arg", [
    ({"patience": 0}, "patience"), ({"patience": 1.5}, "patience"), ({"patience": True}, "patience"),
    ({"patience": 3, "min_delta": -0.1}, "min_delta"), ({"patience": 3, "min_delta": math.nan}, "min_delta"),
    ({"patience": 3, "smoothing": 1.0}, "smoothing"), ({"patience": 3, "smoothing": -0.1}, "smoothing"),
    ({"patience": 3, "mode": "maximize"}, "mode"),
])
def test_early_stopping_validates_at_construction(kwargs, arg) -> None:
    with pytest.raises(ConfigurationError, match=arg):
        EarlyStopping("m", **kwargs)
    with pytest.raises(ConfigurationError, match="metric"):
        EarlyStopping("", patience=3)


def test_load_state_dict_checks_metric_and_mode_and_takes_new_patience() -> None:
    es = EarlyStopping("loss", mode="min", patience=5, min_delta=0.1)
    for s, v in enumerate([1.0, 2.0, 2.0, 2.0]):
        es.update(v, s)
    saved = json.loads(json.dumps(es.state_dict()))
    assert saved["config"] == {"metric": "loss", "mode": "min", "patience": 5, "min_delta": 0.1, "smoothing": None}
    with pytest.raises(IncompatibleStateError, match="metric"):
        EarlyStopping("acc", mode="min", patience=5).load_state_dict(saved)
    with pytest.raises(IncompatibleStateError, match="mode"):
        EarlyStopping("loss", mode="max", patience=5).load_state_dict(saved)
    shorter = EarlyStopping("loss", mode="min", patience=3)
    shorter.load_state_dict(saved)
    assert shorter.should_stop and shorter.patience == 3 and shorter.min_delta == 0.0
    longer = EarlyStopping("loss", mode="min", patience=10)
    longer.load_state_dict(saved)
    assert not longer.should_stop and longer.state_dict()["bad_epochs"] == 3


def test_state_dict_is_a_copy_and_bad_states_are_refused() -> None:
    es = EarlyStopping("loss", patience=2)
    es.update(1.0, 1)
    sd = es.state_dict()
    sd["bad_epochs"] = 99
    assert es.state_dict()["bad_epochs"] == 0
    for bad in [{}, {"config": {"metric": "loss", "mode": "min"}},
                {**es.state_dict(), "bad_epochs": "x"}, {**es.state_dict(), "best": "0.1"}]:
        with pytest.raises(IncompatibleStateError):
            es.load_state_dict(bad)
    with pytest.raises(ConfigurationError, match="value"):
        es.update("0.5", 2)  # type: ignore[arg-type]


# --- parse_best_spec -------------------------------------------------------------------------

@pytest.mark.parametrize("spec, expected", [
    (None, {}),
    ({"val_loss": "min", "pck": "max"}, {"val_loss": "min", "pck": "max"}),
    ("val_loss", {"val_loss": "min"}),
    ("pck:max", {"pck": "max"}),
    (["val_loss", "pck:max", "val_loss:min"], {"val_loss": "min", "pck": "max"}),
    ((), {}),
])
def test_parse_best_spec(spec, expected) -> None:
    parsed = parse_best_spec(spec)
    assert parsed == expected and list(parsed) == list(expected)


@pytest.mark.parametrize("spec", [{"m": "mean"}, {"": "min"}, {1: "min"}, "pck:", ":max", "pck:best",
                                  ["a", 3], {"a"}, 5, ["a:min", "a:max"]])
def test_parse_best_spec_rejects(spec) -> None:
    with pytest.raises(ConfigurationError):
        parse_best_spec(spec)


# --- superseded saves, the retention plan, the one best ranking, lineage ----------------------

@FAST
@given(record_lists())
def test_superseded_are_the_older_unpinned_saves_of_a_step(records) -> None:
    replaced = superseded(records)
    current = {r.step: r for r in latest_saves(records)}
    for r in records:
        newer = any(o.step == r.step and (o.time, o.name) > (r.time, r.name) for o in records)
        assert (r.name in replaced) == (newer and not r.pinned)  # pinned saves are exempt
        if r.name in replaced:
            assert replaced[r.name] == current[r.step].name
    assert len(current) == len({r.step for r in records})


@FAST
@given(record_lists(), policy_lists, st.data())
def test_plan_retention_keeps_newest_protected_pinned_and_what_policies_keep_of_current_saves(
        records, policies, data) -> None:
    names = {r.name for r in records}
    protected = data.draw(st.sets(st.sampled_from(sorted(names)))) if names else set()
    plan = plan_retention(records, policies, protected=protected)
    assert set(plan.keep).isdisjoint(plan.delete) and set(plan.keep) | set(plan.delete) == names
    assert all(plan.keep.values())  # every kept checkpoint has a reason
    current = latest_saves(records)
    pinned = {r.name for r in records if r.pinned}
    expected = protected | pinned
    if records:
        expected |= select_keep(current, policies, protected=protected & {r.name for r in current})
    if not policies:
        expected |= {r.name for r in current}
    older_kept = {r.step for r in records if r.name in expected and r not in current}
    expected |= {r.name for r in current if r.step in older_kept}  # a step never falls back to an older save
    assert set(plan.keep) == expected & names
    replaced = superseded(records)
    for name, why in plan.delete.items():
        assert why.startswith("superseded by") == (name in replaced)
    keys = [(r.step, r.time, r.name) for r in sorted(records, key=lambda r: (r.step, r.time, r.name))
            if r.name in plan.delete]
    assert keys == sorted(keys) and list(plan.delete) == [k[2] for k in keys]  # oldest first


@FAST
@given(record_lists(), policy_lists, st.randoms(use_true_random=False))
def test_plan_retention_does_not_depend_on_input_order(records, policies, rnd) -> None:
    shuffled = list(records)
    rnd.shuffle(shuffled)
    a = plan_retention(records, policies, protected={r.name for r in records[:1]})
    b = plan_retention(shuffled, policies, protected={r.name for r in records[:1]})
    assert dict(a.keep) == dict(b.keep) and list(a.delete.items()) == list(b.delete.items())


def test_a_pinned_save_survives_a_re_save_of_its_step_and_the_reason_is_given() -> None:
    records = [CheckpointRecord(5, "old-pinned", 1.0, pinned=True), CheckpointRecord(5, "old", 2.0),
               CheckpointRecord(5, "new", 3.0)]
    plan = plan_retention(records, [])
    assert plan.keep == {"old-pinned": ("pinned",), "new": ("newest", "no retention policy")}
    assert plan.delete == {"old": "superseded by new"}
    plan = plan_retention([*records, CheckpointRecord(6, "six", 4.0)], [keep_last(1)])
    assert plan.delete == {"old": "superseded by new"}
    assert plan.keep["new"] == ("newest save of step 5, whose earlier save old-pinned stays",)
    plan = plan_retention([records[1], records[2], CheckpointRecord(6, "six", 4.0)], [keep_last(1)])
    assert plan.delete == {"old": "superseded by new", "new": "kept by none of keep_last(1)"}


@FAST
@given(record_lists(), st.sampled_from(["loss", "acc"]), modes, st.integers(1, 4))
def test_keep_best_is_the_top_of_rank_best(records, metric, mode, k) -> None:
    ranked = rank_best(records, metric, mode)
    assert keep_best(metric, mode, k)(records) == {r.name for r in ranked[:k]}
    keys = [rank(r.metrics[metric], r.step, mode) for r in ranked]
    assert keys == sorted(keys) and all(finite(r.metrics[metric]) for r in ranked)


@FAST
@given(evaluations, modes, st.integers(1, 4))
def test_best_from_records_equals_folding_update_best_in_step_order(values, mode, k) -> None:
    records = [CheckpointRecord(s, f"s{s}", float(s), metrics={"m": v}) for s, v in enumerate(values)]
    folded: dict = {}
    for r in records:
        folded, _ = update_best(folded, r.metrics, r.step, {"m": mode}, k)
    assert best_from_records(records, {"m": mode}, k) == (folded or {"m": {"mode": mode, "entries": []}})


def test_best_from_records_counts_the_newest_save_of_a_step_only() -> None:
    records = [CheckpointRecord(5, "a", 1.0, metrics={"m": 0.1}), CheckpointRecord(6, "b", 2.0, metrics={"m": 0.3}),
               CheckpointRecord(5, "c", 3.0, metrics={"m": 0.5})]
    assert best_from_records(records, {"m": "min"}) == {"m": {"mode": "min", "entries": [[0.3, 6]]}}


@FAST
@given(record_lists(), st.data())
def test_ahead_of_is_everything_saved_later_on_the_resumed_line(records, data) -> None:
    if not records:
        return
    resumed = data.draw(st.sampled_from(records))
    ahead = ahead_of(records, resumed)
    for r in records:
        later = r.step > resumed.step or (r.step == resumed.step and (r.time, r.name) > (resumed.time, resumed.name))
        assert (r.name in ahead) == (later and r.name != resumed.name)


def test_early_stopping_counts_a_repeated_step_once() -> None:
    es = EarlyStopping("m", mode="min", patience=2)
    assert not es.update(1.0, 1) and not es.update(2.0, 2)
    assert not es.update(2.0, 2) and es.state_dict()["bad_epochs"] == 1  # step 2 again: no second count
    assert es.update(3.0, 3)
    old = {k: v for k, v in es.state_dict().items() if k != "last_step"}  # a state saved before last_step existed
    fresh = EarlyStopping("m", mode="min", patience=2)
    fresh.load_state_dict(old)
    assert fresh.should_stop and fresh.state_dict()["last_step"] is None
