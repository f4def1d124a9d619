"""Run addresses: ``"<run_dir>@<which>"`` names one checkpoint of any run directory.

``which`` is ``latest``, ``best``, ``best:<metric>`` or a step: ``runs/pretrain@best:val_loss``,
``runs/x@120``. A path that exists as written is never read as an address, so a
directory whose name holds an ``@`` still works.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from savegame.errors import CheckpointNotFoundError, ConfigurationError
from savegame.format import names as n
from savegame.run.directory import RunDir, parse_step
from savegame.storage.local import LocalStorage
from savegame.storage.urls import is_url, open_storage, split_url

FORMS = "'latest', 'best', 'best:<metric>' or a step"


def split(text: object) -> tuple[str, str | int] | None:
    """(run directory, which) for ``"RUN_DIR@which"``; None when ``text`` is not such an address."""
    if not isinstance(text, (str, os.PathLike)):
        return None
    raw = os.fspath(text)
    if not isinstance(raw, str):
        return None
    if "\0" in raw:
        raise ConfigurationError(f"{raw!r}: a path cannot contain a NUL character")
    head, sep, tail = raw.rpartition("@")
    if not sep or not head or os.path.exists(raw):
        return None
    if tail.isascii() and tail.isdigit() and len(tail) <= 19:  # a step: 0 to 2**63-1
        return head, int(tail)
    if tail in ("latest", "best") or (tail.startswith("best:") and len(tail) > len("best:")):
        return head, tail
    if not os.path.isdir(head):
        return None  # a missing path with an '@' in it: reported as missing by the caller
    raise ConfigurationError(f"{raw!r}: after '@' comes {FORMS} (as in 'runs/x@best:val_loss'), not {tail!r}")


def open_run(run_dir: str, storage_options: Mapping[str, Any] | None = None) -> RunDir:
    """The run directory an address names; a missing one or a checkpoint directory is refused."""
    if is_url(run_dir):
        return _open_remote(run_dir, storage_options)
    path = Path(run_dir)
    if (path / n.MANIFEST).is_file() or (path.is_dir() and parse_step(path.name) is not None):
        raise ConfigurationError(f"{run_dir!r} is a checkpoint directory, not a run directory: {FORMS} pick "
                                 f"among the checkpoints of a run directory, such as {str(path.parent)!r}; "
                                 "give the checkpoint's path alone to read that one")
    if not path.is_dir():
        raise CheckpointNotFoundError(f"no run directory {os.path.abspath(run_dir)!r}")
    return RunDir(LocalStorage(str(path)))


def _open_remote(url: str, storage_options: Mapping[str, Any] | None) -> RunDir:
    storage = open_storage(url, storage_options)
    if parse_step(split_url(url)[1]) is not None or storage.exists(n.MANIFEST):
        raise ConfigurationError(f"{url!r} is a checkpoint, not a run: {FORMS} pick among the checkpoints of a "
                                 f"run, such as {split_url(url)[0]!r}; give the checkpoint's URL alone to read that one")
    if not storage.list_dir(""):
        raise CheckpointNotFoundError(f"no run at {url!r} (nothing is stored under it)")
    return RunDir(storage)
