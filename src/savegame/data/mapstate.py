"""The map-style part of a DataLoader state: the sampler's and the dataset's own states.

What is saved: the state of the sampler (or batch sampler) that has
``state_dict()``, taken once per save, with the units it yielded ahead of the
consumed batches (at most the prefetch depth); the private generators of a
sampler without state, as of the epoch start; the dataset's state, if it has one.
What is loaded is loaded all or nothing: if the sampler refuses its state, the
dataset's state is put back.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from savegame.data.compat import Saved
from savegame.data.plan import IndexSource, MapEpoch
from savegame.data.progress import Progress
from savegame.data.userstate import is_stateful, load_user

log = logging.getLogger("savegame.data")


def capture(source: IndexSource, dataset: Any, plan: MapEpoch | None, progress: Progress) -> dict[str, Any]:
    """The fields of a map-style loader's state; ``plan`` is the epoch being iterated, if any."""
    live = plan if progress.in_progress and not progress.resume_pending else None
    pending = live.outstanding() if live is not None else progress.pending
    generators = live.epoch_start_generators if live is not None else source.generator_states()
    return {
        "done": sorted(progress.done),
        "sampler": source.target.state_dict() if source.target is not None else None,
        "sampler_ended": progress.sampler_ended and not progress.in_progress,
        "pending": [[position, unit] for position, unit in sorted(pending.items())],
        "generators": list(generators),
        "dataset": dataset.state_dict() if is_stateful(dataset) else None,
    }


def restore(source: IndexSource, dataset: Any, saved: Saved, progress: Progress) -> None:
    """Load the dataset's and the sampler's states and fill ``progress``; if the sampler refuses, undo the dataset."""
    restore_dataset = saved.dataset is not None and is_stateful(dataset)
    before = copy.deepcopy(dataset.state_dict()) if restore_dataset else None
    if restore_dataset:
        load_user(dataset, saved.dataset, "dataset")
    try:
        if saved.sampler is not None and source.target is not None:
            load_user(source.target, saved.sampler, "sampler")
    except BaseException:
        if restore_dataset:
            dataset.load_state_dict(before)
        raise
    if saved.sampler is not None and source.target is None:
        log.warning("savegame.DataLoader: the checkpoint holds a sampler state but this loader's sampler has no "
                    "load_state_dict(); its order is rebuilt from the seed and epoch instead")
    source.set_generator_states(saved.generators)
    progress.done, progress.pending = saved.done, saved.pending
    progress.sampler_restored = saved.sampler is not None and source.target is not None
    progress.sampler_ended = progress.sampler_restored and saved.sampler_ended
