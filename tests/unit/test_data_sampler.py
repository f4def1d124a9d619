"""ResumableSampler: orders, distributed partition, state round trip, refusals."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from savegame.data import ResumableSampler
from savegame.errors import ConfigurationError, IncompatibleStateError
from tests.unit.test_data_support import assert_rng_unchanged, global_rng, roundtrip


def test_sequential_order_is_range() -> None:
    sampler = ResumableSampler(7, shuffle=False)
    assert list(sampler) == list(range(7))
    sampler.set_epoch(3)
    assert list(sampler) == list(range(7))


def test_shuffled_order_is_a_permutation_per_epoch_fixed_by_seed() -> None:
    before = global_rng()
    a, b = ResumableSampler(50, seed=1), ResumableSampler(list(range(50)), seed=1)
    epoch0 = list(a)
    assert sorted(epoch0) == list(range(50)) and epoch0 != list(range(50))
    assert list(b) == epoch0
    a.set_epoch(1)
    assert list(a) != epoch0 and sorted(a) == list(range(50))
    assert list(ResumableSampler(50, seed=2)) != epoch0
    assert_rng_unchanged(before)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 40), world=st.integers(1, 5), drop_last=st.booleans(), shuffle=st.booleans(),
       epoch=st.integers(0, 3))
def test_ranks_partition_one_permutation(n: int, world: int, drop_last: bool, shuffle: bool, epoch: int) -> None:
    parts = []
    for rank in range(world):
        sampler = ResumableSampler(n, shuffle=shuffle, seed=9, rank=rank, world_size=world, drop_last=drop_last)
        sampler.set_epoch(epoch)
        parts.append(list(sampler))
        assert len(parts[-1]) == len(sampler)
    assert len({len(p) for p in parts}) == 1
    merged = [i for p in parts for i in p]
    if drop_last or n % world == 0:
        assert len(set(merged)) == len(merged) == (n // world) * world
    else:
        assert set(merged) == set(range(n)) and len(merged) == -(-n // world) * world


@pytest.mark.parametrize("stop", [0, 1, 13, 29, 30])
def test_state_round_trip_resumes_the_rest_of_the_epoch(stop: int) -> None:
    sampler = ResumableSampler(30, seed=4, world_size=1)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2)
    iterator = iter(sampler)
    head = [next(iterator) for _ in range(stop)]
    state = roundtrip(sampler.state_dict())
    resumed = ResumableSampler(30, seed=123)
    resumed.load_state_dict(state)
    assert head + list(resumed) == full
    assert resumed.epoch == 2 and resumed.seed == 4
    assert list(resumed) == full, "a second iter() starts the epoch from its beginning"


def test_load_refuses_a_changed_length_mid_epoch_and_warns_at_a_boundary(caplog: pytest.LogCaptureFixture) -> None:
    sampler = ResumableSampler(20, seed=0)
    iterator = iter(sampler)
    next(iterator)
    with pytest.raises(IncompatibleStateError, match=r"length 20 -> 21"):
        ResumableSampler(21).load_state_dict(sampler.state_dict())
    list(iterator)
    with caplog.at_level(logging.WARNING, logger="savegame.data"):
        grown = ResumableSampler(21)
        grown.load_state_dict(sampler.state_dict())
    assert "length 20 -> 21" in caplog.text
    assert list(grown) == []   # the saved epoch was complete
    grown.set_epoch(1)
    assert sorted(grown) == list(range(21))


@pytest.mark.parametrize("kwargs", [dict(world_size=0), dict(rank=2, world_size=2), dict(seed="1"),
                                    dict(seed=True)])
def test_bad_arguments_are_named(kwargs: dict) -> None:
    with pytest.raises(ConfigurationError, match=next(iter(kwargs))):
        ResumableSampler(5, **kwargs)


def test_unsized_source_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="sized"):
        ResumableSampler(iter(range(3)))  # type: ignore[arg-type]
