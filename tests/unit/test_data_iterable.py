"""savegame.DataLoader over iterable datasets: with state (restored per worker), without (skip + warning)."""

from __future__ import annotations

import logging
import multiprocessing
from typing import Any

import pytest
import torch

from savegame.data import DataLoader
from savegame.errors import IncompatibleStateError
from tests.unit.test_data_support import (
    assert_rng_unchanged,
    flatten_epochs,
    global_rng,
    roundtrip,
    same_all,
    take,
)

EPOCHS = 3


class Stream(torch.utils.data.IterableDataset):
    """Items 0..n-1 sharded over workers (worker 0 gets the extra ones when ``uneven``), each with torch noise.

    ``reads`` counts items read, in shared memory (workers are forked).
    """

    def __init__(self, n: int, uneven: bool = False) -> None:
        self.n, self.uneven = n, uneven
        self.reads = multiprocessing.get_context("fork").Value("i", 0)

    def shard(self) -> list[int]:
        info = torch.utils.data.get_worker_info()
        wid, count = (info.id, info.num_workers) if info else (0, 1)
        items = list(range(self.n))
        if self.uneven and count > 1:
            cut = self.n // 2
            return items[:cut] if wid == 0 else items[cut:][wid - 1::count - 1][: 3]
        return items[wid::count]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return self._items(self.shard()[self.start():])   # the pass is set up at iter(), its state describes it

    def _items(self, items: list[int]):  # type: ignore[no-untyped-def]
        for i in items:
            self.advance()
            with self.reads.get_lock():
                self.reads.value += 1
            yield torch.tensor(i), torch.rand(1)

    def start(self) -> int:
        return 0

    def advance(self) -> None:
        pass


class StatefulStream(Stream):
    """The torchdata convention: state_dict() is the position in the current pass; load then iter() resumes.

    ``iter()`` starts the pass at once, so the state taken right after it already describes the new pass.
    """

    def __init__(self, n: int, uneven: bool = False) -> None:
        super().__init__(n, uneven)
        self.position, self.resume_at, self.epochs_seen = 0, 0, []

    def set_epoch(self, epoch: int) -> None:
        self.epochs_seen.append(epoch)

    def start(self) -> int:
        self.position, self.resume_at = self.resume_at, 0
        return self.position

    def advance(self) -> None:
        self.position += 1

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = self.resume_at = state["position"]


def make(dataset: Any, **kwargs: Any) -> DataLoader:
    return DataLoader(dataset, batch_size=kwargs.pop("batch_size", 3), seed=kwargs.pop("seed", 5), **kwargs)


def resume_at(kind: type, stop: int, uneven: bool = False, **kwargs: Any) -> tuple[list[Any], list[Any], Stream]:
    reference = flatten_epochs(make(kind(20, uneven), **kwargs), EPOCHS)
    loader = make(kind(20, uneven), **kwargs)
    head = take(loader, stop)
    dataset = kind(20, uneven)
    resumed = make(dataset, **{**kwargs, "seed": 77})
    resumed.load_state_dict(roundtrip(loader.state_dict()))
    return reference, head + flatten_epochs(resumed, EPOCHS), dataset


WORKERS = [{"num_workers": 0}, {"num_workers": 2}, {"num_workers": 2, "persistent_workers": True}]
IDS = ["main", "workers", "persistent"]


@pytest.mark.parametrize("kwargs", WORKERS, ids=IDS)
@pytest.mark.parametrize("stop", [1, 4, 9])
def test_a_stateful_iterable_resumes_exactly_from_its_state(kwargs: dict, stop: int) -> None:
    reference, got, dataset = resume_at(StatefulStream, stop, **kwargs)
    assert same_all(got, reference)
    assert dataset.reads.value == sum(len(batch[0]) for batch in got[stop:]), "consumed items were read again"


def test_a_stateful_iterable_reads_nothing_consumed_without_workers() -> None:
    loader = make(StatefulStream(20))
    iterator = iter(loader)
    for _ in range(4):
        next(iterator)
    dataset = StatefulStream(20)
    resumed = make(dataset)
    resumed.load_state_dict(loader.state_dict())
    list(resumed)
    assert dataset.reads.value == 20 - 4 * 3
    assert dataset.epochs_seen == [0]


@pytest.mark.parametrize("kwargs", WORKERS[:2], ids=IDS[:2])
def test_an_iterable_without_state_is_skipped_with_a_warning(kwargs: dict, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="savegame.data"):
        reference, got, dataset = resume_at(Stream, 4, **kwargs)
    assert same_all(got, reference)
    assert "has no state_dict()/load_state_dict()" in caplog.text and "Implement state_dict()" in caplog.text
    assert dataset.reads.value == EPOCHS * 20, "the consumed batches were read again"


@pytest.mark.parametrize("stateful", [StatefulStream, Stream], ids=["stateful", "stateless"])
@pytest.mark.parametrize("stop", [5, 8])
def test_uneven_workers_resume_after_one_ran_out(stateful: type, stop: int) -> None:
    reference, got, _ = resume_at(stateful, stop, uneven=True, num_workers=2, batch_size=2)
    assert same_all(got, reference)


def test_batches_from_workers_come_in_torchs_order() -> None:
    ours = [b[0].tolist() for b in make(Stream(10), num_workers=2)]
    plain = [b[0].tolist() for b in torch.utils.data.DataLoader(Stream(10), batch_size=3, num_workers=2)]
    assert ours == plain


@pytest.mark.parametrize("kwargs", WORKERS, ids=IDS)
def test_global_generators_are_untouched(kwargs: dict) -> None:
    loader = make(StatefulStream(20), **kwargs)
    before = global_rng()
    iterator = iter(loader)
    next(iterator)
    next(iterator)
    state = loader.state_dict()
    resumed = make(StatefulStream(20), **kwargs)
    resumed.load_state_dict(state)
    list(resumed)
    assert_rng_unchanged(before)


def test_a_changed_number_of_workers_mid_epoch_is_refused_and_accepted_at_a_boundary() -> None:
    loader = make(StatefulStream(20), num_workers=2)
    iterator = iter(loader)
    next(iterator)
    with pytest.raises(IncompatibleStateError, match=r"num_workers was 2 and is now 0.*num_workers=2"):
        make(StatefulStream(20)).load_state_dict(loader.state_dict())
    list(iterator)
    single = make(StatefulStream(20))
    single.load_state_dict(loader.state_dict())
    assert sorted(torch.cat([b[0] for b in single]).tolist()) == list(range(20))


def test_no_workers_and_one_worker_read_the_same_stream_so_either_resumes_the_other() -> None:
    reference = flatten_epochs(make(StatefulStream(20)), EPOCHS)
    for saved, loaded in ((0, 1), (1, 0)):
        loader = make(StatefulStream(20), num_workers=saved)
        iterator = iter(loader)
        head = [next(iterator) for _ in range(3)]
        resumed = make(StatefulStream(20), num_workers=loaded, seed=1)
        resumed.load_state_dict(roundtrip(loader.state_dict()))
        assert same_all(head + flatten_epochs(resumed, EPOCHS), reference), f"{saved} -> {loaded} workers"


def test_the_refusal_names_num_workers_as_given() -> None:
    loader = make(StatefulStream(20))
    iterator = iter(loader)
    next(iterator)
    with pytest.raises(IncompatibleStateError, match=r"num_workers was 0 and is now 2.*with num_workers=0 to"):
        make(StatefulStream(20), num_workers=2).load_state_dict(loader.state_dict())


class SizedStream(StatefulStream):
    def __len__(self) -> int:
        return self.n


@pytest.mark.parametrize("kwargs", WORKERS[:2], ids=IDS[:2])
def test_len_of_a_resumed_iterator_is_what_it_yields(kwargs: dict) -> None:
    loader = make(SizedStream(20), **kwargs)
    assert len(iter(loader)) == len(loader) == 7
    iterator = iter(loader)
    for _ in range(3):
        next(iterator)
    resumed = make(SizedStream(20), **kwargs)
    resumed.load_state_dict(roundtrip(loader.state_dict()))
    rest_iterator = iter(resumed)
    assert len(rest_iterator) == 4 and len(resumed) == 7
    if kwargs["num_workers"] == 0:
        assert len(list(rest_iterator)) == 4     # with workers, torch's len() of an iterable is an estimate too
