"""Where a DataLoader stands in its epochs: what was consumed, and what the next ``iter()`` does.

The loader's only bookkeeping. A batch counts as consumed when it is handed to
the caller, never when it is fetched or prefetched, so a state saved at any
moment describes exactly the batches the caller has seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from savegame.data.stream import SlotStart


@dataclass
class Progress:
    """``epoch`` is the epoch in progress, or the next one to start.

    Map-style datasets count consumed batches as a contiguous prefix
    (``position``) plus, with ``in_order=False``, the positions consumed past it
    (``done``). Iterable datasets count batches per worker slot (``slots``) and
    whose turn is next (``next_slot``); ``position`` is their total. Between
    epochs, ``slots`` hold where each slot ended the last epoch.
    """

    epoch: int = 0
    in_progress: bool = False
    position: int = 0
    done: set[int] = field(default_factory=set)
    slots: list[SlotStart] = field(default_factory=list)
    next_slot: int = 0
    resume_pending: bool = False            # the next iter() continues the restored epoch
    sampler_restored: bool = False          # map: the sampler holds the restored position itself
    sampler_ended: bool = False             # map: the sampler's state is the end of a finished pass
    pending: dict[int, Any] = field(default_factory=dict)   # map: restored units drawn but not consumed
    carry_restored: bool = False            # iterable: ``slots`` are a restored epoch end, to put back before the next

    def begin(self, slot_count: int) -> bool:
        """Called by ``iter()``: True if it continues a restored epoch, else a new epoch starts here."""
        if self.resume_pending:
            self.resume_pending = False
            return True
        if self.in_progress:
            self.epoch += 1                 # the previous iterator was abandoned mid-epoch
        self._reset(slot_count)
        self.in_progress = True
        return False

    def finish(self, slot_count: int) -> None:
        """The epoch's iterator ran out: the next ``iter()`` starts the following epoch.

        An iterable dataset's slots keep their states at the end of the epoch:
        a state saved now holds them, for a restored loader to put back.
        """
        self.epoch += 1
        ended = self.slots
        self._reset(slot_count)
        self.slots = ended if len(ended) == slot_count else self.slots
        self.sampler_ended = True

    def take_carry(self) -> list[SlotStart] | None:
        """Before ``begin()``: the restored end of the previous epoch, if this ``iter()`` starts the next one."""
        carry = self.slots if self.carry_restored and not self.resume_pending else None
        self.carry_restored = False
        return carry

    def consumed_map(self, position: int) -> bool:
        """Record map-style batch ``position`` as consumed; True if the contiguous prefix grew."""
        if position != self.position:
            self.done.add(position)
            return False
        self.position += 1
        while self.position in self.done:
            self.done.remove(self.position)
            self.position += 1
        return True

    def consumed_slot(self, next_slot: int) -> None:
        """Record one more batch of an iterable dataset; ``next_slot`` is whose turn comes next."""
        self.position += 1
        self.next_slot = next_slot

    def consumed_count(self) -> int:
        """Batches of the current epoch consumed so far."""
        return self.position + len(self.done)

    def _reset(self, slot_count: int) -> None:
        self.in_progress, self.position, self.next_slot = False, 0, 0
        self.done, self.pending, self.sampler_restored, self.sampler_ended = set(), {}, False, False
        self.carry_restored = False
        self.slots = [SlotStart() for _ in range(slot_count)]
