"""The iterable-dataset part of a DataLoader state: where each worker slot stands.

Each worker slot (one per worker; one without workers) is saved as the number of
batches it produced, its state after them and whether it ran out, plus whose
turn is next. The state is split as torchdata splits it: ``state`` is the
dataset's ``state_dict()`` (when ``iter(dataset)`` returns another object) and
``iterator`` the iterator's (the dataset's own when it is its own iterator);
either is None where there is none. Between epochs the slots hold where each
slot ended the last epoch. A slot without state is resumed by reading its
consumed batches again, with a warning saying so.
"""

from __future__ import annotations

import logging
from typing import Any

from savegame.data.compat import Saved
from savegame.data.progress import Progress
from savegame.data.stream import SlotStart

log = logging.getLogger("savegame.data")


def capture(progress: Progress, num_workers: int) -> dict[str, Any]:
    """The fields of an iterable loader's state."""
    return {"num_workers": num_workers,
            "slots": [{"batches": s.batches, "state": s.state.dataset, "iterator": s.state.iterator,
                       "ended": s.ended} for s in progress.slots],
            "next_slot": progress.next_slot}


def restore(saved: Saved, progress: Progress, slot_count: int, dataset: Any) -> None:
    """Fill ``progress`` from ``saved``; warn when consumed batches will be read again."""
    fits = len(saved.slots) == slot_count
    progress.slots = saved.slots if fits else [SlotStart() for _ in range(slot_count)]
    progress.next_slot = saved.next_slot
    progress.carry_restored = fits and not saved.in_progress
    skipped = sum(s.batches for s in progress.slots if not s.state.known and not s.ended)
    if progress.in_progress and skipped:
        log.warning(
            "savegame.DataLoader: the iterable dataset %s has no state_dict()/load_state_dict() (nor has its "
            "iterator), so resuming epoch %d reads and discards the %d batches already consumed (this takes "
            "longer the further the epoch went). Implement state_dict()/load_state_dict() on the dataset to "
            "resume without re-reading.", type(dataset).__name__, progress.epoch, skipped)
