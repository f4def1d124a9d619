"""Addressing a run's checkpoints: ``list_checkpoints``, and what "latest", "best", a step or an address name.

One resolution serves ``Checkpointer.restore`` and ``path_of``, ``savegame.load(which=)``
and the CLI's ``RUN_DIR@which``: candidates come from :mod:`savegame.run.selection`, over
this run or, for an address, over the run directory it names.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from savegame import policies
from savegame.engine import reader
from savegame.errors import CheckpointNotFoundError, ConfigurationError, CorruptCheckpointError
from savegame.format import names as n
from savegame.run import address, selection
from savegame.run.directory import CheckpointInfo, RunDir
from savegame.run.tracking import RunTracker
from savegame.storage.base import Storage
from savegame.storage.urls import is_url, join, open_storage, split_url

log = logging.getLogger("savegame.run")


@dataclass(frozen=True)
class CheckpointEntry:
    """One committed checkpoint of a run, as :func:`list_checkpoints` returns it.

    ``aliases`` are the names that reach it (``"latest"``, ``"best"``, ``"best:val_loss"``),
    worked out from the checkpoints' own manifests; ``bytes`` is the size of its tensor data.
    """

    step: int
    epoch: int | None
    metrics: dict[str, float]
    path: str
    time: float
    bytes: int
    aliases: tuple[str, ...]
    pinned: bool


def list_checkpoints(run_dir: str | os.PathLike[str], *,
                     storage_options: Mapping[str, Any] | None = None) -> list[CheckpointEntry]:
    """Every intact checkpoint of ``run_dir`` (a path or a URL such as ``s3://bucket/runs/x``), oldest first;
    damaged ones are left out with a warning.

    A missing directory is a CheckpointNotFoundError, so a mistyped path is never an empty run.
    ``storage_options`` go to fsspec for a URL (see docs/storage.md).
    """
    if not isinstance(run_dir, (str, os.PathLike)) or not isinstance(os.fspath(run_dir), str) \
            or "\0" in os.fspath(run_dir):
        raise ConfigurationError(f"list_checkpoints(run_dir): a run directory's path (str or os.PathLike), "
                                 f"got {run_dir!r}")
    run = address.open_run(os.fspath(run_dir), storage_options)
    good = [info for info in run.infos() if _intact(run, info)]
    aliases = _aliases(good)
    return [CheckpointEntry(i.step, i.epoch, dict(i.metrics), shown(run.storage.root, i.name), i.time, i.bytes,
                            tuple(sorted(aliases.get(i.name, ()))), i.pinned) for i in good]


def candidates(which: selection.Which, run: RunDir, tracker: RunTracker) -> list[tuple[Storage, str]]:
    """Checkpoints to try for ``which``, best first: in ``run``, or in the run an address names."""
    parsed = address.split(which)
    if parsed is None:
        return selection.candidates(which, run, tracker)
    run_dir, inner = parsed
    if os.path.realpath(run_dir) == os.path.realpath(run.storage.root):
        return selection.candidates(inner, run, tracker)
    other = address.open_run(run_dir)
    return selection.candidates(inner, other, plain_tracker(other))


def resolve(run_dir: str | os.PathLike[str], which: selection.Which,
            storage_options: Mapping[str, Any] | None = None) -> str:
    """The path of the checkpoint ``which`` names in ``run_dir`` (its first readable candidate)."""
    run = address.open_run(os.fspath(run_dir), storage_options)
    found = first_readable(candidates(which, run, plain_tracker(run)))
    if found is None:
        raise not_found(which, os.fspath(run_dir))
    return found


def not_found(which: selection.Which, run_dir: str) -> CheckpointNotFoundError:
    """The error for a ``which`` that names no checkpoint: in ``run_dir``, or in the run an address names."""
    parsed = address.split(which)
    if parsed is not None:
        run_dir, which = parsed
    return CheckpointNotFoundError(f"no checkpoint {which!r} in {shown(run_dir)}")


def first_readable(found: list[tuple[Storage, str]]) -> str | None:
    """The path of the first candidate whose manifest reads (damaged ones are skipped with a warning)."""
    for storage, name in found:
        try:
            reader.read_manifest(storage, name)
        except CorruptCheckpointError as exc:
            log.warning("skipping damaged checkpoint %s: %s", name, exc)
            continue
        return shown(storage.root, name)
    return None


def shown(root: str, name: str = "") -> str:
    """The absolute path, or the URL, of ``name`` under ``root``."""
    return join(root, name).rstrip("/") if is_url(root) else os.path.join(os.path.abspath(root), name) if name \
        else os.path.abspath(root)


def locate_url(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Storage, str]:
    """(storage of the run, checkpoint name) for a checkpoint's URL, its manifest's, or a run's (its newest)."""
    url = url.rstrip("/").removesuffix(f"/{n.MANIFEST}")
    parent, name = split_url(url)
    storage = open_storage(parent, storage_options)
    if name and storage.exists(f"{name}/{n.MANIFEST}"):
        return storage, name
    run = address.open_run(url, storage_options)
    for found in selection.candidates("latest", run, plain_tracker(run)):
        try:
            reader.read_manifest(*found)
        except CorruptCheckpointError as exc:
            log.warning("skipping damaged checkpoint %s: %s", found[1], exc)
            continue
        return found
    raise CheckpointNotFoundError(f"{url!r} is not a savegame checkpoint or a run with one")


def plain_tracker(run: RunDir) -> RunTracker:
    """A tracker that only reads: "best" takes its metric and direction from the run's own manifests."""
    return RunTracker(run, keep_last=None, keep_every=None, modes={}, best_k=1, early_stopping=None)


def _intact(run: RunDir, info: CheckpointInfo) -> bool:
    try:
        problems = reader.quick_check(run.storage, info.name, reader.read_manifest(run.storage, info.name))
    except CorruptCheckpointError as exc:
        problems = [str(exc)]
    for problem in problems:
        log.warning("list_checkpoints: leaving out damaged checkpoint %s: %s", info.name, problem)
    return not problems


def _aliases(infos: list[CheckpointInfo]) -> dict[str, list[str]]:
    current = policies.latest_saves(i.record() for i in infos)
    out: dict[str, list[str]] = {}
    if current:
        out.setdefault(current[-1].name, []).append("latest")
    stored = next((i.best for i in sorted(infos, key=lambda i: i.record().step, reverse=True) if i.best), None)
    for k, (metric, held) in enumerate((stored or {}).items()):
        mode = held.get("mode") if isinstance(held, dict) else None
        ranked = policies.rank_best(current, metric, mode) if mode in policies.MODES else []
        if ranked:
            out.setdefault(ranked[0].name, []).extend(["best", f"best:{metric}"] if k == 0 else [f"best:{metric}"])
    return out


def checkpoint_path(path: str | os.PathLike[str], which: selection.Which = None,
                    storage_options: Mapping[str, Any] | None = None) -> str:
    """``path`` with ``which`` (or an address, ``"RUN_DIR@which"``) resolved to one checkpoint's path.

    Without either, ``path`` comes back as given. ``which`` with a checkpoint's own path is refused.
    """
    parsed = address.split(path)
    if parsed is not None:
        if which is not None:
            raise ConfigurationError(f"{os.fspath(path)!r} already names a checkpoint; pass which= or an address, "
                                     "not both")
        return resolve(*parsed, storage_options)
    if which is None:
        return os.fspath(path)
    return resolve(path, which, storage_options)
