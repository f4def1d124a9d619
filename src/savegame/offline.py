"""Write a checkpoint from a ready-made state tree, without live objects (migration, tools)."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

from savegame.format import codec
from savegame.format import names as n
from savegame.run_dir import RunDir, RunLock
from savegame.storage.local import LocalStorage
from savegame.writer import prepare, snapshot, write_checkpoint


def write_tree(run_dir: str | os.PathLike[str], tree: Mapping[str, Any], *, step: int, epoch: int | None = None,
               metrics: Mapping[str, float] | None = None, extra: Any = None) -> str:
    """Commit ``tree`` ({"state", "rng", "run"}) as a checkpoint of ``run_dir``; return its path.

    Takes the run directory's writer lock for the duration, so it cannot race a
    training process writing to the same directory.
    """
    storage = LocalStorage(run_dir)
    storage.makedirs("")
    lock = RunLock(storage.root)
    lock.acquire()
    try:
        run = RunDir(storage)
        name = run.unique_name(step)
        meta = {n.M_STEP: step, n.M_EPOCH: epoch, n.M_METRICS: codec.encode(dict(metrics or {}), _refuse),
                n.M_EXTRA: codec.encode(extra, _refuse), n.M_TIME: time.time(), n.M_PINNED: False}
        prepared = prepare(dict(tree), meta)
        write_checkpoint(storage, name, prepared, snapshot(prepared, None), run.commit)
        run.write_alias("latest", name)
        return os.path.join(storage.root, name)
    finally:
        lock.release()


def _refuse(tensor: Any, path: str) -> int:
    from savegame.errors import ConfigurationError

    raise ConfigurationError(f"{path or 'value'} holds a tensor; metrics and extra must be plain JSON values")
