"""The order in which an iterable dataset's worker slots are read: a fixed round robin.

torch reads workers round-robin starting at worker 0 on every ``iter()``. A
resumed epoch must continue the round at the slot after the last one consumed,
so the order is defined here instead: slots take turns in a cycle, a slot with
no batches left is passed over, and the cycle may start anywhere. Batches that
arrive before their turn wait in a per-slot queue (at most about one round).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from savegame.data.fetch import Produced, SlotStart


class SlotMerge:
    """Yields the batches of ``source`` slot by slot in turn, starting with slot ``next_slot``.

    ``slots`` describes where every slot stands; it is updated in place as
    batches are yielded, so it always describes the consumed position.
    """

    def __init__(self, source: Iterator[Produced], slots: list[SlotStart], next_slot: int) -> None:
        self._source = source
        self.slots = slots
        self.next_slot = next_slot % len(slots)
        self._queues: list[deque[Produced]] = [deque() for _ in slots]
        self._ended = [slot.ended for slot in slots]

    def __iter__(self) -> SlotMerge:
        return self

    def __next__(self) -> Produced:
        count = len(self.slots)
        for _ in range(count):
            slot = self.next_slot
            while not self._queues[slot] and not self._ended[slot]:
                self._pull()
            self.next_slot = (slot + 1) % count
            if self._queues[slot]:
                produced = self._queues[slot].popleft()
                ended = self._ended[slot] and not self._queues[slot]
                self.slots[slot] = SlotStart(produced.position + 1, produced.state, ended)
                return produced
        raise StopIteration

    def _pull(self) -> None:
        try:
            produced = next(self._source)
        except StopIteration:
            self._ended = [True] * len(self.slots)
            return
        if produced.end:
            self._ended[produced.slot] = True
            if not self._queues[produced.slot]:
                self.slots[produced.slot].ended = True
        else:
            self._queues[produced.slot].append(produced)
