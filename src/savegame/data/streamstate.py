"""The iterable-dataset part of a DataLoader state: where each worker slot stands.

Each worker slot (one per worker; one without workers) is saved as the number of
batches it produced, the dataset's state after them (None for a dataset without
state) and whether it ran out, plus whose turn is next. A dataset without state
is resumed by reading its consumed batches again, with a warning saying so.
"""

from __future__ import annotations

import logging
from typing import Any

from savegame.data.compat import Saved
from savegame.data.fetch import SlotStart
from savegame.data.progress import Progress

log = logging.getLogger("savegame.data")


def capture(progress: Progress, num_workers: int) -> dict[str, Any]:
    """The fields of an iterable loader's state."""
    return {"num_workers": num_workers,
            "slots": [{"batches": s.batches, "state": s.state, "ended": s.ended} for s in progress.slots],
            "next_slot": progress.next_slot}


def restore(saved: Saved, progress: Progress, slot_count: int, dataset: Any, stateful: bool) -> None:
    """Fill ``progress`` from ``saved``; warn when consumed batches will be read again."""
    progress.slots = saved.slots if len(saved.slots) == slot_count else [SlotStart() for _ in range(slot_count)]
    progress.next_slot = saved.next_slot
    skipped = sum(s.batches for s in progress.slots if s.state is None and not s.ended)
    if progress.in_progress and skipped and not stateful:
        log.warning(
            "savegame.DataLoader: the iterable dataset %s has no state_dict()/load_state_dict(), so resuming "
            "epoch %d reads and discards the %d batches already consumed (this takes longer the further the "
            "epoch went). Implement state_dict()/load_state_dict() on the dataset to resume without re-reading.",
            type(dataset).__name__, progress.epoch, skipped)
