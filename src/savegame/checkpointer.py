"""Checkpointer: ties capture, writing, run tracking and restore together."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from savegame import capture, reader
from savegame.errors import CheckpointNotFoundError, ConfigurationError, CorruptCheckpointError, SavegameError
from savegame.format import codec
from savegame.format import names as n
from savegame.keys import KeyReport
from savegame.policies import EarlyStopping
from savegame.preemption import SaveSchedule
from savegame.run_dir import CheckpointInfo, RunDir, RunLock, parse_step
from savegame.storage.base import Storage
from savegame.storage.local import LocalStorage
from savegame.tracking import RunTracker
from savegame.writer import BackgroundWriter, Staging, prepare, snapshot, write_checkpoint

log = logging.getLogger("savegame")

Which = int | str | os.PathLike[str] | None


@dataclass(frozen=True)
class RestoreInfo:
    """Where a restore came from; ``reports`` lists key mismatches accepted with ``strict=False``."""

    step: int
    epoch: int | None
    metrics: dict[str, float]
    extra: Any
    path: str
    reports: Mapping[str, KeyReport] | None = None


class Checkpointer:
    """Saves and restores a whole training state in a run directory.

    ``save()`` returns as soon as the caller may change the state again: the
    checkpoint holds the values at the call. With ``async_save=True`` (the
    default) the bytes are copied into reusable staging buffers and written by
    a background thread; ``wait()`` returns when every save so far is durable
    and re-raises a failed save's error.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        state: Mapping[str, Any],
        *,
        async_save: bool = True,
        keep_last: int | None = None,
        keep_every: int | None = None,
        best: Mapping[str, str] | Sequence[str] | str | None = None,
        best_k: int = 1,
        early_stopping: EarlyStopping | None = None,
        name_format: str | None = None,
        every_steps: int | None = None,
        every_seconds: float | None = None,
        save_on_signals: Sequence[int] = (),
        nan_policy: str = "allow",
        verify: bool = True,
        shard_bytes: int = 1 << 30,
        storage: Storage | None = None,
    ) -> None:
        self._objects = capture.check_objects(state)
        if nan_policy not in ("allow", "refuse"):
            raise ConfigurationError(f"nan_policy must be 'allow' or 'refuse', got {nan_policy!r}")
        if shard_bytes < 1:
            raise ConfigurationError(f"shard_bytes must be positive, got {shard_bytes!r}")
        self._check_name_format(name_format)
        self.path = os.fspath(run_dir)
        self._storage = storage or LocalStorage(self.path)
        self._storage.makedirs("")
        self._run = RunDir(self._storage)
        self._tracker = RunTracker(self._run, keep_last=keep_last, keep_every=keep_every, best=best,
                                   best_k=best_k, early_stopping=early_stopping)
        self._schedule = SaveSchedule(every_steps=every_steps, every_seconds=every_seconds, signals=save_on_signals)
        self._async, self._verify, self._nan_policy = async_save, verify, nan_policy
        self._name_format, self._shard_bytes = name_format, shard_bytes
        self._staging = Staging() if async_save else None
        self._writer = BackgroundWriter()
        self._lock = RunLock(self._storage.root)
        self._lock.acquire()
        self._closed = False
        leftovers = self._run.commit.clean_leftovers(self._storage)
        if leftovers:
            log.info("removed %d leftover(s) of interrupted saves in %s: %s", len(leftovers), self.path, leftovers)

    # -- saving -----------------------------------------------------------------------------
    def save(self, step: int, *, epoch: int | None = None, metrics: Mapping[str, Any] | None = None,
             extra: Any = None, pin: bool = False) -> str:
        """Checkpoint the state at ``step``; return the checkpoint's path (durable after ``wait()``)."""
        self._check_open()
        if type(step) is not int or step < 0:
            raise ConfigurationError(f"step must be a non-negative int, got {step!r}")
        if epoch is not None and (type(epoch) is not int or epoch < 0):
            raise ConfigurationError(f"epoch must be a non-negative int or None, got {epoch!r}")
        clean = _clean_metrics(metrics)
        if self._nan_policy == "refuse" and not all(math.isfinite(v) for v in clean.values()):
            raise ConfigurationError(f"metrics {clean} are not finite and nan_policy='refuse': this state is not saved")
        waited = self._writer.wait()
        if waited > 0.001:
            log.debug("save(%d) waited %.3f s for the previous save", step, waited)
        run_state = self._tracker.observe(step, clean)
        name = self._run.unique_name(step, self._fields(step, epoch, clean))
        now = time.time()
        meta = {n.M_STEP: step, n.M_EPOCH: epoch, n.M_METRICS: codec.encode(clean, _no_tensor),
                n.M_EXTRA: codec.encode(extra, _no_tensor, "extra"), n.M_TIME: now, n.M_PINNED: bool(pin)}
        prepared = prepare(capture.capture(self._objects, run_state), meta, self._shard_bytes)
        shards = snapshot(prepared, self._staging)
        self._schedule.saved(step)

        def job() -> None:
            write_checkpoint(self._storage, name, prepared, shards, self._run.commit)
            log.info("saved checkpoint %s (%d bytes)", name, prepared.nbytes)
            self._tracker.after_commit(CheckpointInfo(name, step, epoch, clean, extra, now, prepared.nbytes, pin))

        if self._async:
            self._writer.submit(job)
        else:
            job()
        return os.path.join(self.path, name)

    def maybe_save(self, step: int, *, epoch: int | None = None, metrics: Mapping[str, Any] | None = None,
                   extra: Any = None) -> str | None:
        """Save if one is due (every_steps / every_seconds) or a preemption signal arrived."""
        due, by_signal = self._schedule.due(step)
        if not due:
            return None
        path = self.save(step, epoch=epoch, metrics=metrics, extra=extra)
        if by_signal:
            self.wait()
            self._schedule.stop_requested = True
            log.warning("preemption signal received: saved step %d and set should_stop", step)
        return path

    @property
    def should_stop(self) -> bool:
        """True after early stopping triggered or a signal-driven save."""
        return self._schedule.stop_requested or self._tracker.should_stop

    def wait(self) -> None:
        """Block until every save so far is durable; re-raise a failed save's error."""
        self._writer.wait()

    def close(self) -> None:
        """Wait for the in-flight save, restore signal handlers and release the run lock."""
        if self._closed:
            return
        self._closed = True
        try:
            self._writer.wait()
        finally:
            self._schedule.close()
            self._lock.release()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- restoring --------------------------------------------------------------------------
    def restore(self, which: Which = "latest", *, strict: bool = True, verify: bool | None = None,
                map_location: str | torch.device | None = None, assign: bool = False) -> RestoreInfo | None:
        """Load a checkpoint into the registered objects and set every RNG.

        ``which`` is "latest" (the newest checkpoint that verifies; damaged ones
        are skipped with a warning), "best" or "best:<metric>", a step, or a
        checkpoint path. Returns None when the run directory has no checkpoint
        and ``which`` is "latest".
        """
        self._check_open()
        self._writer.wait()
        verify = self._verify if verify is None else verify
        candidates = self._candidates(which)
        if not candidates:
            if which in (None, "latest"):
                return None
            raise CheckpointNotFoundError(f"no checkpoint {which!r} in {self.path}")
        errors = []
        for storage, name in candidates:
            try:
                doc = reader.read_manifest(storage, name)
                direct = capture.targets(self._objects, doc, strict=strict, assign=assign)
                tree = reader.read_tree(storage, name, doc, verify=verify, map_location=map_location, targets=direct)
            except CorruptCheckpointError as exc:
                log.warning("skipping damaged checkpoint %s: %s", name, exc)
                errors.append(str(exc))
                continue
            return self._apply(storage, name, doc, tree, strict=strict, assign=assign)
        raise CorruptCheckpointError(f"every candidate checkpoint for {which!r} is damaged: " + " | ".join(errors))

    def _apply(self, storage: Storage, name: str, doc: Mapping[str, Any], tree: Any, *, strict: bool,
               assign: bool) -> RestoreInfo:
        if not isinstance(tree, dict):
            raise CorruptCheckpointError(f"{name}: the state tree is not a mapping")
        reports = capture.apply(self._objects, tree, strict=strict, assign=assign)
        meta = reader.decode_meta(doc)
        self._tracker.resumed(name if storage is self._storage else None, tree.get(n.TREE_RUN))
        log.info("restored checkpoint %s (step %d)", name, meta["step"])
        return RestoreInfo(meta["step"], meta["epoch"], meta["metrics"] or {}, meta["extra"],
                           os.path.join(storage.root, name), reports)

    def _candidates(self, which: Which) -> list[tuple[Storage, str]]:
        if which is None or which == "latest":
            return [(self._storage, name) for name in reversed(self._tracker.ordered_names())]
        if isinstance(which, bool):
            raise ConfigurationError(f"restore() takes 'latest', 'best', 'best:<metric>', a step or a path, not {which!r}")
        if isinstance(which, int):
            return [(self._storage, nm) for nm in reversed(self._run.names()) if parse_step(nm) == which]
        if isinstance(which, str) and (which == "best" or which.startswith("best:")):
            return [(self._storage, nm) for nm in self._tracker.best_names(which)]
        path = Path(which)
        if path.is_dir() and (path / n.MANIFEST).exists():
            return [(LocalStorage(str(path.parent)), path.name)]
        raise CheckpointNotFoundError(
            f"{which!r} is neither 'latest', 'best', 'best:<metric>', a step, nor a checkpoint directory"
        )

    # -- helpers ----------------------------------------------------------------------------
    def _fields(self, step: int, epoch: int | None, metrics: Mapping[str, float]) -> str:
        if not self._name_format:
            return ""
        try:
            text = self._name_format.format(step=step, epoch=epoch if epoch is not None else 0, **metrics)
        except (KeyError, ValueError, IndexError) as exc:
            raise ConfigurationError(f"name_format {self._name_format!r} cannot be filled: {exc!r}") from exc
        return "".join(c if c.isalnum() or c in "._=+-" else "_" for c in text)

    @staticmethod
    def _check_name_format(name_format: str | None) -> None:
        if name_format is not None and not isinstance(name_format, str):
            raise ConfigurationError(f"name_format must be a str template, got {name_format!r}")

    def _check_open(self) -> None:
        if self._closed:
            raise SavegameError("this Checkpointer is closed; create a new one")


def _clean_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise ConfigurationError(f"metrics must be a mapping of names to numbers, got {type(metrics).__name__}")
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, np.generic):
            value = value.item()
        if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigurationError(f"metric {key!r} must be a number keyed by a str, got {value!r}")
        out[key] = float(value)
    return out


def _no_tensor(tensor: torch.Tensor, path: str) -> int:
    raise ConfigurationError(f"{path or 'value'} holds a tensor; metrics and extra must be plain JSON values")
