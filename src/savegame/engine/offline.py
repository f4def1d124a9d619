"""Write a checkpoint from a ready-made state tree, without live objects (migration, tools)."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from savegame.engine.writer import prepare, snapshot, write_checkpoint
from savegame.errors import ConfigurationError
from savegame.format import codec
from savegame.format import names as n
from savegame.run.directory import RunDir
from savegame.run.history import History
from savegame.run.lease import writer_lock
from savegame.storage.base import Storage
from savegame.storage.counting import CountingStorage
from savegame.storage.urls import join, open_storage

log = logging.getLogger("savegame.engine.offline")

Progress = Callable[[int], None]  # called with the number of bytes just written


def write_tree(run_dir: str | os.PathLike[str], tree: Mapping[str, Any], *, step: int, epoch: int | None = None,
               metrics: Mapping[str, float] | None = None, extra: Any = None,
               history: Iterable[Mapping[str, Any]] = (), progress: Progress | None = None,
               storage_options: Mapping[str, Any] | None = None) -> str:
    """Commit ``tree`` ({"state", "rng", "run"}) as a checkpoint of ``run_dir``; return its path (or URL).

    ``run_dir`` is a path or the URL of a run on an object store (``s3://bucket/runs/x``,
    with ``storage_options`` as a Checkpointer takes them); the checkpoint is committed
    as a Checkpointer commits it there. Takes the run's writer lock (a lease on object
    stores) for the duration, so it cannot race a training process writing to the same
    run, and first removes what a writer killed mid-save left there (hidden temporary
    checkpoints, unfinished uploads), as a Checkpointer does when it opens the run.
    After the commit, the run's metrics history (``metrics.jsonl``) gets the ``history`` lines (``{"step",
    "epoch", "metrics"}``, e.g. what a foreign tool logged; their ``time`` is null)
    and then this checkpoint's own line, as a Checkpointer writes it. The ``latest``
    alias moves to the new checkpoint only if it is the run's newest (highest step).
    """
    lines = [_history_line(line.get("step"), line.get("epoch"), line.get("metrics") or {}) for line in history]
    storage = open_storage(run_dir, storage_options)
    storage.makedirs("")
    lock = writer_lock(storage)
    lock.acquire()
    try:
        run = RunDir(storage)
        removed = run.commit.clean_leftovers(storage)  # safe: only the lock holder writes here
        if removed:
            log.info("removed %d leftover(s) of interrupted writes in %s: %s", len(removed), storage.root, removed)
        name = run.unique_name(step)
        now = time.time()
        meta = {n.M_STEP: step, n.M_EPOCH: epoch, n.M_METRICS: codec.encode(dict(metrics or {}), _refuse),
                n.M_EXTRA: codec.encode(extra, _refuse), n.M_TIME: now, n.M_PINNED: False, n.M_SEQ: run.next_seq()}
        prepared = prepare(dict(tree), meta)
        target = CountingStorage(storage, on_write=progress) if progress is not None else storage
        write_checkpoint(target, name, prepared, snapshot(prepared, None), run.commit)
        run.refresh()  # the listing read for next_seq() predates this checkpoint
        if lines:
            torn = _ends_torn(storage)
            storage.append(n.HISTORY_FILE, (b"\n" if torn else b"") + "".join(json.dumps(x) + "\n" for x in lines).encode())
        History(storage).append(step, epoch, {k: float(v) for k, v in (metrics or {}).items()}, now)
        if run.names()[-1] == name:
            run.write_alias("latest", name)
        return join(storage.root, name)
    finally:
        lock.release()


def _history_line(step: Any, epoch: Any, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """A foreign line of metrics.jsonl, in the Checkpointer's format (non-finite values as strings).

    Its ``time`` is null: foreign tools rarely record when they logged a value.
    """
    if type(step) is not int or step < 0 or (epoch is not None and (type(epoch) is not int or epoch < 0)):
        raise ConfigurationError(f"a history line needs a non-negative int step and epoch, got {step!r}, {epoch!r}")
    values: dict[str, float | str] = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigurationError(f"history metric {key!r} must be a number keyed by a str, got {value!r}")
        values[key] = float(value) if math.isfinite(value) else str(float(value))
    return {"step": step, "epoch": epoch, "time": None, "metrics": values}


def _ends_torn(storage: Storage) -> bool:
    """Whether the history file ends without a newline (a write torn by a crash)."""
    if not storage.exists(n.HISTORY_FILE) or storage.size(n.HISTORY_FILE) == 0:
        return False
    with storage.open_read(n.HISTORY_FILE) as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def _refuse(tensor: Any, path: str) -> int:
    raise ConfigurationError(f"{path or 'value'} holds a tensor; metrics and extra must be plain JSON values")
