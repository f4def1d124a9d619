"""Does a saved DataLoader state fit this loader? Clear refusals, naming what changed and what to do."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from savegame.errors import IncompatibleStateError

log = logging.getLogger("savegame.data")

VERSION = 1
_REQUIRED = ("version", "kind", "seed", "epoch", "in_progress", "position", "batch_size", "drop_last", "length")


def check(state: Any, current: Mapping[str, Any]) -> None:
    """Raise IncompatibleStateError if ``state`` cannot resume a loader whose settings are ``current``.

    ``current`` holds this loader's ``kind``, ``batch_size``, ``drop_last``,
    ``length`` and, for iterable datasets, ``num_workers``. A change that moves
    the saved position inside an epoch is refused; at an epoch boundary it is
    accepted with a warning, since the next epoch is well defined either way.
    """
    if not isinstance(state, Mapping):
        raise IncompatibleStateError(f"a savegame.DataLoader state is a mapping, got {type(state).__name__}")
    missing = [key for key in _REQUIRED if key not in state]
    if missing:
        raise IncompatibleStateError(
            f"the DataLoader state lacks {missing}: it was not saved by savegame.DataLoader "
            "(a plain torch DataLoader's state cannot resume one)"
        )
    if state["version"] != VERSION:
        raise IncompatibleStateError(
            f"DataLoader state version {state['version']!r} is not supported (this savegame reads {VERSION})"
        )
    if state["kind"] != current["kind"]:
        raise IncompatibleStateError(
            f"the checkpoint's DataLoader read a {state['kind']} dataset, this one reads a {current['kind']} dataset; "
            "restore it into a loader over the same dataset"
        )
    keys = ["batch_size", "drop_last", "length"] + (["num_workers"] if current["kind"] == "iterable" else [])
    changed = {key: (state.get(key), current[key]) for key in keys if state.get(key) != current[key]}
    if not changed:
        return
    what = ", ".join(f"{key} was {old!r} and is now {new!r}" for key, (old, new) in changed.items())
    mid_epoch = bool(state["in_progress"]) and int(state["position"]) > 0
    if mid_epoch:
        fix = " and ".join(f"{key}={old!r}" for key, (old, _) in changed.items())
        raise IncompatibleStateError(
            f"savegame.DataLoader: the checkpoint stopped after batch {state['position']} of epoch {state['epoch']}, "
            f"but {what}, so the rest of that epoch cannot be reproduced. Build the loader with {fix} to resume "
            "exactly, or resume from a checkpoint taken at an epoch boundary, where such changes are accepted."
        )
    log.warning("savegame.DataLoader: %s since the checkpoint; accepted at an epoch boundary (epoch %s starts "
                "afresh with the new settings)", what, state["epoch"])
