"""resplit(): data positions saved by N ranks loaded into M ranks, exactly, or refused with the remedy."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.utils.data import IterableDataset, RandomSampler

from savegame.data import DataLoader, MultiLoader, ResumableSampler
from savegame.data.resplit import resplit
from savegame.data.sampler import parse_state
from savegame.errors import ConfigurationError, IncompatibleStateError
from tests.unit.test_data_support import roundtrip


def _samplers(length: int, world: int, **kwargs: Any) -> list[ResumableSampler]:
    return [ResumableSampler(length, rank=r, world_size=world, **kwargs) for r in range(world)]


def _consume(samplers: list[ResumableSampler], epoch: int | None, count: int) -> list[int]:
    """Advance every sampler by ``count`` indices (of ``epoch``, or of the restored pass); the indices."""
    seen = []
    for sampler in samplers:
        if epoch is not None:
            sampler.set_epoch(epoch)
        iterator = iter(sampler)
        seen += [next(iterator) for _ in range(count)]
    return seen


def _moved(states: list[dict[str, Any]], length: int, world: int, epoch: int, **kwargs: Any) -> list[ResumableSampler]:
    """Fresh samplers of ``world`` ranks (another seed: the saved one wins) with ``states`` re-split into them."""
    samplers = _samplers(length, world, **{**kwargs, "seed": 12345})
    for rank, sampler in enumerate(samplers):
        assert resplit(sampler, [roundtrip(s) for s in states], rank, world) is True
        sampler.set_epoch(epoch)                # the DistributedSampler habit keeps the restored pass
    return samplers


def _rest(part: list[int], world: int, drop_last: bool) -> Counter[int]:
    """What ``world`` ranks read of ``part``: like one epoch, padded with its first entries or truncated."""
    if drop_last:
        return Counter(part[: len(part) // world * world])
    pad = -len(part) % world
    return Counter(part + (part * (pad // max(len(part), 1) + 1))[:pad])


@settings(max_examples=150, deadline=None)
@given(length=st.integers(0, 50), seed=st.integers(0, 2**31), shuffle=st.booleans(), drop_last=st.booleans(),
       old=st.integers(1, 5), new=st.integers(1, 5), epoch=st.integers(0, 3), data=st.data())
def test_the_rest_of_the_epoch_is_re_split_and_the_next_epoch_is_fresh(
        length: int, seed: int, shuffle: bool, drop_last: bool, old: int, new: int, epoch: int,
        data: st.DataObject) -> None:
    assume(old != new)                          # the same world size loads each rank's own state
    kwargs = {"seed": seed, "shuffle": shuffle, "drop_last": drop_last}
    before = _samplers(length, old, **kwargs)
    stop = data.draw(st.integers(0, len(before[0])), label="stop")
    seen = _consume(before, epoch, stop)
    after = _moved([s.state_dict() for s in before], length, new, epoch, **kwargs)
    rest = [list(s) for s in after]

    order = ResumableSampler(length, **kwargs, world_size=1).indices(epoch)
    passed = order[: len(before[0]) * old] if drop_last else order
    assert len({len(part) for part in rest}) == 1, "the new ranks stay in lockstep"
    assert not set(seen) & {i for part in rest for i in part}, "no consumed sample is read again"
    unread = passed[min(old * stop, len(passed)):] if stop else order     # nothing read: a fresh M-rank epoch
    assert Counter(i for part in rest for i in part) == _rest(unread, new, drop_last)
    if length % old == 0 and len(unread) % new == 0:         # no padding, nothing left out
        uninterrupted = Counter(i for s in _samplers(length, old, **kwargs) for i in s.indices(epoch))
        assert Counter(seen) + Counter(i for part in rest for i in part) == uninterrupted
    for rank, sampler in enumerate(after):
        fresh = ResumableSampler(length, **kwargs, rank=rank, world_size=new)
        fresh.set_epoch(epoch + 1)
        sampler.set_epoch(epoch + 1)
        assert list(sampler) == list(fresh), "the next epoch is a fresh M-rank epoch"


@settings(max_examples=100, deadline=None)
@given(length=st.integers(0, 50), shuffle=st.booleans(), drop_last=st.booleans(), sizes=st.tuples(
    st.integers(1, 4), st.integers(1, 4), st.integers(1, 4)), data=st.data())
def test_a_re_split_pass_saves_and_resumes_again_at_any_world_size(
        length: int, shuffle: bool, drop_last: bool, sizes: tuple[int, int, int], data: st.DataObject) -> None:
    """N ranks -> M ranks -> K ranks inside one epoch: nothing is read twice except padding, nothing lost
    except what drop_last leaves out; with M ranks again the pass continues exactly."""
    first, second, third = sizes
    kwargs = {"seed": 3, "shuffle": shuffle, "drop_last": drop_last}
    a = _samplers(length, first, **kwargs)
    stop = data.draw(st.integers(0, len(a[0])), label="p")
    seen = _consume(a, 1, stop)
    b = _moved([s.state_dict() for s in a], length, second, 1, **kwargs)
    passes = [list(s) for s in b]
    b = _moved([s.state_dict() for s in a], length, second, 1, **kwargs)
    mid = data.draw(st.integers(0, len(passes[0])), label="q")
    seen += _consume(b, None, mid)
    states = [s.state_dict() for s in b]
    again = _moved(states, length, second, 1, **kwargs)
    assert [list(s) for s in again] == [p[mid:] for p in passes], "same world size: the pass continues exactly"
    c = _moved(states, length, third, 1, **kwargs)
    read = Counter(seen) + Counter(i for s in c for i in s)
    order = ResumableSampler(length, **kwargs, world_size=1).indices(1)
    if drop_last:
        assert max(read.values(), default=1) == 1 and set(read) <= set(order)
    else:
        assert set(read) == set(order), "every sample of the epoch is read"
    unread = length - first * stop
    if length % first == 0 and unread % second == 0 and (unread - second * mid) % third == 0:
        assert read == Counter(order), "without padding or truncation, every sample exactly once"


class Numbers(torch.utils.data.Dataset[torch.Tensor]):
    """Sample ``i`` is a tensor holding ``i``: a batch tells which samples it holds."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([index, index * 10])


def _loaders(world: int, length: int = 20, batch_size: int = 3, **kwargs: Any) -> list[DataLoader]:
    return [DataLoader(Numbers(length), batch_size=batch_size, seed=7,
                       sampler=ResumableSampler(length, seed=5, rank=r, world_size=world), **kwargs)
            for r in range(world)]


def _samples(batches: list[torch.Tensor]) -> list[int]:
    return [int(i) for batch in batches for i in batch[:, 0]]


@pytest.mark.parametrize(("old", "new", "batches", "workers"), [(2, 1, 2, 0), (1, 2, 2, 0), (2, 1, 3, 2)])
def test_loader_batches_after_a_re_split_hold_the_unread_samples(old: int, new: int, batches: int,
                                                                workers: int) -> None:
    length, size = 20, 2 if old == 2 else 3
    before = _loaders(old, length, size, num_workers=workers)
    seen: list[int] = []
    for loader in before:
        iterator = iter(loader)                 # with workers, batches are prefetched past the saved position
        seen += _samples([next(iterator) for _ in range(batches)])
    states = [roundtrip(loader.state_dict()) for loader in before]
    after = _loaders(new, length, size)
    rest: list[list[torch.Tensor]] = []
    for rank, loader in enumerate(after):
        assert resplit(loader, states, rank, new)
        iterator = iter(loader)
        rest.append(list(iterator))
        assert len(iterator) == len(rest[-1])
    assert len({len(r) for r in rest}) == 1
    read = seen + [i for r in rest for i in _samples(r)]
    unread = length - len(seen)
    if unread % new == 0:
        assert sorted(read) == list(range(length)), "every sample once in the epoch"
    else:
        assert set(read) == set(range(length)) and len(read) == len(seen) + unread + (-unread % new)
    for rank, loader in enumerate(after):
        fresh = _loaders(new, length, size)[rank]
        list(fresh)                                     # its epoch 0
        assert loader.epoch == fresh.epoch == 1
        assert _samples(list(fresh)) == _samples(list(loader)), "the next epoch is a fresh M-rank epoch"


def test_a_re_split_loader_state_resumes_exactly_mid_way() -> None:
    before = _loaders(2, 20, 2)
    for loader in before:
        iterator = iter(loader)
        next(iterator)
    states = [loader.state_dict() for loader in before]
    moved = _loaders(1, 20, 2)[0]
    resplit(moved, states, 0, 1)
    whole = _samples(list(_again(moved, states)))
    iterator = iter(moved)
    head = _samples([next(iterator) for _ in range(3)])
    saved = roundtrip(moved.state_dict())
    assert saved["sampler"]["split"] == [4, 20]
    resumed = _loaders(1, 20, 2)[0]
    resumed.load_state_dict(saved)
    assert head + _samples(list(resumed)) == whole
    back = _loaders(2, 20, 2)
    tail = []
    for rank, loader in enumerate(back):
        resplit(loader, [saved], rank, 2)
        tail += _samples(list(loader))
    assert sorted(head + tail) == sorted(whole), "and it re-splits again"


def _again(loader: DataLoader, states: list[dict[str, Any]]) -> DataLoader:
    twin = _loaders(1, 20, 2)[0]
    resplit(twin, states, 0, 1)
    return twin


def test_ranks_at_different_positions_are_refused_naming_the_approximate_option() -> None:
    before = _loaders(2, 20, 2)
    for rank, loader in enumerate(before):
        iterator = iter(loader)
        for _ in range(rank + 1):
            next(iterator)
    states = [loader.state_dict() for loader in before]
    target = _loaders(1, 20, 2)[0]
    untouched = _samples(list(_loaders(1, 20, 2)[0]))
    with pytest.raises(IncompatibleStateError, match=r'different positions.*resplit="approximate"'):
        resplit(target, states, 0, 1)
    assert _samples(list(target)) == untouched, "a refusal changes nothing"
    samplers = _samplers(10, 2)
    for rank, sampler in enumerate(samplers):
        iterator = iter(sampler)
        for _ in range(rank + 1):
            next(iterator)
    with pytest.raises(IncompatibleStateError, match=r"not in lockstep.*approximate"):
        resplit(ResumableSampler(10, rank=0, world_size=1), [s.state_dict() for s in samplers], 0, 1)


class Stream(IterableDataset[int]):
    def __iter__(self) -> Iterator[int]:
        return iter(range(10))


def test_positions_savegame_cannot_divide_are_refused_saying_why() -> None:
    streams = [DataLoader(Stream(), batch_size=2, seed=0) for _ in range(2)]
    for loader in streams:
        next(iter(loader))
    with pytest.raises(IncompatibleStateError, match=r"IterableDataset.*approximate"):
        resplit(DataLoader(Stream(), batch_size=2, seed=0), [s.state_dict() for s in streams], 0, 1)
    mixes = [MultiLoader({"a": _loaders(2)[r], "s": streams[r]}, mode="round_robin") for r in range(2)]
    with pytest.raises(IncompatibleStateError, match=r"\['s'\].*IterableDataset"):
        resplit(MultiLoader({"a": _loaders(1)[0], "s": DataLoader(Stream(), batch_size=2)}, mode="round_robin"),
                [m.state_dict() for m in mixes], 0, 1)
    plain = [DataLoader(Numbers(8), batch_size=2, sampler=RandomSampler(range(8))) for _ in range(2)]
    with pytest.raises(IncompatibleStateError, match=r"RandomSampler"):
        resplit(DataLoader(Numbers(8), batch_size=2, sampler=RandomSampler(range(8))),
                [p.state_dict() for p in plain], 0, 1)


def test_a_multi_loader_re_splits_each_loader() -> None:
    def mix(world: int, rank: int) -> MultiLoader:
        return MultiLoader({"a": _loaders(world, 12, 2)[rank], "b": _loaders(world, 8, 2)[rank]},
                           mode="round_robin", seed=rank)

    before = [mix(2, r) for r in range(2)]
    seen: Counter[str] = Counter()
    for multi in before:
        iterator = iter(multi)
        for _ in range(3):
            name, batch = next(iterator)
            seen.update(f"{name}{i}" for i in _samples([batch]))
    states = [roundtrip(m.state_dict()) for m in before]
    after = mix(1, 0)
    assert resplit(after, states, 0, 1)
    for name, batch in after:
        seen.update(f"{name}{i}" for i in _samples([batch]))
        if sum(1 for k in seen if k.startswith("b")) == 8:
            break
    assert sorted(k for k in seen if k.startswith("b")) == sorted(f"b{i}" for i in range(8))
    assert max(seen.values()) == 1


def test_same_world_size_loads_this_ranks_state_and_foreign_objects_are_left_to_the_caller() -> None:
    before = _samplers(10, 2, seed=1)
    seen = _consume(before, 0, 2)
    again = _samplers(10, 2, seed=1)
    for rank, sampler in enumerate(again):
        assert resplit(sampler, [s.state_dict() for s in before], rank, 2)
        assert list(sampler) == before[rank].indices(0)[2:]
    assert len(seen) == 4
    assert resplit(torch.utils.data.DataLoader(range(4)), [{}], 0, 1) is False
    assert resplit({"not": "data"}, [{}, {}], 0, 1) is False


def test_a_sampler_that_does_not_follow_the_ranks_continues_its_own_pass() -> None:
    """The default loader (shuffle=True) reads the whole dataset on every rank: identical states move as they are."""
    before = [DataLoader(Numbers(9), batch_size=2, shuffle=True, seed=4) for _ in range(2)]
    for loader in before:
        iterator = iter(loader)
        next(iterator)
    states = [b.state_dict() for b in before]
    expected = _samples(list(iterator))
    for rank in range(3):
        loader = DataLoader(Numbers(9), batch_size=2, shuffle=True, seed=4)
        assert resplit(loader, states, rank, 3)
        assert _samples(list(loader)) == expected


@pytest.mark.parametrize(("states", "rank", "world", "match"), [
    ([], 0, 1, "states"), ([{}], 1, 1, "rank"), ([{}], 0, 0, "world_size"), ({"a": 1}, 0, 1, "states")])
def test_bad_arguments_are_named(states: Any, rank: int, world: int, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        resplit(ResumableSampler(4), states, rank, world)


def test_out_of_order_consumption_and_a_malformed_split_are_refused() -> None:
    before = _loaders(2, 20, 2)
    for loader in before:
        iterator = iter(loader)
        next(iterator)
    holes = [{**loader.state_dict(), "done": [3]} for loader in before]     # as in_order=False leaves them
    with pytest.raises(IncompatibleStateError, match=r"in_order=False.*approximate"):
        resplit(_loaders(1, 20, 2)[0], holes, 0, 1)
    moved = _loaders(1, 20, 2)[0]
    resplit(moved, [loader.state_dict() for loader in before], 0, 1)
    state = moved.sampler.state_dict()
    assert state["split"] == [4, 20]
    for bad in ([5, 2], [0, 21], [1], "4:20", [True, 20]):
        with pytest.raises(IncompatibleStateError, match="'split'"):
            ResumableSampler(20, world_size=1).load_state_dict({**state, "split": bad})


@settings(max_examples=60, deadline=None)
@given(length=st.integers(0, 24), size=st.integers(1, 4), batch_drop=st.booleans(), drop_last=st.booleans(),
       shuffle=st.booleans(), worlds=st.tuples(st.integers(1, 3), st.integers(1, 3)), data=st.data())
def test_loader_batches_follow_the_sampler_re_split(length: int, size: int, batch_drop: bool, drop_last: bool,
                                                   shuffle: bool, worlds: tuple[int, int],
                                                   data: st.DataObject) -> None:
    """N -> M -> N ranks inside one epoch: each new rank's batches are its re-split sampler's indices, in
    batches of ``size`` (its last short batch dropped with ``drop_last``); its iterator's len() counts them."""
    old, new = worlds
    assume(old != new)
    kwargs = {"seed": 2, "shuffle": shuffle, "drop_last": drop_last}

    def loaders(world: int, states: list[dict[str, Any]] | None = None) -> list[DataLoader]:
        built = [DataLoader(Numbers(length), batch_size=size, drop_last=batch_drop, seed=1,
                            sampler=ResumableSampler(length, rank=r, world_size=world, **kwargs))
                 for r in range(world)]
        for rank, loader in enumerate(built):
            assert states is None or resplit(loader, states, rank, world)
        return built

    current, samplers = loaders(old), _samplers(length, old, **kwargs)
    for world in (new, old):
        iterators = [iter(loader) for loader in current]
        count = data.draw(st.integers(0, len(iterators[0])), label="batches")
        for iterator, sampler in zip(iterators, samplers):
            for _ in range(count):
                next(iterator)
            consumed = min(count * size, parse_state(sampler.state_dict()).pass_length)
            indices = iter(sampler)
            for _ in range(consumed):
                next(indices)
        loader_states = [roundtrip(loader.state_dict()) for loader in current]
        sampler_states = [sampler.state_dict() for sampler in samplers]
        expected = _moved(sampler_states, length, world, 0, **kwargs)
        for loader, sampler in zip(loaders(world, loader_states), expected):
            indices = list(sampler)
            keep = len(indices) // size * size if batch_drop else len(indices)
            batches = list(iterator := iter(loader))
            assert _samples(batches) == indices[:keep] and len(iterator) == len(batches)
        current, samplers = loaders(world, loader_states), _moved(sampler_states, length, world, 0, **kwargs)


def test_loader_seeds_follow_the_documented_policy() -> None:
    def build(world: int, rank: int, seed: int) -> DataLoader:
        return DataLoader(Numbers(12), batch_size=2, seed=seed, sampler=ResumableSampler(12, rank=rank,
                                                                                        world_size=world))

    for seeds, expected in (([10, 11], [10, 11, 99]), ([10, 10], [10, 10, 10])):
        before = [build(2, r, seeds[r]) for r in range(2)]
        for loader in before:
            next(iter(loader))
        states = [loader.state_dict() for loader in before]
        after = [build(3, r, 99) for r in range(3)]
        for rank, loader in enumerate(after):
            resplit(loader, states, rank, 3)
        assert [loader.seed for loader in after] == expected


class Counted(Numbers):
    """A map-style dataset with its own state."""

    def __init__(self, length: int, tag: int) -> None:
        super().__init__(length)
        self.tag = tag

    def state_dict(self) -> dict[str, int]:
        return {"tag": self.tag}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.tag = state["tag"]


def test_dataset_states_move_only_when_every_old_rank_had_the_same() -> None:
    def states(tags: list[int]) -> list[dict[str, Any]]:
        loaders = [DataLoader(Counted(8, tag), batch_size=2, sampler=ResumableSampler(8, rank=r, world_size=2))
                   for r, tag in enumerate(tags)]
        for loader in loaders:
            next(iter(loader))
        return [loader.state_dict() for loader in loaders]

    target = DataLoader(Counted(8, 0), batch_size=2, sampler=ResumableSampler(8, rank=0, world_size=1))
    with pytest.raises(IncompatibleStateError, match="dataset's own states differ"):
        resplit(target, states([1, 2]), 0, 1)
    assert target.dataset.tag == 0
    assert resplit(target, states([5, 5]), 0, 1) and target.dataset.tag == 5
    assert len(_samples(list(target))) == 4, "the 4 samples the two old ranks had not read"
