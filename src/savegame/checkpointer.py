"""Checkpointer: ties capture, writing, run tracking and restore together."""

from __future__ import annotations

import copy
import logging
import os
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from savegame.distributed.job import Job
from savegame.distributed.job import active as job_active
from savegame.distributed.ranks import per_rank_names
from savegame.engine import capture, reader, todevice
from savegame.engine.dedup import Dedup
from savegame.engine.finite import refuse_non_finite_metrics, refuse_non_finite_state
from savegame.engine.keys import KeyReport
from savegame.engine.writer import (
    BackgroundWriter,
    Prepared,
    Staging,
    prepare,
    snapshot,
    write_checkpoint,
)
from savegame.errors import (
    ConfigurationError,
    CorruptCheckpointError,
    SavegameError,
    StorageError,
)
from savegame.format import codec
from savegame.format import names as n
from savegame.options import Options, as_int, check_bool, clean_metrics, run_path
from savegame.policies import EarlyStopping
from savegame.run import fresh as fresh_start
from savegame.run import guards, listing
from savegame.run.directory import CheckpointInfo, RunDir
from savegame.run.lease import WriterLock, writer_lock
from savegame.run.schedule import SaveSchedule
from savegame.run.selection import Which
from savegame.run.store import ContentStore
from savegame.run.tracking import Pending, RunTracker, sized
from savegame.storage.base import Storage
from savegame.storage.urls import open_storage

log = logging.getLogger("savegame")


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
    and re-raises a failed save's error. Options are checked here, before the run
    directory is touched; a Checkpointer that is garbage-collected without
    ``close()`` releases its lock.

    A run directory holds one run: the first ``save()`` of a Checkpointer that has not
    called ``restore()`` refuses to join checkpoints already there, and ``fresh=True``
    moves them aside into ``abandoned/`` (nothing is deleted) to start a new run.

    ``compression="zstd"`` (``pip install 'savegame[zstd]'``) stores each tensor zstd-compressed
    where that saves space, losslessly; off by default, since on a local disk it makes a save
    durable later (docs/guide.md, BENCHMARKS.md). Not in distributed jobs yet.

    ``run_dir`` may be the URL of an object store (``s3://bucket/runs/x``, any fsspec URL), with
    ``storage_options`` for fsspec and ``lease_seconds`` for the writer's lease (docs/storage.md).
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
        save_on_signals: int | Sequence[int] = (),
        nan_policy: str = "allow",
        verify: bool = True,
        shard_bytes: int = 1 << 30,
        storage: Storage | None = None,
        storage_options: Mapping[str, Any] | None = None,
        fresh: bool = False,
        per_rank: Sequence[str] = (),
        collective_timeout: float = 300.0,
        incremental: bool = False,
        compression: str | None = None,
    ) -> None:
        self._closed = True  # until construction completes
        self._opts = Options(
            async_save=async_save, keep_last=keep_last, keep_every=keep_every, best=best, best_k=best_k,
            early_stopping=early_stopping, name_format=name_format, every_steps=every_steps,
            every_seconds=every_seconds, save_on_signals=save_on_signals, nan_policy=nan_policy, verify=verify,
            shard_bytes=shard_bytes, storage=storage, fresh=fresh, per_rank=per_rank,
            collective_timeout=collective_timeout, incremental=incremental, compression=compression)
        self._objects = capture.check_objects(state)
        self.path = run_path(run_dir)
        if compression is not None and job_active():
            raise ConfigurationError("compression is not supported for distributed jobs yet; "
                                     "leave compression=None under torchrun")
        self._job = Job(self._opts.collective_timeout) if job_active() else None
        self._per_rank = per_rank_names(self._objects, self._opts.per_rank)
        self._storage: Storage = self._opts.storage or open_storage(self.path, storage_options)
        self._lock = writer_lock(self._storage)  # a file lock, or a lease on object stores
        self._job_stop = False  # in a job: rank 0's early-stopping decision, as of the last save
        if self._job is None:
            self._take_run()
        else:  # rank 0 owns the run directory; every rank learns whether it could take it
            job = self._job
            try:
                job.agree(lambda: self._take_run() if job.leader else self._open(), job.fg,
                          "opening the run directory")
            except BaseException:
                self._lock.release()
                raise
        self._finalizer = weakref.finalize(self, _release, self._lock, self._schedule)
        self._finalizer.atexit = False  # at exit the kernel releases the lock after the writer drained
        self._closed = False

    def _take_run(self) -> None:
        self._storage.makedirs("")
        self._lock.acquire()  # first: nothing else is set up unless this process owns the run directory
        try:
            self._open()
            leftovers = self._run.commit.clean_leftovers(self._storage)
            if leftovers:
                log.info("removed %d leftover(s) of interrupted saves in %s: %s", len(leftovers), self.path,
                         leftovers)
            self._reclaim()
            if self._opts.fresh:
                fresh_start.move_run_aside(self._run)
        except BaseException:
            self._lock.release()
            raise

    def _open(self) -> None:
        opts = self._opts
        self._run = RunDir(self._storage)
        self._tracker = RunTracker(self._run, keep_last=opts.keep_last, keep_every=opts.keep_every,
                                   modes=opts.modes, best_k=opts.best_k, early_stopping=opts.early_stopping)
        self._staging = Staging() if opts.async_save else None
        self._writer = BackgroundWriter()
        self._schedule = SaveSchedule(every_steps=opts.every_steps, every_seconds=opts.every_seconds,
                                      signals=opts.signals)
        self._watched = guards.monitored(opts.modes, opts.early_stopping)
        self._continues = opts.fresh  # False until restore() (or fresh=True): guards a new run mixed into an old one
        self._resumed: tuple[int, str] | None = None  # (step, name) restored from this run directory
        self._store = ContentStore(self._storage)
        self._dedup = Dedup() if opts.incremental else None
        self._seeded = False  # whether the content index was taken from the run's newest checkpoint

    # -- saving -----------------------------------------------------------------------------
    def save(self, step: int, *, epoch: int | None = None, metrics: Mapping[str, Any] | None = None,
             extra: Any = None, pin: bool = False) -> str:
        """Checkpoint the state at ``step``; return the checkpoint's path (durable after ``wait()``).

        Nothing is recorded (best, early stopping, schedule) unless the save is accepted:
        a bad argument or value raises before anything changes. Saving a step again
        replaces its earlier save (deleted after the new one commits, unless pinned).
        """
        self._check_open()
        step = as_int(step, "step")
        epoch = None if epoch is None else as_int(epoch, "epoch")
        check_bool(pin, "pin")
        clean = clean_metrics(metrics)
        if self._opts.nan_policy == "refuse":
            refuse_non_finite_metrics(clean)
        guards.check_monitored(clean, self._watched)
        guards.check_step(step, self._resumed)
        if self._job is not None:
            from savegame.distributed import session
            return session.save(self, self._job, step, epoch, clean, extra, pin)
        self._wait()
        if not self._continues:
            guards.check_new_run(self._run.names(), listing.shown(self.path))
        started = time.monotonic()
        pending, prepared = self._prepare(step, epoch, clean, extra, pin)
        if self._dedup is not None:
            self._seed()
            prepared.reuse = self._dedup.apply(prepared.plan, self._opts.shard_bytes, self._storage.size)
        shards = snapshot(prepared, self._staging)
        self._tracker.accept(pending)  # accepted: from here on only the write can fail
        self._continues = True
        where = listing.shown(self.path, pending.info.name)
        self._schedule.saved(step)

        def job() -> None:
            try:
                self._tracker.settle_line(pending)
                body = write_checkpoint(self._storage, pending.info.name, prepared, shards, self._run.commit)
            except BaseException:
                self._tracker.rollback()
                if self._dedup is not None:
                    self._dedup.forget()
                raise
            log.info("saved checkpoint %s (%d bytes, durable %.2f s after save())", where, prepared.nbytes,
                     time.monotonic() - started)
            if self._dedup is not None:
                self._dedup.committed(body, prepared.plan, shards)
            self._store.remember(pending.info.name, body[n.M_FILES])
            self._tracker.committed(sized(pending, prepared.nbytes))
            self._reclaim()

        if self._opts.async_save:
            self._writer.submit(job)
        else:
            job()
        return os.path.join(self.path, pending.info.name)

    def _seed(self, restored: Mapping[str, Any] | None = None) -> None:
        """Once: take the content index of the checkpoint ``restored`` from this run, else of the run's newest
        readable checkpoint (a resumed run references what it already stored). Never a checkpoint restore()
        skipped as damaged: a later save would reference its damaged bytes (say, after training reproduced
        them exactly from the older checkpoint)."""
        if self._seeded or self._dedup is None:
            return
        self._seeded = True
        if restored is not None:
            self._dedup.seed(restored)
            return
        for name in self._run.newest_first():
            try:
                self._dedup.seed(reader.read_manifest(self._storage, name))
                return
            except CorruptCheckpointError:
                continue

    def _reclaim(self) -> None:
        """Sweep the content store (see :mod:`savegame.run.store`); a failure is logged, the next sweep retries."""
        try:
            self._store.sweep()
        except StorageError as exc:
            log.warning("the content store of %s could not be swept (%s); the next save retries", self.path, exc)

    def _prepare(self, step: int, epoch: int | None, metrics: dict[str, float], extra: Any,
                 pin: bool) -> tuple[Pending, Prepared]:
        """Name the checkpoint, work out its run state and encode everything; raises before any change."""
        pending, meta = self._propose(step, epoch, metrics, extra, pin)
        prepared = prepare(self._capture(pending.run_state), meta, self._opts.shard_bytes,
                           rng_apart=not self._opts.incremental)
        prepared.compression = self._opts.compression
        return pending, prepared

    def _propose(self, step: int, epoch: int | None, metrics: dict[str, float], extra: Any,
                 pin: bool) -> tuple[Pending, dict[str, Any]]:
        """The checkpoint's name, run state and manifest members; nothing changes yet."""
        abandon = self._tracker.ahead()
        name = self._run.unique_name(step, self._fields(step, epoch, metrics), freed=frozenset(abandon))
        info = CheckpointInfo(name, step, epoch, metrics, extra, time.time(), pinned=pin)
        pending = self._tracker.propose(info, abandon)
        meta = {n.M_STEP: step, n.M_EPOCH: epoch, n.M_METRICS: codec.encode(metrics, _no_tensor),
                n.M_EXTRA: codec.encode(extra, _no_tensor, "extra"), n.M_TIME: info.time, n.M_PINNED: pin,
                n.M_SEQ: pending.info.seq}
        return pending, meta

    def _capture(self, run_state: Any) -> dict[str, Any]:
        tree = capture.capture(self._objects, run_state)
        if self._opts.nan_policy == "refuse":
            refuse_non_finite_state(tree[n.TREE_STATE])
        return tree

    def maybe_save(self, step: int, *, epoch: int | None = None, metrics: Mapping[str, Any] | None = None,
                   extra: Any = None) -> str | None:
        """Save if one is due (every_steps / every_seconds) or a preemption signal arrived.

        After a signal-driven save, which is durable when this returns, ``should_stop`` is
        True. If that save fails, its error is raised and the next call tries again.
        """
        self._check_open()
        due, sig = self._schedule.due(step)
        if self._job is not None and self._schedule.needs_agreement:  # time and signals differ between ranks
            votes = self._job.gather((due, sig), self._job.fg)
            due = any(d for d, _ in votes)
            sig = next((g for _, g in votes if g is not None), None)
        if not due:
            return None
        try:
            path = self.save(step, epoch=epoch, metrics=metrics, extra=extra)
            if sig is not None:
                self.wait()
        except BaseException:
            if sig is not None:
                self._schedule.rearm(sig)
            raise
        if sig is not None:
            self._schedule.stop_requested = True
            log.warning("preemption signal %d received: saved step %d and set should_stop", sig, step)
        return path

    @property
    def should_stop(self) -> bool:
        """True after early stopping triggered or a signal-driven save."""
        stop = self._job_stop if self._job is not None else self._tracker.should_stop
        return self._schedule.stop_requested or stop

    def wait(self) -> None:
        """Block until every save so far is durable; re-raise a failed save's error."""
        self._wait()

    def _wait(self) -> None:
        waited = self._writer.wait()
        if waited > 0.001:
            log.debug("waited %.3f s for the previous save", waited)

    def close(self) -> None:
        """Wait for the in-flight save, free the staging buffers, restore signal handlers, release the lock."""
        if self._closed:
            return
        self._closed = True
        try:
            self._writer.wait()
        finally:
            if self._staging is not None:
                self._staging.release()  # page-locked memory goes back now, not at exit
            self._finalizer()
            if self._job is not None:
                self._job.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- restoring --------------------------------------------------------------------------
    def restore(self, which: Which = "latest", *, strict: bool = True, verify: bool | None = None,
                map_location: str | torch.device | None = None, assign: bool = False,
                only: Sequence[str] | None = None, resplit: str = "exact") -> RestoreInfo | None:
        """Load a checkpoint into the registered objects and set every RNG.

        ``which`` is "latest" (the newest checkpoint that verifies; damaged ones
        are skipped with a warning), "best" or "best:<metric>", a step, a
        checkpoint path, or ``"<run_dir>@<which>"`` for a checkpoint of another run.
        Returns None when the run directory has no checkpoint and ``which`` is "latest".
        ``only=[names]`` restores just those states (``strict`` for them) and leaves every
        other object, the RNGs and this run's bookkeeping as they are.

        In a distributed job every rank calls it and every rank restores the same
        checkpoint (see docs/distributed.md); ``resplit="approximate"`` accepts per-rank
        states that cannot be re-split exactly for a new number of ranks.
        """
        self._check_open()
        if resplit not in ("exact", "approximate"):
            raise ConfigurationError(f"resplit must be 'exact' or 'approximate', got {resplit!r}")
        for arg, value in (("strict", strict), ("assign", assign)):
            check_bool(value, arg)
        verify = self._opts.verify if verify is None else check_bool(verify, "verify")
        device = reader.device_of(map_location)  # a bad or absent device is refused before anything is read
        if device is not None and device.type == "meta":
            raise ConfigurationError(
                "restore(map_location='meta'): meta tensors hold no data, so nothing could be restored; "
                "use savegame.load(path, map_location='meta') to look at shapes, or restore a meta-device "
                "model with map_location=None and assign=True")
        objects = guards.only_objects(self._objects, only)
        if self._job is not None:
            from savegame.distributed import session
            return session.restore(self, self._job, which, objects, strict=strict, verify=verify, assign=assign,
                                        only=only, resplit=resplit)
        self._wait()
        candidates = listing.candidates(which, self._run, self._tracker)
        if not candidates:
            if which in (None, "latest"):
                log.info("no checkpoint in %s: starting from scratch", listing.shown(self.path))
                self._continues = True
                return None
            raise listing.not_found(which, self.path)
        errors = []
        for storage, name in candidates:
            try:  # everything is decoded and checked before the first byte reaches a live object
                if storage is self._storage:
                    self._run.info(name)  # a manifest the run directory cannot use is damaged here too
                doc = reader.read_manifest(storage, name)
                meta = reader.decode_meta(doc)
                if only is None:  # with only=, early stopping stays this run's own and is not loaded
                    self._check_early_stopping(doc)
                direct = capture.targets(objects, doc, strict=strict, assign=assign, only=only)
                follow = None if map_location is None else todevice.module_tensors(objects, doc)
                tree = reader.read_tree(storage, name, doc, verify=verify, map_location=map_location, targets=direct,
                                        follow=follow)
            except CorruptCheckpointError as exc:
                log.warning("skipping damaged checkpoint %s: %s", name, exc)
                errors.append(str(exc))
                continue
            info = self._apply(storage, name, meta, tree, strict=strict, assign=assign, only=only)
            if storage is self._storage and only is None:
                self._seed(doc)  # the checkpoint just read and checked, not a newer one that was skipped as damaged
            return info
        raise CorruptCheckpointError(f"every candidate checkpoint for {which!r} is damaged: " + " | ".join(errors))

    def _apply(self, storage: Storage, name: str, meta: Mapping[str, Any], tree: Mapping[str, Any], *, strict: bool,
               assign: bool, only: Sequence[str] | None = None,
               objects: Mapping[str, Any] | None = None) -> RestoreInfo:
        objects = guards.only_objects(self._objects if objects is None else objects, only)
        reports = capture.apply(objects, tree, strict=strict, assign=assign, only=only, restore_rng=only is None)
        own = self._run.info(name) if storage is self._storage else None
        if only is None:
            self._tracker.resumed(own, tree.get(n.TREE_RUN))
            if own is not None:  # continuing this run: its next saves go on from this step
                self._continues, self._resumed = True, (own.step, own.name)
        log.info("restored checkpoint %s (step %d%s)", listing.shown(storage.root, name),
                 meta["step"], f", states {list(only)} only" if only is not None else "")
        return RestoreInfo(meta["step"], meta["epoch"], meta["metrics"] or {}, meta["extra"],
                           os.path.join(storage.root, name), reports)

    def _check_early_stopping(self, doc: Mapping[str, Any]) -> None:
        """Refuse (IncompatibleStateError) an early-stopping state this run's EarlyStopping would refuse,
        by trying it on a copy, before anything loads."""
        stopping, tree = self._tracker.early_stopping, doc.get(n.M_TREE)
        run = codec.decode(tree.get(n.TREE_RUN), ()) if isinstance(tree, dict) else None  # it holds no tensors
        saved = run.get("early_stopping") if isinstance(run, dict) else None
        if stopping is not None and isinstance(saved, Mapping):
            copy.deepcopy(stopping).load_state_dict(saved)

    # -- helpers ----------------------------------------------------------------------------
    def _fields(self, step: int, epoch: int | None, metrics: Mapping[str, float]) -> str:
        fmt = self._opts.name_format
        if not fmt:
            return ""
        try:
            text = fmt.format(step=step, epoch=epoch if epoch is not None else 0, **metrics)
        except (KeyError, ValueError, IndexError, AttributeError, TypeError) as exc:
            raise ConfigurationError(f"name_format {fmt!r} cannot be filled with step, epoch and metrics "
                                     f"{sorted(metrics)}: {exc!r}") from exc
        return "".join(c if c.isalnum() or c in "._=+-" else "_" for c in text)

    def path_of(self, which: Which = "latest") -> str | None:
        """The path of the checkpoint ``which`` names ("latest", "best", "best:<metric>", a step,
        ``"<run_dir>@<which>"``), as ``restore(which)`` would pick it; None if there is none.

        Waits for the save in flight first, so "latest" includes it.
        """
        self._check_open()
        self._wait()
        return listing.first_readable(listing.candidates(which, self._run, self._tracker))

    def _check_open(self) -> None:
        if self._closed:
            raise SavegameError("this Checkpointer is closed; create a new one")


def _release(lock: WriterLock, schedule: SaveSchedule) -> None:
    """close(), or the garbage collector for a Checkpointer never closed: hand back the lock and handlers."""
    try:
        schedule.close()
    finally:
        lock.release()


def _no_tensor(tensor: torch.Tensor, path: str) -> int:
    raise ConfigurationError(f"{path or 'value'} holds a tensor; metrics and extra must be plain JSON values")
