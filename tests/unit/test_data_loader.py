"""savegame.DataLoader over map-style datasets: exact mid-epoch resume, own randomness, refusals."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch

from savegame.data import DataLoader, ResumableSampler
from savegame.errors import IncompatibleStateError, SavegameError
from tests.unit.test_data_support import (
    Augmented,
    assert_plain,
    assert_rng_unchanged,
    flatten_epochs,
    global_rng,
    roundtrip,
    same_all,
    take,
)

N, BATCH, EPOCHS = 22, 4, 3           # 6 batches an epoch, the last one short
PER_EPOCH = 6
WORKERS = [{"num_workers": 0}, {"num_workers": 2}, {"num_workers": 2, "persistent_workers": True}]
WORKER_IDS = ["main", "workers", "persistent"]


def make(dataset: Any = None, **kwargs: Any) -> DataLoader:
    kwargs.setdefault("batch_size", BATCH)
    kwargs.setdefault("shuffle", True)
    kwargs.setdefault("seed", 11)
    return DataLoader(dataset if dataset is not None else Augmented(N), **kwargs)


@pytest.fixture(scope="module")
def reference() -> list[Any]:
    return flatten_epochs(make(), EPOCHS)


def interrupted(stop: int, save_kwargs: dict, load_kwargs: dict) -> tuple[list[Any], DataLoader]:
    """Consume ``stop`` batches, save, then resume into a fresh loader and read to the end of EPOCHS."""
    loader = make(**save_kwargs)
    head = take(loader, stop)
    state = roundtrip(loader.state_dict())
    resumed = make(**{**load_kwargs, "seed": 999})
    resumed.load_state_dict(state)
    return head + flatten_epochs(resumed, EPOCHS), resumed


def test_batches_do_not_depend_on_the_number_of_workers(reference: list[Any]) -> None:
    assert len(reference) == EPOCHS * PER_EPOCH
    for kwargs in WORKERS[1:]:
        assert same_all(flatten_epochs(make(**kwargs), EPOCHS), reference)
    assert not same_all(reference[:PER_EPOCH], reference[PER_EPOCH:2 * PER_EPOCH]), "each epoch reshuffles"


@pytest.mark.parametrize("kwargs", WORKERS, ids=WORKER_IDS)
@pytest.mark.parametrize("stop", [1, 4, PER_EPOCH, PER_EPOCH + 2])
def test_mid_epoch_resume_yields_exactly_the_remaining_batches(reference: list[Any], kwargs: dict,
                                                                stop: int) -> None:
    got, _ = interrupted(stop, kwargs, kwargs)
    assert same_all(got, reference)


@pytest.mark.parametrize(("saved", "loaded"), [(0, 1), (1, 0)], ids=["main-to-workers", "workers-to-main"])
def test_resume_with_a_different_number_of_workers_is_exact(reference: list[Any], saved: int, loaded: int) -> None:
    got, _ = interrupted(3, WORKERS[saved], WORKERS[loaded])
    assert same_all(got, reference)


def test_state_after_a_finished_epoch_starts_the_next_one(reference: list[Any]) -> None:
    loader = make()
    assert len(list(loader)) == PER_EPOCH
    state = loader.state_dict()
    assert state["in_progress"] is False and state["epoch"] == 1
    resumed = make(seed=5)
    resumed.load_state_dict(state)
    assert same_all(flatten_epochs(resumed, EPOCHS), reference[PER_EPOCH:])


def test_consumed_samples_are_not_read_again_in_the_main_process() -> None:
    loader = make()
    iterator = iter(loader)
    consumed = [next(iterator)[0] for _ in range(4)]
    dataset = Augmented(N)
    resumed = make(dataset)
    resumed.load_state_dict(loader.state_dict())
    rest = [batch[0] for batch in resumed]
    reads = dataset.read_counts()
    assert all(reads[i] == 0 for i in torch.cat(consumed).tolist())
    assert all(reads[i] == 1 for i in torch.cat(rest).tolist())
    assert sum(reads) == N - 4 * BATCH


def test_consumed_samples_are_not_read_again_by_workers() -> None:
    loader = make(num_workers=2)
    iterator = iter(loader)
    consumed = torch.cat([next(iterator)[0] for _ in range(3)]).tolist()
    dataset = Augmented(N)
    resumed = make(dataset, num_workers=2)
    resumed.load_state_dict(loader.state_dict())
    rest = torch.cat([batch[0] for batch in resumed]).tolist()
    reads = dataset.read_counts()
    assert sorted(consumed + rest) == list(range(N))
    assert [reads[i] for i in consumed] == [0] * len(consumed)
    assert [reads[i] for i in rest] == [1] * len(rest)


@pytest.mark.parametrize("kwargs", WORKERS, ids=WORKER_IDS)
def test_global_generators_are_untouched_by_iteration_and_resume(kwargs: dict) -> None:
    torch.manual_seed(0)
    loader = make(**kwargs)
    before = global_rng()
    iterator = iter(loader)
    for _ in range(3):
        next(iterator)
    state = loader.state_dict()
    list(iterator)
    assert_rng_unchanged(before)
    resumed = make(**kwargs)
    before = global_rng()
    resumed.load_state_dict(state)
    iterator = iter(resumed)
    next(iterator)
    next(iterator)
    assert_rng_unchanged(before)


def test_construction_without_a_seed_draws_once_from_the_global_torch_generator() -> None:
    torch.manual_seed(3)
    a = DataLoader(range(10), shuffle=True)
    after_a = torch.get_rng_state()
    torch.manual_seed(3)
    b = DataLoader(range(10), shuffle=True)
    assert torch.equal(after_a, torch.get_rng_state()) and a.seed == b.seed
    before = global_rng()
    DataLoader(range(10), shuffle=True, seed=4)
    DataLoader(range(10), shuffle=True, generator=torch.Generator().manual_seed(4))
    assert_rng_unchanged(before)


class CountingSampler(torch.utils.data.Sampler[int]):
    """A stateful sampler (torchdata convention): after load_state_dict, iter() resumes."""

    def __init__(self, n: int) -> None:
        self.n, self.yielded, self.resume_at, self.produced = n, 0, 0, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):  # type: ignore[no-untyped-def]
        start, self.resume_at = self.resume_at, 0
        for i in range(start, self.n):
            self.yielded = i + 1
            self.produced += 1
            yield (i * 7) % self.n

    def state_dict(self) -> dict:
        return {"yielded": self.yielded}

    def load_state_dict(self, state: dict) -> None:
        self.yielded = self.resume_at = state["yielded"]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stateful_sampler_is_restored_not_replayed(workers: int) -> None:
    full = [b[0] for b in make(sampler=CountingSampler(N), shuffle=None)]
    loader = make(sampler=CountingSampler(N), shuffle=None, num_workers=workers)
    iterator = iter(loader)
    head = [next(iterator)[0] for _ in range(2)]
    sampler = CountingSampler(N)
    resumed = make(sampler=sampler, shuffle=None, num_workers=workers)
    state = roundtrip(loader.state_dict())
    resumed.load_state_dict(state)
    ahead = sum(len(unit) for _, unit in state["pending"])     # drawn for prefetching, not consumed
    assert sampler.yielded == 2 * BATCH + ahead and (ahead > 0) == (workers > 0)
    rest = [b[0] for b in resumed]
    assert same_all(head + rest, full)
    assert sampler.produced + ahead == N - 2 * BATCH, "no consumed index was produced again"


def plain_samplers() -> dict[str, Any]:
    return {
        "RandomSampler-global": lambda d: {"sampler": torch.utils.data.RandomSampler(d), "shuffle": None},
        "RandomSampler-generator": lambda d: {
            "sampler": torch.utils.data.RandomSampler(d, generator=torch.Generator().manual_seed(1)), "shuffle": None},
        "DistributedSampler": lambda d: {
            "sampler": torch.utils.data.DistributedSampler(d, num_replicas=2, rank=1, seed=3), "shuffle": None},
        "BatchSampler": lambda d: {"batch_sampler": torch.utils.data.BatchSampler(
            torch.utils.data.RandomSampler(d), 3, drop_last=True), "batch_size": 1, "shuffle": None},
        "no-batching": lambda d: {"batch_size": None},
    }


@pytest.mark.parametrize("name", list(plain_samplers()))
def test_samplers_without_state_are_replayed_from_the_epoch_start(name: str) -> None:
    def build(**extra: Any) -> DataLoader:
        dataset = Augmented(N)
        return make(dataset, **{**plain_samplers()[name](dataset), **extra})

    def abandon_first_epoch(loader: DataLoader) -> DataLoader:
        next(iter(loader))                          # epoch 0: one batch, then abandoned
        return loader

    before = global_rng()
    reference = flatten_epochs(abandon_first_epoch(build()), EPOCHS)
    assert_rng_unchanged(before)
    loader = abandon_first_epoch(build(num_workers=2))
    iterator = iter(loader)                         # epoch 1
    head = [next(iterator), next(iterator)]
    resumed = build()
    resumed.load_state_dict(roundtrip(loader.state_dict()))
    assert resumed.epoch == 1
    assert same_all(head + flatten_epochs(resumed, EPOCHS), reference)
    if name != "no-batching":
        half = len(reference) // 2
        assert not torch.equal(reference[0][0], reference[half][0]), "epochs differ (set_epoch / fresh draws)"


class Curriculum(Augmented):
    """A map-style dataset with state of its own."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.level = 0

    def state_dict(self) -> dict:
        return {"level": self.level}

    def load_state_dict(self, state: dict) -> None:
        self.level = state["level"]


def test_a_stateful_map_dataset_is_saved_and_restored() -> None:
    loader = make(Curriculum(N))
    loader.dataset.level = 3
    state = roundtrip(loader.state_dict())
    assert state["dataset"] == {"level": 3}
    resumed = make(Curriculum(N))
    resumed.load_state_dict(state)
    assert resumed.dataset.level == 3


def test_out_of_order_workers_resume_the_missing_batches() -> None:
    loader = make(num_workers=2, in_order=False)
    iterator = iter(loader)
    head = torch.cat([next(iterator)[0] for _ in range(3)]).tolist()
    resumed = make(num_workers=2, in_order=False)
    resumed.load_state_dict(roundtrip(loader.state_dict()))
    rest = torch.cat([b[0] for b in resumed]).tolist()
    assert sorted(head + rest) == list(range(N))


@pytest.mark.parametrize(("change", "message"), [
    ({"batch_size": 5}, r"batch_size was 4 and is now 5.*batch_size=4"),
    ({"drop_last": True}, r"drop_last was False and is now True"),
    ("length", r"length was 22 and is now 23.*length=22"),
])
def test_a_changed_batch_size_or_length_mid_epoch_is_refused(change: Any, message: str) -> None:
    loader = make()
    next(iter(loader))
    changed = make(Augmented(N + 1)) if change == "length" else make(**change)
    with pytest.raises(IncompatibleStateError, match=message):
        changed.load_state_dict(loader.state_dict())


def test_a_changed_batch_size_at_an_epoch_boundary_is_accepted(caplog: pytest.LogCaptureFixture) -> None:
    loader = make()
    list(loader)
    changed = make(batch_size=5)
    with caplog.at_level(logging.WARNING, logger="savegame.data"):
        changed.load_state_dict(loader.state_dict())
    assert "batch_size was 4 and is now 5" in caplog.text
    assert changed.epoch == 1 and sorted(torch.cat([b[0] for b in changed]).tolist()) == list(range(N))


def test_a_state_from_elsewhere_is_refused() -> None:
    with pytest.raises(IncompatibleStateError, match="not saved by savegame.DataLoader"):
        make().load_state_dict({"kind": "torch.utils.data.DataLoader", "batch_size": 4})


def test_an_older_iterator_cannot_be_advanced() -> None:
    loader = make()
    first = iter(loader)
    next(first)
    iter(loader)
    with pytest.raises(SavegameError, match="superseded"):
        next(first)


def test_the_state_is_plain_and_the_loader_is_a_torch_loader() -> None:
    loader = make(num_workers=2)
    iterator = iter(loader)
    next(iterator)
    assert_plain(loader.state_dict())
    assert isinstance(loader, torch.utils.data.DataLoader) and len(loader) == PER_EPOCH
    assert isinstance(loader.sampler, ResumableSampler)


@pytest.mark.parametrize("kwargs", WORKERS[:2], ids=WORKER_IDS[:2])
def test_saving_again_right_after_a_restore_or_iter_gives_the_same_position(reference: list[Any],
                                                                            kwargs: dict) -> None:
    loader = make(**kwargs)
    iterator = iter(loader)
    next(iterator), next(iterator)
    state = roundtrip(loader.state_dict())
    resumed = make(**kwargs)
    resumed.load_state_dict(state)
    assert same_all([roundtrip(resumed.state_dict())], [state])
    iter(resumed)                                   # workers start and prefetch; nothing consumed yet
    again = roundtrip(resumed.state_dict())
    # The sampler may have run further ahead (its state and the pending units differ); the position may not.
    assert [again[k] for k in ("epoch", "in_progress", "position", "done")] == [0, True, 2, []]
    assert [p for p, _ in again["pending"]] == list(range(2, 2 + len(again["pending"])))
    final = make(**kwargs)
    final.load_state_dict(again)
    assert same_all(reference[:2] + flatten_epochs(final, EPOCHS), reference)


def consume(loader: DataLoader, count: int) -> tuple[list[Any], Any]:
    """The first ``count`` batches of a new iterator over ``loader``, and the iterator."""
    iterator = iter(loader)
    return [next(iterator) for _ in range(count)], iterator


@pytest.mark.parametrize("kwargs", WORKERS[:2], ids=WORKER_IDS[:2])
@pytest.mark.parametrize("sampler", ["resumable", "distributed"])
def test_calling_set_epoch_every_epoch_after_a_restore_repeats_nothing(kwargs: dict, sampler: str) -> None:
    """The DistributedSampler habit: ``sampler.set_epoch(epoch)`` before each epoch, with the loader's epoch."""
    def build(**extra: Any) -> DataLoader:
        if sampler == "resumable":
            return make(sampler=ResumableSampler(N, seed=11), shuffle=None, **extra)
        return make(sampler=torch.utils.data.DistributedSampler(Augmented(N), num_replicas=1, rank=0, seed=11),
                    shuffle=None, **extra)

    expected = flatten_epochs(build(), EPOCHS)
    loader = build(**kwargs)
    head, _ = consume(loader, 3)
    resumed = build(**kwargs)
    resumed.load_state_dict(roundtrip(loader.state_dict()))
    rest: list[Any] = []
    while resumed.epoch < EPOCHS:
        resumed.sampler.set_epoch(resumed.epoch)
        rest.extend(resumed)
    assert same_all(head + rest, expected)


@pytest.mark.parametrize("sampler", ["resumable", "distributed"])
def test_set_epoch_with_another_epoch_after_a_restore_does_not_move_the_loader(
        caplog: pytest.LogCaptureFixture, sampler: str) -> None:
    """The loader decides the epoch, for ResumableSampler as for DistributedSampler; it says so."""
    def build() -> DataLoader:
        if sampler == "resumable":
            return make(sampler=ResumableSampler(N, seed=11), shuffle=None)
        return make(sampler=torch.utils.data.DistributedSampler(Augmented(N), num_replicas=1, rank=0, seed=11),
                    shuffle=None)

    expected = list(build())
    loader = build()
    head, _ = consume(loader, 3)
    resumed = build()
    resumed.load_state_dict(roundtrip(loader.state_dict()))
    resumed.sampler.set_epoch(5)
    with caplog.at_level(logging.WARNING, logger="savegame.data"):
        rest = list(resumed)
    assert same_all(head + rest, expected)
    if sampler == "resumable":
        assert "set to epoch 5 after the restore, but the loader continues epoch 0" in caplog.text


class ListSampler(torch.utils.data.Sampler[int]):
    """Seed 004's example sampler: its state is the whole index list and the position (O(N) to copy).

    Counts ``state_dict()`` calls and deep copies of its index list.
    """

    def __init__(self, n: int) -> None:
        self.n, self.epoch, self.position, self.resume = n, 0, 0, False
        self.indices = CountedList(range(n))
        self.state_calls = 0

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.resume = epoch, False

    def __iter__(self):  # type: ignore[no-untyped-def]
        if not self.resume:
            self.indices = CountedList(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.epoch))
                                       .tolist())
            self.position = 0
        self.resume = False
        while self.position < self.n:
            self.position += 1
            yield self.indices[self.position - 1]

    def state_dict(self) -> dict:
        self.state_calls += 1
        return {"indices": self.indices, "position": self.position, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.indices, self.position = CountedList(state["indices"]), state["position"]
        self.epoch, self.resume = state["epoch"], True


class CountedList(list):
    copies = 0

    def __deepcopy__(self, memo: dict) -> list:
        CountedList.copies += 1
        return list(self)


@pytest.mark.parametrize("workers", [0, 2])
def test_sampler_state_is_taken_per_save_not_per_batch(workers: int) -> None:
    """A stateful sampler costs one state_dict() and one copy per save, whatever the epoch length (issue 4)."""
    counts = []
    for n in (64, 640):
        sampler = ListSampler(n)
        loader = DataLoader(range(n), batch_size=4, sampler=sampler, num_workers=workers, seed=0)
        CountedList.copies = 0
        list(loader)                                       # a whole epoch, no save
        _, iterator = consume(loader, 5)
        loader.state_dict()                                # one save, mid-epoch
        list(iterator)
        counts.append((sampler.state_calls, CountedList.copies))
    assert counts == [(1, 1), (1, 1)]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop", [0, 5, 16, 20])
def test_a_sampler_with_a_list_state_resumes_exactly(workers: int, stop: int) -> None:
    """Mid-epoch, right after iter(), and at an epoch boundary (the restored pass is run out, not repeated)."""
    def build(w: int = 0) -> DataLoader:
        return DataLoader(range(80), batch_size=4, sampler=ListSampler(80), num_workers=w, seed=0)

    expected = [b.tolist() for b in flatten_epochs(build(), 3)]
    loader = build(workers)
    head = [b.tolist() for b in flatten_epochs(loader, stop // 20)]
    partial, _ = consume(loader, stop % 20)
    head += [b.tolist() for b in partial]
    resumed = build(workers)
    resumed.load_state_dict(roundtrip(loader.state_dict()))
    assert head + [b.tolist() for b in flatten_epochs(resumed, 3)] == expected


def test_a_refused_load_changes_nothing(reference: list[Any]) -> None:
    """ResumableSampler refuses a shuffle change mid-epoch: the loader's seed, iterator, workers and dataset stay."""
    dataset = Curriculum(N)
    loader = make(dataset, num_workers=2, persistent_workers=True)
    head, iterator = consume(loader, 2)
    other = make(Curriculum(N), shuffle=False, seed=5)
    other.dataset.level = 7
    consume(other, 3)
    with pytest.raises(IncompatibleStateError, match="shuffle False -> True"):
        loader.load_state_dict(roundtrip(other.state_dict()))
    assert loader.seed == 11 and dataset.level == 0, "the dataset's state was put back"
    rest = list(iterator)                                  # the same iterator goes on
    assert same_all(head + rest + flatten_epochs(loader, EPOCHS), reference)


@pytest.mark.parametrize(("field", "value"), [
    ("seed", "abc"), ("epoch", -1), ("in_progress", "yes"), ("position", 2.5), ("batch_size", 0),
    ("drop_last", None), ("length", "22"), ("done", ["a"]), ("done", 3), ("pending", [[1]]),
    ("pending", [[0, [1, 2, 3, 4]]]), ("generators", [[1, 2, 3]]), ("sampler_ended", 1), ("kind", "graph"),
])
def test_a_malformed_state_is_refused_naming_the_field(reference: list[Any], field: str, value: Any) -> None:
    loader = make()
    head, iterator = consume(loader, 2)
    state = roundtrip(loader.state_dict())
    state[field] = value
    with pytest.raises(IncompatibleStateError, match=f"'{field}'"):
        make().load_state_dict(state)
    with pytest.raises(IncompatibleStateError, match=f"'{field}'"):
        loader.load_state_dict(state)
    assert same_all(head + list(iterator), reference[:PER_EPOCH])


@pytest.mark.parametrize("kwargs", WORKERS + [{"num_workers": 2, "in_order": False}],
                         ids=WORKER_IDS + ["out-of-order"])
def test_len_of_a_resumed_iterator_is_what_it_yields(kwargs: dict) -> None:
    loader = make(**kwargs)
    fresh = iter(loader)
    assert len(fresh) == len(loader) == PER_EPOCH
    head = [next(fresh) for _ in range(4)]
    assert len(fresh) == PER_EPOCH, "like torch's, an iterator's len() does not shrink as it is advanced"
    resumed = make(**kwargs)
    resumed.load_state_dict(roundtrip(loader.state_dict()))
    rest_iterator = iter(resumed)
    rest = list(rest_iterator)
    assert len(rest_iterator) == len(rest) == PER_EPOCH - len(head) and len(resumed) == PER_EPOCH
    assert len(iter(resumed)) == PER_EPOCH
