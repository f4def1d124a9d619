"""The order in which an iterable dataset's worker slots are read, and where each slot stands.

With ``in_order=True`` slots take turns in a fixed cycle, as torch reads workers:
a slot with no batches left is passed over, and the cycle may start anywhere, so
that a resumed epoch continues the round at the slot after the last one
consumed. Batches that arrive before their turn wait in a per-slot queue (at
most about one round). With ``in_order=False`` batches are handed out as they
arrive, whichever slot they come from, as torch does; a resume then continues
every slot after its own last consumed batch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from savegame.data.fetch import Produced, SlotState
from savegame.data.stream import SlotStart


class SlotMerge:
    """Yields the batches of ``source`` slot by slot, starting with slot ``next_slot`` (in order).

    ``slots`` describes where every slot stands; it is updated in place as
    batches are yielded, so it always describes the consumed position.
    """

    def __init__(self, source: Iterator[Produced], slots: list[SlotStart], next_slot: int,
                 in_order: bool = True) -> None:
        self._source = source
        self.slots = slots
        self.next_slot = next_slot % len(slots)
        self._in_order = in_order
        self._queues: list[deque[Produced]] = [deque() for _ in slots]
        self._arrivals: deque[int] = deque()            # slots of queued batches, in arrival order
        self._ended = [slot.ended for slot in slots]
        self._end_states: list[SlotState | None] = [None for _ in slots]
        self._started = [False for _ in slots]
        self._exhausted = False

    def __iter__(self) -> SlotMerge:
        return self

    def start(self) -> None:
        """Wait until every slot has set up its epoch: errors there surface now, and every state is known."""
        while not all(self._started) and not self._exhausted:
            self._pull()

    def __next__(self) -> Produced:
        slot = self._next_in_order() if self._in_order else self._next_arrived()
        if slot is None:
            raise StopIteration
        produced = self._queues[slot].popleft()
        ended = self._ended[slot] and not self._queues[slot]
        state = self._end_states[slot] if ended and self._end_states[slot] is not None else produced.state
        self.slots[slot] = SlotStart(produced.position + 1, state or SlotState(), ended)
        return produced

    def _next_in_order(self) -> int | None:
        count = len(self.slots)
        for _ in range(count):
            slot = self.next_slot
            while not self._queues[slot] and not self._ended[slot]:
                self._pull()
            self.next_slot = (slot + 1) % count
            if self._queues[slot]:
                return slot
        return None

    def _next_arrived(self) -> int | None:
        while not self._arrivals and not all(self._ended):
            self._pull()
        if not self._arrivals:
            return None
        slot = self._arrivals.popleft()
        self.next_slot = (slot + 1) % len(self.slots)
        return slot

    def _pull(self) -> None:
        try:
            produced = next(self._source)
        except StopIteration:
            self._ended = [True] * len(self.slots)
            self._exhausted = True
            return
        slot = produced.slot
        if produced.start:
            self._started[slot] = True
            if produced.state is not None and not self.slots[slot].ended:
                self.slots[slot] = SlotStart(self.slots[slot].batches, produced.state, False)
        elif produced.end:
            self._ended[slot] = True
            self._end_states[slot] = produced.state
            if not self._queues[slot]:
                self.slots[slot] = SlotStart(produced.position, produced.state or SlotState(), True)
        else:
            self._queues[slot].append(produced)
            if not self._in_order:
                self._arrivals.append(slot)
