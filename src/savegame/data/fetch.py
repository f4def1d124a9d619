"""What runs where the data is read: in worker processes, or in the main process with no workers.

The DataLoader hands torch's machinery these wrappers instead of the user's
dataset. Each produces whole collated batches tagged with where they belong
(:class:`Produced`), and seeds the generators for every batch from the batch's
position, so a batch's content (augmentation included) does not depend on
which process fetched it, how many workers there are, or whether the run was
resumed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data._utils.pin_memory import pin_memory

from savegame.data import seeding


class Produced:
    """One collated batch and its address: a map-style position, or a worker slot and its count.

    ``end`` marks a slot of an iterable dataset that has no more batches this epoch.
    """

    __slots__ = ("batch", "end", "position", "slot", "state")

    def __init__(self, batch: Any, position: int, slot: int = -1, state: Any = None, end: bool = False) -> None:
        self.batch, self.position, self.slot, self.state, self.end = batch, position, slot, state, end

    def pin_memory(self) -> Produced:
        """Called by torch's pin-memory thread: pin the batch, keep the address."""
        batch = pin_memory(self.batch)  # type: ignore[no-untyped-call]
        return Produced(batch, self.position, self.slot, self.state, self.end)


def identity(value: Any) -> Any:
    """The collate_fn of the inner torch loader: batches arrive collated already."""
    return value


class MapFetch(torch.utils.data.Dataset[Produced]):
    """A map-style dataset indexed by tickets ``(position, seed, unit)``.

    ``unit`` is the list of indices of one batch (auto-collation) or one index.
    The user's dataset, ``__getitems__`` if it has one, and ``collate_fn`` run
    with generators seeded from ``seed``.
    """

    def __init__(self, dataset: Any, collate_fn: Callable[[Any], Any], auto_collation: bool) -> None:
        self.dataset, self.collate_fn, self.auto_collation = dataset, collate_fn, auto_collation

    def __getitem__(self, ticket: tuple[int, int, Any]) -> Produced:
        position, seed, unit = ticket
        with seeding.fetch_scope(seed):
            if not self.auto_collation:
                return Produced(self.collate_fn(self.dataset[unit]), position)
            getitems = getattr(self.dataset, "__getitems__", None)
            items = getitems(unit) if getitems else [self.dataset[i] for i in unit]
            return Produced(self.collate_fn(items), position)


@dataclass
class SlotStart:
    """Where one worker slot of an iterable dataset starts: after ``batches`` batches of its epoch.

    ``state`` is the dataset's state after those batches (None: the dataset has no
    state, so they are skipped by reading them again); ``ended`` means the slot had
    nothing left.
    """

    batches: int = 0
    state: Any = None
    ended: bool = False


@dataclass
class StreamPlan:
    """The epoch an :class:`IterStream` produces next and, when resuming, where each slot starts."""

    seed: int
    epoch: int
    slots: list[SlotStart] | None = None
    stateful: bool = False
    used: bool = False


class IterStream(torch.utils.data.IterableDataset[Produced]):
    """An iterable dataset that batches, collates and tags the user's iterable dataset per worker slot.

    A slot is the worker id (0 without workers). Batch ``n`` of a slot is produced
    with generators seeded from ``(seed, epoch, slot, n)``. With persistent workers a
    worker's copy counts epochs itself: the plan it was started with is used once,
    later ``iter()`` calls produce the following epochs from their beginning.
    """

    def __init__(self, dataset: Any, batch_size: int | None, drop_last: bool, collate_fn: Callable[[Any], Any],
                 plan: StreamPlan) -> None:
        self.dataset, self.batch_size, self.drop_last, self.collate_fn = dataset, batch_size, drop_last, collate_fn
        self.plan = plan

    def __iter__(self) -> Iterator[Produced]:
        info = torch.utils.data.get_worker_info()
        slot = info.id if info is not None else 0
        plan = self.plan
        if plan.used:
            plan = self.plan = StreamPlan(plan.seed, plan.epoch + 1, None, plan.stateful)
        plan.used = True
        start = plan.slots[slot] if plan.slots is not None else SlotStart()
        return self._produce(plan, slot, start)

    def _produce(self, plan: StreamPlan, slot: int, start: SlotStart) -> Iterator[Produced]:
        if start.ended:
            yield Produced(None, start.batches, slot, start.state, end=True)
            return
        with seeding.fetch_scope(seeding.derive(plan.seed, seeding.ITER, plan.epoch, slot)):
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(plan.epoch)
            if start.state is not None:
                self.dataset.load_state_dict(start.state)
            source = iter(self.dataset)
        count = start.batches
        skip = count if start.state is None else 0
        for n in range(count - skip, count):
            with seeding.fetch_scope(seeding.derive(plan.seed, seeding.SLOT_BATCH, plan.epoch, slot, n)):
                if not self._take(source):
                    break
        while True:
            with seeding.fetch_scope(seeding.derive(plan.seed, seeding.SLOT_BATCH, plan.epoch, slot, count)):
                items = self._take(source)
                if items is None:
                    break
                batch = self.collate_fn(items if self.batch_size is not None else items[0])
                state = self.dataset.state_dict() if plan.stateful else None
            yield Produced(batch, count, slot, state)
            count += 1
        yield Produced(None, count, slot, None, end=True)

    def _take(self, source: Iterator[Any]) -> list[Any] | None:
        """The items of the next batch, or None when the slot has no more batches."""
        wanted = 1 if self.batch_size is None else self.batch_size
        items = []
        for item in source:
            items.append(item)
            if len(items) == wanted:
                return items
        if not items or (self.drop_last and len(items) < wanted):
            return None
        return items
