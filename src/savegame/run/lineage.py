"""The line a run is on: after resuming from an older checkpoint, the saves past it are abandoned.

``restore(3)`` in a run that had reached step 5, then ``save(4)``: steps 4 and 5 of the
old continuation would otherwise stay "latest" and win the next ``restore()``. On the
first save after such a resume, the checkpoints past the resumed one and their lines of
the metrics history are moved, never deleted, to ``abandoned/after-<checkpoint>/``.
Each move is a rename, so a crash part-way leaves every checkpoint complete, either
still in place or moved.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from savegame.errors import StorageError
from savegame.format import names
from savegame.run.directory import RunDir
from savegame.run.history import FILE as HISTORY_FILE
from savegame.run.history import History
from savegame.storage.commit import write_new_file

log = logging.getLogger("savegame.run")

ABANDONED_DIR = names.ABANDONED_DIR


def move_aside(run: RunDir, history: History, resumed_name: str, resumed_step: int, names: Sequence[str]) -> str | None:
    """Move ``names`` and the history lines past ``resumed_step`` aside; return the folder (None: nothing to move).

    A metrics history that cannot be read is left as it is (logged): it never stops a save.
    """
    try:
        keep, past = history.split_after(resumed_step)
    except StorageError as exc:
        log.warning("%s cannot be read (%s); its lines past step %d stay in it", HISTORY_FILE, exc, resumed_step)
        keep, past = b"", b""
    if not names and not past:
        return None
    storage = run.storage
    folder = _free(run, f"{ABANDONED_DIR}/after-{resumed_name}")
    storage.makedirs(folder)
    if past:
        write_new_file(storage, f"{folder}/{HISTORY_FILE}", past)
    for name in names:
        run.forget(name)
        storage.rename(name, f"{folder}/{name}")
    storage.fsync_dir(folder)
    storage.fsync_dir("")
    if past:
        history.replace(keep)
    log.warning(
        "resumed from %s, which was not the newest: this run continues from there, so %s and %d line(s) of %s "
        "past step %d were moved to %s (nothing was deleted; they are not restored, listed or pruned any more; "
        "move them back to return to that line, or delete the folder when you no longer need it)",
        resumed_name, ", ".join(names) if names else "no checkpoint", past.count(b"\n"), HISTORY_FILE,
        resumed_step, folder)
    return folder


def _free(run: RunDir, base: str) -> str:
    folder, k = base, 0
    while run.storage.exists(folder):
        k += 1
        folder = f"{base}.{k}"
    return folder
