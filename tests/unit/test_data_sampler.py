"""ResumableSampler: orders, distributed partition, state round trip, refusals."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from savegame.data import DataLoader, ResumableSampler
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


@pytest.mark.parametrize("kwargs", [{"world_size": 0}, {"rank": 2, "world_size": 2}, {"seed": "1"},
                                    {"seed": True}, {"rank": "0"}, {"rank": -1}, {"world_size": 2.0},
                                    {"rank": True, "world_size": 2}])
def test_bad_arguments_are_named(kwargs: dict) -> None:
    with pytest.raises(ConfigurationError, match=next(iter(kwargs))):
        ResumableSampler(5, **kwargs)


def test_unsized_source_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="sized"):
        ResumableSampler(iter(range(3)))  # type: ignore[arg-type]


def _restored(stop: int, epoch: int = 2) -> tuple[ResumableSampler, list[int]]:
    """A ResumableSampler restored after ``stop`` indices of ``epoch``, and that epoch's full order."""
    sampler = ResumableSampler(30, seed=4)
    sampler.set_epoch(epoch)
    iterator = iter(sampler)
    for _ in range(stop):
        next(iterator)
    resumed = ResumableSampler(30, seed=4)
    resumed.load_state_dict(roundtrip(sampler.state_dict()))
    return resumed, sampler.indices(epoch)


def test_set_epoch_with_the_restored_epoch_keeps_the_position() -> None:
    resumed, full = _restored(13)
    resumed.set_epoch(2)                    # the DistributedSampler habit, every epoch
    assert resumed.state_dict()["position"] == 13
    assert list(resumed) == full[13:]
    resumed.set_epoch(2)
    assert list(resumed) == full, "the restored position is used once; later passes start at the beginning"


def test_set_epoch_with_another_epoch_starts_it_from_the_beginning() -> None:
    resumed, _ = _restored(13)
    resumed.set_epoch(3)
    assert resumed.state_dict()["position"] == 0
    assert list(resumed) == resumed.indices(3) and sorted(resumed.indices(3)) == list(range(30))


@pytest.mark.parametrize(("field", "value"), [("seed", "abc"), ("epoch", -1), ("position", 1.5), ("length", None),
                                              ("world_size", 0), ("shuffle", "yes"), ("drop_last", 1)])
def test_a_malformed_state_is_refused_naming_the_field_and_changes_nothing(field: str, value: object) -> None:
    resumed, full = _restored(5)
    bad = {**resumed.state_dict(), field: value}
    with pytest.raises(IncompatibleStateError, match=f"'{field}'"):
        resumed.load_state_dict(bad)
    assert list(resumed) == full[5:]


def test_rank_and_world_size_default_to_one_process_without_torch_distributed() -> None:
    sampler = ResumableSampler(10)
    assert (sampler.rank, sampler.world_size) == (0, 1)


@pytest.fixture
def gloo_group(tmp_path: Path) -> Iterator[None]:
    """A real single-process gloo process group, torn down afterwards."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.usefixtures("gloo_group")
def test_rank_and_world_size_come_from_an_initialised_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    assert dist.is_initialized()
    sampler = ResumableSampler(10, shuffle=False)
    assert (sampler.rank, sampler.world_size) == (0, 1) and list(sampler) == list(range(10))
    # As if this process were rank 2 of 3 in the same (initialised) group: the values are asked for, not assumed.
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 3)
    third = ResumableSampler(10, shuffle=False)
    assert (third.rank, third.world_size) == (2, 3) and list(third) == [2, 5, 8, 1]
    assert ResumableSampler(10, rank=0).world_size == 3, "an explicit rank keeps the group's world size"
    with pytest.raises(ConfigurationError, match=r"rank must be an int in \[0, world_size=2\)"):
        ResumableSampler(10, world_size=2)      # rank 2 from the group does not fit an explicit world size of 2


def test_the_default_loader_sampler_ignores_torch_distributed(monkeypatch: pytest.MonkeyPatch) -> None:
    """DataLoader(shuffle=...) keeps torch's meaning (the whole dataset) even under DDP."""
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4)
    assert ResumableSampler(8).world_size == 4
    loader = DataLoader(list(range(8)), batch_size=2, shuffle=True, seed=0)
    assert isinstance(loader.sampler, ResumableSampler) and loader.sampler.world_size == 1 and len(loader) == 4


@pytest.mark.parametrize(("n", "world", "drop_last"), [(10, 3, False), (10, 3, True), (12, 4, False)])
def test_ranks_resumed_mid_epoch_cover_every_epoch_exactly_once(n: int, world: int, drop_last: bool) -> None:
    """Per epoch, the union of the ranks is the dataset once: padded by repeating the first indices
    of the permutation (drop_last=False) or without the last ``n % world`` (drop_last=True)."""
    def build(rank: int) -> ResumableSampler:
        return ResumableSampler(n, seed=3, rank=rank, world_size=world, drop_last=drop_last)

    for epoch in range(3):
        parts = []
        for rank in range(world):
            sampler = build(rank)
            sampler.set_epoch(epoch)
            iterator = iter(sampler)
            head = [next(iterator) for _ in range(rank % 2 + 1)]       # each rank stops elsewhere
            resumed = build(rank)
            resumed.load_state_dict(roundtrip(sampler.state_dict()))
            resumed.set_epoch(epoch)
            parts.append(head + list(resumed))
        merged = sorted(i for part in parts for i in part)
        per_rank = n // world if drop_last else -(-n // world)
        assert all(len(part) == per_rank for part in parts)
        if drop_last:
            assert len(set(merged)) == len(merged) == per_rank * world
        else:
            assert set(merged) == set(range(n)) and len(merged) == per_rank * world
            order = ResumableSampler(n, seed=3, world_size=1)
            order.set_epoch(epoch)
            padding = order.indices()[: per_rank * world - n]
            assert sorted(merged) == sorted(list(range(n)) + padding), "padding repeats the permutation's first"
