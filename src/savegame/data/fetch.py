"""What runs where the data is read: in worker processes, or in the main process with no workers.

The DataLoader hands torch's machinery these wrappers instead of the user's
dataset. Each produces whole collated batches tagged with where they belong
(:class:`Produced`), and seeds the generators for every batch from the batch's
position, so a batch's content (augmentation included) does not depend on
which process fetched it, how many workers there are, or whether the run was
resumed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data._utils.pin_memory import pin_memory

from savegame.data import seeding


class Produced:
    """One collated batch and its address: a map-style position, or a worker slot and its count.

    For an iterable dataset, ``state`` is the slot's state after this batch (a
    :class:`SlotState`), and two markers carry no batch: ``start`` comes first in
    every slot, once its epoch is set up, with the state before its next batch;
    ``end`` comes last, with the state after the dataset ran out.
    """

    __slots__ = ("batch", "end", "position", "slot", "start", "state")

    def __init__(self, batch: Any, position: int, slot: int = -1, state: SlotState | None = None,
                 end: bool = False, start: bool = False) -> None:
        self.batch, self.position, self.slot, self.state, self.end = batch, position, slot, state, end
        self.start = start

    def pin_memory(self) -> Produced:
        """Called by torch's pin-memory thread: pin the batch, keep the address."""
        batch = pin_memory(self.batch)  # type: ignore[no-untyped-call]
        return Produced(batch, self.position, self.slot, self.state, self.end, self.start)


@dataclass(frozen=True)
class SlotState:
    """What a worker slot of an iterable dataset holds at one point, as torchdata splits it.

    ``dataset`` is the dataset's ``state_dict()`` (only when ``iter(dataset)``
    returned another object), ``iterator`` that object's (or the dataset's, when
    it is its own iterator); None where there is no state.
    """

    dataset: Any = None
    iterator: Any = None

    @property
    def known(self) -> bool:
        return self.dataset is not None or self.iterator is not None


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
