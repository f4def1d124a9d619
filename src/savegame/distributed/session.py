"""The distributed half of :class:`savegame.Checkpointer`: save() and restore() when a process group is up.

Each step every rank must take together goes through :class:`~savegame.distributed.job.Job`
(agree / from_leader), so a refusal or failure on one rank is raised on every rank. These
functions work on the Checkpointer's own parts (its tracker, run directory, writer); they are
its job-mode methods, kept here so that checkpointer.py stays about one process.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from savegame.distributed import restore as job_restore
from savegame.distributed import save as job_save
from savegame.distributed.job import Job
from savegame.engine import reader
from savegame.errors import CorruptCheckpointError
from savegame.run import guards, listing
from savegame.run.selection import Which
from savegame.run.tracking import Pending, sized
from savegame.storage.base import Storage
from savegame.storage.urls import open_storage

if TYPE_CHECKING:
    from savegame.checkpointer import Checkpointer, RestoreInfo

log = logging.getLogger("savegame")


def save(ckpt: Checkpointer, job: Job, step: int, epoch: int | None, metrics: dict[str, float], extra: Any,
         pin: bool) -> str:
    """save() in a distributed job: rank 0 names and tracks, every rank writes its share (module
    :mod:`savegame.distributed.save`). Any rank's refusal is every rank's."""
    started = time.monotonic()

    def local() -> tuple[Pending | None, job_save.Share, dict[str, Any] | None]:
        ckpt._wait()  # a failed previous save surfaces here, on every rank (the write is collective)
        if not job.leader:
            return None, job_save.share_of(ckpt._capture(None), ckpt._per_rank, job.rank), None
        if not ckpt._continues:
            guards.check_new_run(ckpt._run.names(), listing.shown(ckpt.path))
        pending, meta = ckpt._propose(step, epoch, metrics, extra, pin)
        return pending, job_save.share_of(ckpt._capture(pending.run_state), ckpt._per_rank, job.rank), meta

    (pending, share, meta), names = job.agree(local, job.fg, f"save(step={step})",
                                              public=lambda r: r[0].info.name if r[0] else None)
    snap = job_save.snapshot(share, ckpt._staging) if ckpt._opts.async_save else share
    if pending is not None:
        ckpt._tracker.accept(pending)
    ckpt._job_stop = job.from_leader(lambda: ckpt._tracker.should_stop, job.fg, "early stopping")
    ckpt._continues = True
    ckpt._schedule.saved(step)
    lead = job_save.Leader(names[0], meta, ckpt._run.commit) if pending is not None and meta else None

    def write() -> None:
        try:
            if pending is not None:
                ckpt._tracker.settle_line(pending)
            job_save.write(job, ckpt._storage, snap, lead, ckpt._dedup)
        except BaseException:
            if pending is not None:
                ckpt._tracker.rollback()
            raise
        if pending is not None:
            log.info("saved checkpoint %s of %d ranks (durable %.2f s after save())", names[0], job.world_size,
                     time.monotonic() - started)
            ckpt._store.forget(names[0])
            ckpt._tracker.committed(sized(pending, snap.nbytes))
            ckpt._reclaim()  # every rank has written: no save of this job is in flight

    if ckpt._opts.async_save:
        ckpt._writer.submit(write)
    else:
        write()
    return os.path.join(ckpt.path, names[0])


def restore(ckpt: Checkpointer, job: Job, which: Which, objects: Mapping[str, Any], *, strict: bool,
            verify: bool, assign: bool, only: Sequence[str] | None, resplit: str) -> RestoreInfo | None:
    """restore() in a distributed job: every rank the same checkpoint, or every rank falls back together
    (module :mod:`savegame.distributed.restore`)."""
    job.agree(ckpt._wait, job.fg, "finishing the previous save")
    found = job.from_leader(lambda: [(st.root, name, st is ckpt._storage) for st, name in
                                     listing.candidates(which, ckpt._run, ckpt._tracker)],
                            job.fg, f"restore({which!r})")
    if not found:
        if which in (None, "latest"):
            log.info("no checkpoint in %s: starting from scratch", listing.shown(ckpt.path))
            ckpt._continues = True
            return None
        raise listing.not_found(which, ckpt.path)
    options = _Options(objects, strict, verify, assign, only, resplit)
    for root, name, own in found:
        info = _try(ckpt, job, ckpt._storage if own else open_storage(root, None), name, own, options)
        if info is not None:
            return info
    raise CorruptCheckpointError(f"every candidate checkpoint for {which!r} is damaged for some rank; "
                                 "see the warnings above")


@dataclass(frozen=True)
class _Options:
    objects: Mapping[str, Any]
    strict: bool
    verify: bool
    assign: bool
    only: Sequence[str] | None
    resplit: str


def _try(ckpt: Checkpointer, job: Job, storage: Storage, name: str, own: bool, o: _Options) -> RestoreInfo | None:
    """Restore checkpoint ``name`` on every rank, or None on every rank if it is damaged for any of them."""
    def manifest() -> dict[str, Any]:
        if own:
            ckpt._run.info(name)  # a manifest the run directory cannot use is damaged here too
        doc = reader.read_manifest(storage, name)
        if o.only is None and job.leader:
            ckpt._check_early_stopping(doc)
        return doc

    ok, doc = job_restore.step(job, manifest, f"checkpoint {name}")
    if not ok:
        return None
    ok, planned = job_restore.step(
        job, lambda: job_restore.plan(job, storage, name, doc, o.objects, verify=o.verify), f"reading {name}")
    if not ok:  # every step is agreed, so that all ranks reach DCP's collective load together or none does
        return None
    ok, _ = job_restore.step(job, lambda: job_restore.load(job, storage, name, planned, verify=o.verify),
                             f"reading {name}")
    if not ok:
        return None
    ok, loaded = job_restore.step(job, lambda: job_restore.finish(job, planned), f"checking {name}")
    if not ok:
        return None
    info, _ = job.agree(lambda: _apply(ckpt, job, storage, name, loaded, o), job.fg, f"restoring {name}")
    return info


def _apply(ckpt: Checkpointer, job: Job, storage: Storage, name: str, loaded: job_restore.Loaded,
           o: _Options) -> RestoreInfo:
    objects = ckpt._objects
    if loaded.others is not None:  # another world size: per-rank states are re-split, not loaded as saved
        objects = {k: v for k, v in objects.items() if k not in ckpt._per_rank}
        if o.only is None:  # first: a refused re-split leaves the model as it was
            job_restore.resplit(ckpt._objects, loaded.others, job, o.resplit)
    return ckpt._apply(storage, name, loaded.meta, loaded.tree, strict=o.strict, assign=o.assign, only=o.only,
                       objects=objects)
