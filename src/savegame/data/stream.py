"""What runs where an iterable dataset is read: one stream of tagged batches per worker slot.

A slot is a worker id (0 without workers). Each slot sets up its epoch the way
torchdata's ``StatefulDataLoader`` does, so datasets and iterators written for it
work unchanged: the dataset's state is loaded, ``iter(dataset)`` is called once,
then the iterator's state is loaded; items are then drawn with ``next()`` only.
After every batch, and at both ends of the epoch, the slot's state is taken and
deep-copied where it is produced, so what travels with a batch is the state
after exactly that batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from savegame.data import seeding
from savegame.data.fetch import Produced, SlotState
from savegame.data.userstate import is_stateful, load_user, snapshot


@dataclass
class SlotStart:
    """Where one worker slot of an iterable dataset stands: after ``batches`` batches of its epoch.

    ``state`` is the slot's state after those batches (not known: the dataset and
    its iterator have no state, so a resume reads those batches again);
    ``ended`` means the slot had nothing left.
    """

    batches: int = 0
    state: SlotState = field(default_factory=SlotState)
    ended: bool = False


@dataclass
class StreamPlan:
    """The epoch an :class:`IterStream` produces next and, when resuming, where each slot starts.

    ``carry`` holds each slot's state at the end of the previous epoch, put back
    before this one starts: the objects a restored loader reads with (the
    dataset in the main process, or in persistent workers) are then the ones the
    saving run went on with.
    """

    seed: int
    epoch: int
    slots: list[SlotStart] | None = None
    carry: list[SlotStart] | None = None
    used: bool = False


class IterStream(torch.utils.data.IterableDataset[Produced]):
    """An iterable dataset that batches, collates and tags the user's iterable dataset per worker slot.

    Batch ``n`` of a slot is produced with generators seeded from ``(seed, epoch,
    slot, n)``. ``iter()`` sets the slot's epoch up at once (so that errors in
    ``set_epoch``, ``load_state_dict`` or the dataset's ``__iter__`` surface
    there) and returns its stream: a start marker, the batches, an end marker.
    With persistent workers a worker's copy counts epochs itself: the plan it was
    started with is used once, later ``iter()`` calls produce the following epochs
    from their beginning.
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
            plan = self.plan = StreamPlan(plan.seed, plan.epoch + 1)
        plan.used = True
        start = plan.slots[slot] if plan.slots is not None else SlotStart()
        carry = plan.carry[slot] if plan.carry is not None else None
        with seeding.fetch_scope(seeding.derive(plan.seed, seeding.ITER, plan.epoch, slot)):
            if carry is not None and carry.state.known:
                self._open(carry.state)         # the previous epoch's end, its iterator left unread
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(plan.epoch)
            source = self._open(start.state)
        capture = _capture(self.dataset, source)
        if start.ended:
            return iter([Produced(None, start.batches, slot, start.state, start=True),
                         Produced(None, start.batches, slot, start.state, end=True)])
        skip = 0 if start.state.known else start.batches
        ran_out = False
        for n in range(start.batches - skip, start.batches):
            with seeding.fetch_scope(seeding.derive(plan.seed, seeding.SLOT_BATCH, plan.epoch, slot, n)):
                items, ran_out = self._take(source)
            if ran_out:
                break
        return self._produce(plan, slot, source, start.batches, capture, ran_out)

    def _open(self, state: SlotState) -> Iterator[Any]:
        """Load the dataset's state, call ``iter(dataset)``, load the iterator's state: torchdata's order."""
        if state.dataset is not None:
            load_user(self.dataset, state.dataset, "dataset")
        source: Iterator[Any] = iter(self.dataset)
        if state.iterator is not None:
            load_user(source, state.iterator, "dataset's iterator" if source is not self.dataset else "dataset")
        return source

    def _produce(self, plan: StreamPlan, slot: int, source: Iterator[Any], count: int,
                 capture: Callable[[], SlotState], ran_out: bool) -> Iterator[Produced]:
        yield Produced(None, count, slot, capture(), start=True)
        while not ran_out:
            with seeding.fetch_scope(seeding.derive(plan.seed, seeding.SLOT_BATCH, plan.epoch, slot, count)):
                items, ran_out = self._take(source)
                if not items:
                    break
                batch = self.collate_fn(items if self.batch_size is not None else items[0])
                state = capture()
            yield Produced(batch, count, slot, state)
            count += 1
        yield Produced(None, count, slot, capture(), end=True)

    def _take(self, source: Iterator[Any]) -> tuple[list[Any], bool]:
        """The items of the next batch (none if it would be empty or dropped), and whether ``source`` ran out.

        Items are drawn with ``next()``: ``iter()`` is called once per epoch, as
        torch does, since an iterator's ``__iter__`` may reset its position; and
        never again after it raised StopIteration.
        """
        wanted = 1 if self.batch_size is None else self.batch_size
        items: list[Any] = []
        for _ in range(wanted):
            try:
                items.append(next(source))
            except StopIteration:
                return ([] if self.drop_last else items), True
        return items, False


def _capture(dataset: Any, source: Iterator[Any]) -> Callable[[], SlotState]:
    """How to take a slot's state, as torchdata does: the dataset's only if it is not its own iterator."""
    of_dataset = source is not dataset and is_stateful(dataset)
    of_iterator = is_stateful(source)
    if not (of_dataset or of_iterator):
        return SlotState
    return lambda: SlotState(snapshot(dataset) if of_dataset else None, snapshot(source) if of_iterator else None)
