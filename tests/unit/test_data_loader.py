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
)

N, BATCH, EPOCHS = 22, 4, 3           # 6 batches an epoch, the last one short
PER_EPOCH = 6
WORKERS = [dict(num_workers=0), dict(num_workers=2), dict(num_workers=2, persistent_workers=True)]
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
    head: list[Any] = []
    while len(head) < stop:
        for batch in loader:
            head.append(batch)
            if len(head) == stop:
                break
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
    resumed.load_state_dict(roundtrip(loader.state_dict()))
    assert sampler.yielded == 2 * BATCH
    rest = [b[0] for b in resumed]
    assert same_all(head + rest, full)
    assert sampler.produced == N - 2 * BATCH, "the sampler was asked only for the remaining indices"


def plain_samplers() -> dict[str, Any]:
    return {
        "RandomSampler-global": lambda d: dict(sampler=torch.utils.data.RandomSampler(d), shuffle=None),
        "RandomSampler-generator": lambda d: dict(
            sampler=torch.utils.data.RandomSampler(d, generator=torch.Generator().manual_seed(1)), shuffle=None),
        "DistributedSampler": lambda d: dict(
            sampler=torch.utils.data.DistributedSampler(d, num_replicas=2, rank=1, seed=3), shuffle=None),
        "BatchSampler": lambda d: dict(batch_sampler=torch.utils.data.BatchSampler(
            torch.utils.data.RandomSampler(d), 3, drop_last=True), batch_size=1, shuffle=None),
        "no-batching": lambda d: dict(batch_size=None),
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
    (dict(batch_size=5), r"batch_size was 4 and is now 5.*batch_size=4"),
    (dict(drop_last=True), r"drop_last was False and is now True"),
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
    assert same_all([again], [state])
    final = make(**kwargs)
    final.load_state_dict(again)
    assert same_all(reference[:2] + flatten_epochs(final, EPOCHS), reference)
