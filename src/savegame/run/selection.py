"""What ``restore(which)`` means: the candidate checkpoints for "latest", "best", a step or a path, in order."""

from __future__ import annotations

import numbers
import os
from pathlib import Path

import torch

from savegame.errors import CheckpointNotFoundError, ConfigurationError
from savegame.format import names as n
from savegame.options import as_int
from savegame.run.directory import RunDir, parse_step
from savegame.run.tracking import RunTracker
from savegame.storage.base import Storage
from savegame.storage.local import LocalStorage
from savegame.storage.urls import is_url, open_storage, split_url

Which = int | str | os.PathLike[str] | None


def candidates(which: Which, run: RunDir, tracker: RunTracker) -> list[tuple[Storage, str]]:
    """(storage, checkpoint name) pairs to try, best candidate first; raises ConfigurationError for a bad ``which``.

    The run directory is listed again first: another process may have changed it since.
    """
    run.refresh()
    if which is None or which == "latest":
        return [(run.storage, name) for name in run.newest_first()]
    if isinstance(which, str) and (which == "best" or which.startswith("best:")):
        if which == "best:":
            raise ConfigurationError("restore('best:') needs a metric name after the colon, e.g. 'best:val_loss'")
        return [(run.storage, name) for name in tracker.best_names(which)]
    if isinstance(which, (str, os.PathLike)):
        return _by_path(which, run)
    if not _int_like(which):
        raise ConfigurationError(
            f"restore() takes 'latest', 'best', 'best:<metric>', a step (int) or a checkpoint path, not {which!r}")
    step = as_int(which, "restore(which)")
    return [(run.storage, name) for name in run.newest_first() if parse_step(name) == step]


def _by_path(which: str | os.PathLike[str], run: RunDir) -> list[tuple[Storage, str]]:
    if is_url(which):
        parent, name = split_url(os.fspath(which).rstrip("/").removesuffix(f"/{n.MANIFEST}"))
        storage = run.storage if parent == run.storage.root else open_storage(parent)
        if not storage.exists(f"{name}/{n.MANIFEST}"):
            raise CheckpointNotFoundError(f"{os.fspath(which)!r} is not a checkpoint (it has no {n.MANIFEST})")
        return [(storage, name)]
    path = Path(which)
    if path.name == n.MANIFEST:
        path = path.parent
    if not (path.is_dir() and (path / n.MANIFEST).exists()):
        raise CheckpointNotFoundError(
            f"{os.fspath(which)!r} is neither 'latest', 'best', 'best:<metric>', a step, nor a checkpoint directory")
    if os.path.realpath(path.parent) == os.path.realpath(run.storage.root):
        return [(run.storage, path.name)]  # one of this run's own: protected and on its line
    return [(LocalStorage(str(path.parent)), path.name)]


def _int_like(value: object) -> bool:
    return (isinstance(value, numbers.Integral) and not isinstance(value, bool)) or (
        isinstance(value, torch.Tensor) and value.dim() == 0)
