"""``Checkpointer(..., fresh=True)``: start a new run in a run directory that holds another one.

The old run's checkpoints, alias files, metrics history and retention settings are moved, never deleted,
to ``abandoned/run-<UTC time>/``. Each move is a rename, so a crash part-way leaves
every checkpoint complete, either still in place or moved.
"""

from __future__ import annotations

import logging
import time

from savegame.format import names as n
from savegame.run.directory import RunDir, alias_of_file

log = logging.getLogger("savegame.run")


def move_run_aside(run: RunDir) -> str | None:
    """Move the run in ``run`` aside; return the folder it went to (None: the directory held no run)."""
    storage = run.storage
    files = storage.list_dir("") if storage.exists("") else []
    checkpoints = run.names()
    others = [f for f in files if f in (n.HISTORY_FILE, n.SETTINGS_FILE) or alias_of_file(f) is not None]
    if not checkpoints and not others:
        return None
    base = f"{n.ABANDONED_DIR}/run-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    folder, k = base, 0
    while storage.exists(folder):
        k += 1
        folder = f"{base}.{k}"
    storage.makedirs(folder)
    for name in [*others, *checkpoints]:  # aliases first: none ever points at a moved checkpoint
        run.forget(name)
        storage.rename(name, f"{folder}/{name}")
    storage.fsync_dir(folder)
    storage.fsync_dir("")
    log.warning("fresh=True: moved the previous run of %s (%d checkpoint(s)%s) to %s; nothing was deleted",
                storage.root, len(checkpoints), f", {', '.join(others)}" if others else "", folder)
    return folder
