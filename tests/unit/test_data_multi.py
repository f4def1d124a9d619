"""MultiLoader: every mode resumes exactly; its choices never touch the global generators."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from savegame.data import DataLoader, MultiLoader
from savegame.errors import ConfigurationError, IncompatibleStateError, SavegameError
from tests.unit.test_data_support import (
    assert_rng_unchanged,
    global_rng,
    roundtrip,
    same,
)

CASES = [("weighted", "stop"), ("weighted", "cycle"), ("weighted", "drop"), ("round_robin", "stop"),
         ("round_robin", "cycle"), ("round_robin", "drop"), ("sequential", "stop")]


def make(mode: str, exhaustion: str, workers: int = 0, **c_kwargs: Any) -> MultiLoader:
    loaders = {
        "a": DataLoader(list(range(10)), batch_size=3, shuffle=True, seed=1, num_workers=workers),
        "b": DataLoader(list(range(100, 105)), batch_size=2, shuffle=True, seed=2),
        "c": DataLoader(list(range(200, 207)), **{"batch_size": 4, "seed": 3, **c_kwargs}),
    }
    weights = {"a": 0.5, "b": 0.2, "c": 0.3} if mode == "weighted" else None
    return MultiLoader(loaders, weights=weights, mode=mode, exhaustion=exhaustion, seed=7)


def stream(multi: MultiLoader, epochs: int) -> list[tuple[str, list[int]]]:
    out = []
    while multi.epoch < epochs:
        out.extend((name, batch.tolist()) for name, batch in multi)
    return out


@pytest.mark.parametrize(("mode", "exhaustion"), CASES)
def test_resume_continues_the_stream_exactly(mode: str, exhaustion: str) -> None:
    reference = stream(make(mode, exhaustion), 3)
    assert {name for name, _ in reference} == {"a", "b", "c"}
    for stop in (1, 3, len(reference) // 2, len(reference) - 1):
        multi = make(mode, exhaustion)
        head: list[Any] = []
        while len(head) < stop:
            for name, batch in multi:
                head.append((name, batch.tolist()))
                if len(head) == stop:
                    break
        resumed = make(mode, exhaustion)
        resumed.load_state_dict(roundtrip(multi.state_dict()))
        assert head + stream(resumed, 3) == reference, f"stop={stop}"


def test_modes_order_the_loaders_as_documented() -> None:
    names = [name for name, _ in make("round_robin", "stop")]
    assert names[:3] == ["a", "b", "c"] and names[3:6] == ["a", "b", "c"]
    assert names == ["a", "b", "c"] * 2 + ["a", "b"], "b (3 batches) runs out first and ends the epoch"
    sequential = [name for name, _ in make("sequential", "stop")]
    assert sequential == ["a"] * 4 + ["b"] * 3 + ["c"] * 2
    drop = [name for name, _ in make("round_robin", "drop")]
    assert sorted(drop) == sorted(sequential)
    cycle = [name for name, _ in make("round_robin", "cycle")]
    # c (2 batches) and b (3) restart when they run out; the epoch ends when a (4) runs out too
    assert cycle == ["a", "b", "c"] * 4


def test_sub_loaders_continue_across_multiloader_epochs() -> None:
    multi = make("round_robin", "stop")
    first = [(n, b.tolist()) for n, b in multi]
    second = [(n, b.tolist()) for n, b in multi]
    a_batches = [b for n, b in first + second if n == "a"]
    indices = [i for batch in a_batches[:4] for i in batch]
    assert sorted(indices) == list(range(10)), "a's epoch spans two MultiLoader epochs"


def test_weighted_choices_follow_the_weights_and_leave_global_generators_alone() -> None:
    big = {name: DataLoader(list(range(3000)), batch_size=1, seed=i) for i, name in enumerate("xy")}
    before = global_rng()
    multi = MultiLoader(big, weights={"x": 0.8, "y": 0.2}, seed=0)
    names = [name for _, (name, _batch) in zip(range(2000), multi)]
    assert_rng_unchanged(before)
    assert 0.75 < names.count("x") / len(names) < 0.85


def test_resume_with_workers_in_a_sub_loader() -> None:
    reference = stream(make("weighted", "cycle", workers=2), 2)
    multi = make("weighted", "cycle", workers=2)
    iterator = iter(multi)
    head = [(n, b.tolist()) for n, b in (next(iterator) for _ in range(5))]
    resumed = make("weighted", "cycle", workers=2)
    resumed.load_state_dict(roundtrip(multi.state_dict()))
    assert head + stream(resumed, 2) == reference


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mode": "random"}, "mode"),
    ({"exhaustion": "never"}, "exhaustion"),
    ({"mode": "sequential", "exhaustion": "cycle"}, "sequential"),
    ({"weights": {"a": 1.0}}, "every loader name"),
    ({"weights": {"a": 1.0, "b": -1.0}}, r"weights\['b'\]"),
    ({"mode": "round_robin", "weights": {"a": 1.0, "b": 1.0}}, "only with mode='weighted'"),
])
def test_bad_arguments_are_named(kwargs: dict, message: str) -> None:
    loaders = {"a": DataLoader(range(3), seed=0), "b": DataLoader(range(3), seed=0)}
    with pytest.raises(ConfigurationError, match=message):
        MultiLoader(loaders, **kwargs)


def test_a_plain_torch_loader_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="savegame.DataLoader"):
        MultiLoader({"a": torch.utils.data.DataLoader(range(3))})


def test_different_loaders_or_a_changed_mode_mid_epoch_are_refused() -> None:
    multi = make("weighted", "stop")
    next(iter(multi))
    state = multi.state_dict()
    other = MultiLoader({"a": DataLoader(range(3), seed=0)}, seed=0)
    with pytest.raises(IncompatibleStateError, match=r"loaders \['a', 'b', 'c'\]"):
        other.load_state_dict(state)
    with pytest.raises(IncompatibleStateError, match="mode='weighted'"):
        make("round_robin", "stop").load_state_dict(state)


def test_an_older_iterator_cannot_be_advanced() -> None:
    multi = make("round_robin", "cycle")
    first = iter(multi)
    next(first)
    iter(multi)
    with pytest.raises(SavegameError, match="superseded"):
        next(first)


def test_batches_are_the_sub_loaders_batches() -> None:
    name, batch = next(iter(make("sequential", "stop")))
    assert name == "a" and same(batch, next(iter(DataLoader(list(range(10)), batch_size=3, shuffle=True, seed=1))))


def refusing_state(change: str) -> dict:
    """A MultiLoader state, taken with loader "c" mid-epoch, that this file's make() cannot load."""
    # c shuffled: c's ResumableSampler refuses, after a and b were loaded (and are put back);
    # c's batches of 2: savegame.DataLoader's own check refuses before anything is loaded.
    c_kwargs = {"sampler": {"shuffle": True}, "batch_size": {"batch_size": 2}}.get(change, {})
    multi = make("round_robin", "cycle", **c_kwargs)
    iterator = iter(multi)
    for _ in range(4):
        next(iterator)
    state = roundtrip(multi.state_dict())
    if change in ("seed", "rng", "dropped"):
        state[change] = {"seed": "abc", "rng": {"state": 1}, "dropped": ["z"]}[change]
    return state


@pytest.mark.parametrize(("change", "message"), [
    ("sampler", "shuffle True -> False"), ("batch_size", "batch_size was 2 and is now 4"),
    ("seed", "'seed'"), ("rng", "'rng'"), ("dropped", "'dropped'"),
])
def test_a_refused_state_changes_nothing(change: str, message: str) -> None:
    reference = stream(make("round_robin", "cycle"), 2)
    multi = make("round_robin", "cycle")
    iterator = iter(multi)
    head = [(name, batch.tolist()) for name, batch in (next(iterator) for _ in range(5))]
    state = refusing_state(change)
    with pytest.raises(IncompatibleStateError, match=message):
        multi.load_state_dict(state)
    rest = [(name, batch.tolist()) for name, batch in iterator]
    assert head + rest + stream(multi, 2) == reference
