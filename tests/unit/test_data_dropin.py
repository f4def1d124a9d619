"""savegame.DataLoader beside torch's DataLoader and torchdata's StatefulDataLoader, over iterable datasets.

Every test runs savegame's loader and the reference in the same test and asserts
the same batches: torch's DataLoader for plain iteration, torchdata's
StatefulDataLoader where resuming is involved, at several positions: right after
``iter()`` before any batch, mid-epoch, right after an epoch ended, and at the
start of a later epoch. The datasets are deterministic (torchdata does not
reproduce random augmentation) and tiny; worker loaders fail within seconds if
they hang (``timeout=``).
"""

from __future__ import annotations

import copy
import itertools
import multiprocessing
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from savegame.data import DataLoader
from savegame.errors import ConfigurationError, IncompatibleStateError
from tests.unit.test_data_support import roundtrip

stateful_dataloader = pytest.importorskip(
    "torchdata.stateful_dataloader",
    reason="torchdata is not installed (pip install torchdata==0.11.0 --no-deps, plus requests and urllib3)")
StatefulDataLoader = stateful_dataloader.StatefulDataLoader

END = -1                     # a stop "right after the epoch ended" (its for loop finished)
TIMEOUT = 10                 # seconds a worker loader may wait for a batch before the test fails
LIMIT = 100                  # batches in one epoch of these tiny datasets, at most


def shard(n: int) -> list[int]:
    """This worker's items of 0..n-1 (all of them without workers)."""
    info = torch.utils.data.get_worker_info()
    wid, count = (info.id, info.num_workers) if info is not None else (0, 1)
    return list(range(wid, n, count))


def ids(batch: Any) -> list[int]:
    if isinstance(batch, int):
        return [batch]
    return batch.tolist() if isinstance(batch, torch.Tensor) else [int(x) for x in batch]


def epoch_of(iterable: Any) -> list[list[int]]:
    """The batches of one epoch as lists of ints; a loader that yields endlessly fails the test."""
    out = [ids(batch) for batch in itertools.islice(iterable, LIMIT + 1)]
    assert len(out) <= LIMIT, f"more than {LIMIT} batches in one epoch: {out[:6]}..."
    return out


def loader_kwargs(num_workers: int, persistent: bool = False, **extra: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"num_workers": num_workers, **extra}
    if num_workers:
        kwargs.update(timeout=TIMEOUT, persistent_workers=persistent)
    return kwargs


# -- datasets of the shapes StatefulDataLoader users write --------------------------------------------------


class SelfIterating(torch.utils.data.IterableDataset):
    """Its own iterator: ``__iter__`` sets up the position from get_worker_info() and returns self."""

    def __init__(self, n: int) -> None:
        self.n, self.items, self.i = n, [], 0

    def __iter__(self) -> SelfIterating:
        self.items, self.i = shard(self.n), 0
        return self

    def __next__(self) -> int:
        if self.i >= len(self.items):
            raise StopIteration
        self.i += 1
        return self.items[self.i - 1]


class StatefulSelfIterating(SelfIterating):
    """The same, with its position as its state (loaded after ``iter()``, as torchdata does)."""

    def state_dict(self) -> dict[str, int]:
        return {"i": self.i}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.i = state["i"]


class SizedSelfIterating(StatefulSelfIterating):
    """With ``__len__``, as torch allows for iterable datasets."""

    def __len__(self) -> int:
        return self.n


class OwnStatefulIterator(torch.utils.data.IterableDataset):
    """Its own stateful iterator whose ``__iter__`` does not restart it: a second pass yields nothing, as in torch."""

    def __init__(self, n: int) -> None:
        self.n, self.i = n, 0

    def __iter__(self) -> OwnStatefulIterator:
        return self

    def __next__(self) -> int:
        items = shard(self.n)
        if self.i >= len(items):
            raise StopIteration
        self.i += 1
        return items[self.i - 1]

    def state_dict(self) -> dict[str, int]:
        return {"i": self.i}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.i = state["i"]


class SharedStateDict(torch.utils.data.IterableDataset):
    """``state_dict()`` returns the dataset's own dict, which every item then changes in place."""

    def __init__(self, n: int) -> None:
        self.n, self.state = n, {"pos": 0}

    def __iter__(self) -> Iterator[int]:
        items, start = shard(self.n), self.state["pos"]
        self.state["pos"] = start
        return self._items(items, start)

    def _items(self, items: list[int], start: int) -> Iterator[int]:
        for value in items[start:]:
            self.state["pos"] += 1
            yield value
        self.state["pos"] = 0                  # the pass is over: the next one starts from the beginning

    def state_dict(self) -> dict[str, int]:
        return self.state

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.state = dict(state)


class EpochCounting(torch.utils.data.IterableDataset):
    """Counts its passes in its state; pass ``e`` yields ``100 * e + item``."""

    def __init__(self, n: int) -> None:
        self.n, self.epoch, self.pos, self.done = n, 0, 0, False

    def __iter__(self) -> Iterator[int]:
        if self.done:                          # the previous pass ran out: this iter() starts the next one
            self.epoch, self.pos, self.done = self.epoch + 1, 0, False
        return self._items(shard(self.n))

    def _items(self, items: list[int]) -> Iterator[int]:
        while self.pos < len(items):
            self.pos += 1
            yield 100 * self.epoch + items[self.pos - 1]
        self.done = True

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos, "done": self.done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.pos, self.done = state["epoch"], state["pos"], state["done"]


class SeparateIterator:
    """A stateful iterator that sets its fields in ``__iter__``: ``load_state_dict`` needs them set up."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self) -> SeparateIterator:
        self.iter_state = {"items": shard(self.n), "i": 0}
        return self

    def __next__(self) -> int:
        state = self.iter_state
        if state["i"] >= len(state["items"]):
            raise StopIteration
        state["i"] += 1
        return state["items"][state["i"] - 1]

    def state_dict(self) -> dict[str, int]:
        return {"i": self.iter_state["i"]}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.iter_state["i"] = state["i"]


class WithSeparateIterator(torch.utils.data.IterableDataset):
    """``__iter__`` returns a new, separate stateful iterator, set up by ``iter()``."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self) -> SeparateIterator:
        return iter(SeparateIterator(self.n))


class CountingIterator:
    """A separate stateful iterator that also counts, in its dataset's state, every item served."""

    def __init__(self, dataset: BothStateful) -> None:
        self.dataset, self.items, self.i = dataset, shard(dataset.n), 0

    def __iter__(self) -> CountingIterator:
        return self

    def __next__(self) -> int:
        if self.i >= len(self.items):
            raise StopIteration
        self.i += 1
        self.dataset.served += 1
        return 1000 * self.dataset.served + self.items[self.i - 1]

    def state_dict(self) -> dict[str, int]:
        return {"i": self.i}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.i = state["i"]


class BothStateful(torch.utils.data.IterableDataset):
    """Dataset and iterator each with its own state: both are saved and restored."""

    def __init__(self, n: int) -> None:
        self.n, self.served = n, 0

    def __iter__(self) -> CountingIterator:
        return CountingIterator(self)

    def state_dict(self) -> dict[str, int]:
        return {"served": self.served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.served = state["served"]


# -- running a loader and its reference side by side ---------------------------------------------------------


def run_with_states(loader: Any, epochs: int, stops: list[tuple[int, int]]) -> tuple[list[list[int]], dict]:
    """Every batch of ``epochs`` epochs, and the state at each stop (epoch, batches consumed in it, or END)."""
    batches: list[list[int]] = []
    states: dict[tuple[int, int], tuple[int, Any]] = {}
    for epoch in range(epochs):
        iterator, taken = iter(loader), 0
        while True:
            if (epoch, taken) in stops:
                states[(epoch, taken)] = (len(batches), copy.deepcopy(loader.state_dict()))
            try:
                batch = next(iterator)
            except StopIteration:
                break
            batches.append(ids(batch))
            taken += 1
            assert taken <= LIMIT, f"more than {LIMIT} batches in one epoch: {batches[:6]}..."
        if (epoch, END) in stops:
            states[(epoch, END)] = (len(batches), copy.deepcopy(loader.state_dict()))
    return batches, states


def rest_after(loader: Any, state: Any, stop: tuple[int, int], epochs: int) -> list[list[int]]:
    """The batches a fresh ``loader`` yields after loading ``state``, up to the end of epoch ``epochs - 1``."""
    loader.load_state_dict(state)
    left = epochs - stop[0] - (1 if stop[1] == END else 0)
    return [batch for _ in range(left) for batch in epoch_of(loader)]


def assert_resumes_like_torchdata(dataset: Callable[[], Any], stops: list[tuple[int, int]], epochs: int = 2,
                                  **kwargs: Any) -> None:
    """savegame and StatefulDataLoader yield the same batches, uninterrupted and resumed at every stop."""
    ours, our_states = run_with_states(DataLoader(dataset(), seed=0, **kwargs), epochs, stops)
    theirs, their_states = run_with_states(StatefulDataLoader(dataset(), **kwargs), epochs, stops)
    assert ours == theirs and our_states.keys() == their_states.keys()
    for stop, (where, state) in our_states.items():        # stops past a dataset's end are not reached
        rest = rest_after(DataLoader(dataset(), seed=0, **kwargs), roundtrip(state), stop, epochs)
        reference = rest_after(StatefulDataLoader(dataset(), **kwargs), their_states[stop][1], stop, epochs)
        assert rest == reference, f"resumed at {stop}"
        assert ours[:where] + rest == ours, f"resumed at {stop}: not the uninterrupted run"


WORKERS = [0, 2]


# -- plain iteration, no checkpoint --------------------------------------------------------------------------


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("kind", [SelfIterating, StatefulSelfIterating, OwnStatefulIterator, WithSeparateIterator])
def test_plain_iteration_yields_what_torch_yields(kind: type, workers: int) -> None:
    kwargs = loader_kwargs(workers, batch_size=2)
    check_plain_iteration(kind, kwargs)


@pytest.mark.parametrize("kwargs", [{"batch_size": None}, {"batch_size": 3, "drop_last": True}, {"batch_size": 4}],
                         ids=["unbatched", "drop_last", "short_last"])
@pytest.mark.parametrize("kind", [SelfIterating, SizedSelfIterating])
def test_plain_iteration_without_workers_in_other_batch_settings(kind: type, kwargs: dict) -> None:
    check_plain_iteration(kind, kwargs)


def check_plain_iteration(kind: type, kwargs: dict[str, Any]) -> None:
    loader = DataLoader(kind(10), seed=0, **kwargs)
    reference = torch.utils.data.DataLoader(kind(10), **kwargs)
    ours = [epoch_of(loader) for _ in range(2)]
    theirs = [epoch_of(reference) for _ in range(2)]
    assert ours == theirs


@pytest.mark.parametrize("kind", [SelfIterating, OwnStatefulIterator])
def test_plain_iteration_with_persistent_workers_yields_what_torch_yields(kind: type) -> None:
    check_plain_iteration(kind, loader_kwargs(2, persistent=True, batch_size=2))


def test_iter_is_called_once_per_epoch_in_the_main_process() -> None:
    calls = []

    class Counted(SelfIterating):
        def __iter__(self) -> SelfIterating:
            calls.append(1)
            return super().__iter__()

    loader = DataLoader(Counted(10), batch_size=1, seed=0)
    assert epoch_of(loader) == [[i] for i in range(10)]
    assert len(calls) == 1
    list(loader)
    assert len(calls) == 2


# -- resuming, against StatefulDataLoader ---------------------------------------------------------------------

STOPS = [(0, 0), (0, 2), (0, END), (1, 0), (1, 1)]
WORKER_STOPS = [(0, 0), (0, 3), (0, END)]


@pytest.mark.parametrize("kind", [StatefulSelfIterating, SizedSelfIterating, OwnStatefulIterator, SharedStateDict,
                                  EpochCounting, WithSeparateIterator, BothStateful])
def test_resume_without_workers_matches_torchdata(kind: type) -> None:
    assert_resumes_like_torchdata(lambda: kind(10), STOPS, **loader_kwargs(0, batch_size=2))


@pytest.mark.parametrize("kind", [StatefulSelfIterating, EpochCounting, WithSeparateIterator])
def test_resume_with_workers_matches_torchdata(kind: type) -> None:
    assert_resumes_like_torchdata(lambda: kind(12), WORKER_STOPS, **loader_kwargs(2, batch_size=2))


def test_an_epoch_count_in_persistent_workers_is_restored_at_an_epoch_boundary() -> None:
    assert_resumes_like_torchdata(lambda: EpochCounting(12), [(0, END), (1, 0), (1, 2)],
                                  **loader_kwargs(4, persistent=True, batch_size=1))


def test_the_state_saved_with_a_batch_is_the_state_after_that_batch() -> None:
    """A state_dict() that returns the dataset's own dict, changed in place as the worker goes on."""
    assert_resumes_like_torchdata(lambda: SharedStateDict(16), [(0, 1), (0, 2), (0, 5)],
                                  **loader_kwargs(4, persistent=True, batch_size=1))


def test_a_state_taken_before_the_first_batch_rewinds_the_same_loader() -> None:
    for cls in (DataLoader, StatefulDataLoader):
        loader = cls(OwnStatefulIterator(20), batch_size=2)
        iterator = iter(loader)
        state = copy.deepcopy(loader.state_dict())
        first = epoch_of(iterator)
        loader.load_state_dict(state)
        assert epoch_of(loader) == first and len(first) == 10, cls.__name__


# -- in_order=False -------------------------------------------------------------------------------------------


class SlowFirstWorker(torch.utils.data.IterableDataset):
    """Worker 0 holds its first item until ``release`` is set; items are 0..n-1 sharded over the workers."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.release = multiprocessing.get_context("fork").Event()

    def __iter__(self) -> Iterator[int]:
        info = torch.utils.data.get_worker_info()
        for value in shard(self.n):
            if info is not None and info.id == 0 and not self.release.wait(TIMEOUT):
                raise RuntimeError("the test never released worker 0")
            yield value


def releasing(loader: Any, dataset: SlowFirstWorker, after: int) -> list[int]:
    """Every item of one epoch; worker 0 is released once ``after`` batches have arrived."""
    out = []
    for batch in itertools.islice(loader, LIMIT):
        out.extend(ids(batch))
        if len(out) == after:
            dataset.release.set()
    return out


def test_out_of_order_yields_what_is_ready_like_torch() -> None:
    kwargs = loader_kwargs(2, batch_size=1, in_order=False, prefetch_factor=2)
    results = []
    for cls in (DataLoader, torch.utils.data.DataLoader):
        dataset = SlowFirstWorker(10)
        results.append(releasing(cls(dataset, **kwargs), dataset, after=5))
    assert results[0] == results[1] == [1, 3, 5, 7, 9, 0, 2, 4, 6, 8]


@pytest.mark.parametrize("in_order", [False, True])
def test_out_of_order_and_in_order_resume_exactly(in_order: bool) -> None:
    kwargs = loader_kwargs(2, batch_size=1, in_order=in_order, prefetch_factor=2)
    dataset = SlowFirstWorker(12)
    if in_order:
        dataset.release.set()
    loader = DataLoader(WithState(dataset), seed=0, **kwargs)
    head: list[int] = []
    for batch in loader:
        head.extend(ids(batch))
        if len(head) == 3:
            break
    state = roundtrip(loader.state_dict())
    dataset.release.set()
    fresh = SlowFirstWorker(12)
    fresh.release.set()
    resumed = DataLoader(WithState(fresh), seed=0, **kwargs)
    resumed.load_state_dict(state)
    rest = [i for batch in epoch_of(resumed) for i in batch]
    assert head == ([0, 1, 2] if in_order else [1, 3, 5])
    assert sorted(head + rest) == list(range(12)), "a batch was lost or repeated"
    for worker in (0, 1):
        assert [i for i in head + rest if i % 2 == worker] == list(range(worker, 12, 2))
    if in_order:
        assert head + rest == list(range(12))


class WithState(torch.utils.data.IterableDataset):
    """A SlowFirstWorker with its position as its state."""

    def __init__(self, inner: SlowFirstWorker) -> None:
        self.inner, self.pos = inner, 0

    def __iter__(self) -> Iterator[int]:
        items = iter(self.inner)
        for _ in range(self.pos):
            next(items)
        return self._items(items)

    def _items(self, items: Iterator[int]) -> Iterator[int]:
        for value in items:
            self.pos += 1
            yield value

    def state_dict(self) -> dict[str, int]:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.pos = state["pos"]


# -- worker start-up errors ---------------------------------------------------------------------------------


def failing_init(worker_id: int) -> None:
    raise RuntimeError(f"worker_init_fn failed in worker {worker_id}")


@pytest.mark.slow   # torch joins a worker whose worker_init_fn raised only after its 5 s timeout, per loader
def test_a_failing_worker_init_fn_raises_at_iter_like_torchdata() -> None:
    kwargs = loader_kwargs(1, batch_size=2, worker_init_fn=failing_init)
    with pytest.raises(RuntimeError, match="worker_init_fn failed"):
        iter(StatefulDataLoader(StatefulSelfIterating(10), **kwargs))
    loader = DataLoader(StatefulSelfIterating(10), seed=0, **kwargs)
    before = loader.state_dict()
    with pytest.raises(RuntimeError, match="worker_init_fn failed"):
        iter(loader)
    assert loader.state_dict() == before and loader.epoch == 0


class RefusesItsState(StatefulSelfIterating):
    def load_state_dict(self, state: dict[str, int]) -> None:
        self.i = state["position"]


@pytest.mark.parametrize("workers", WORKERS)
def test_a_refused_dataset_state_raises_at_iter_and_keeps_the_position(workers: int) -> None:
    kwargs = loader_kwargs(workers, batch_size=2)
    saved = DataLoader(StatefulSelfIterating(10), seed=0, **kwargs)
    iterator = iter(saved)
    next(iterator)
    state = roundtrip(saved.state_dict())
    loader = DataLoader(RefusesItsState(10), seed=0, **kwargs)
    loader.load_state_dict(state)
    with pytest.raises(IncompatibleStateError, match=r"the dataset \(RefusesItsState\) refused"):
        iter(loader)
    assert loader.state_dict() == state


def test_torchdatas_snapshot_interval_is_accepted_and_checked() -> None:
    kwargs = loader_kwargs(0, batch_size=2)
    loader = DataLoader(StatefulSelfIterating(10), seed=0, snapshot_every_n_steps=4, **kwargs)
    reference = StatefulDataLoader(StatefulSelfIterating(10), snapshot_every_n_steps=4, **kwargs)
    assert epoch_of(loader) == epoch_of(reference)
    with pytest.raises(ConfigurationError, match="snapshot_every_n_steps must be an int >= 1"):
        DataLoader(StatefulSelfIterating(10), snapshot_every_n_steps=0)


def test_a_torchdata_state_is_refused_with_a_clear_error() -> None:
    reference = StatefulDataLoader(StatefulSelfIterating(10), batch_size=2)
    next(iter(reference))
    with pytest.raises(IncompatibleStateError, match="not saved by savegame.DataLoader"):
        DataLoader(StatefulSelfIterating(10), batch_size=2).load_state_dict(reference.state_dict())
