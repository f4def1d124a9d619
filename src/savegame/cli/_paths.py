"""Finding checkpoints from command-line paths, and writing output files atomically (never through a link)."""

from __future__ import annotations

import os
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from savegame.cli._app import CliError
from savegame.errors import ConfigurationError, StorageError
from savegame.format import names as n
from savegame.run import address, listing
from savegame.run.directory import RunDir, parse_step
from savegame.storage.base import Storage
from savegame.storage.local import LocalStorage, kind_of
from savegame.storage.urls import is_url, open_storage


class CheckpointArg(click.ParamType):  # type: ignore[type-arg]
    """A checkpoint argument: a path that exists, or an address ``RUN_DIR@latest|best|best:<metric>|<step>``."""

    name = "checkpoint"

    def __init__(self, *, file_okay: bool = True) -> None:
        self.file_okay = file_okay

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text: str = os.fspath(value)
        if is_url(text):  # an object store: checked when it is read
            return text
        if not self.file_okay and os.path.isfile(text):
            self.fail(f"{text!r} is a file; give a checkpoint directory, a run directory or RUN_DIR@which", param, ctx)
        try:
            if os.path.exists(text) or address.split(text) is not None:
                return text
        except ConfigurationError as exc:
            self.fail(str(exc), param, ctx)
        self.fail(f"{text!r} does not exist (a checkpoint, a run directory, or RUN_DIR@latest, @best, "
                  "@best:<metric>, @<step>)", param, ctx)


CHECKPOINT = CheckpointArg()


class RunDirArg(click.Path):
    """A run directory that exists, or the URL of a run on an object store (``s3://bucket/runs/x``)."""

    def __init__(self) -> None:
        super().__init__(exists=True, file_okay=False)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return value if is_url(value) else super().convert(value, param, ctx)


RUN_DIR = RunDirArg()


def locate(path: str) -> tuple[Storage, str]:
    """(storage of the run directory, checkpoint name) for a checkpoint dir, its manifest, a run dir (newest)
    or an address (``RUN_DIR@best:val_loss``); the same for URLs."""
    path = listing.checkpoint_path(path)
    if is_url(path):
        return listing.locate_url(path)
    p = Path(os.path.abspath(path))
    if p.name == n.MANIFEST:
        p = p.parent
    if (p / n.MANIFEST).is_file() or (p.is_dir() and parse_step(p.name) is not None):
        return LocalStorage(str(p.parent)), p.name
    if p.is_dir():
        if RunDir(LocalStorage(str(p))).names():
            newest = Path(listing.resolve(str(p), "latest"))  # commit order; a damaged newest one is skipped
            return LocalStorage(str(newest.parent)), newest.name
        raise CliError(f"{path}: no savegame checkpoint in this directory")
    if p.exists():
        raise CliError(f"{path}: not a savegame checkpoint directory or run directory")
    raise CliError(f"{path}: no such file or directory")


def require_run_dir(path: str) -> None:
    """Refuse a checkpoint directory where a run directory is meant, naming the run directory."""
    if is_checkpoint_dir(path):
        parent = os.path.dirname(os.path.abspath(path.rstrip("/\\")))
        raise CliError(f"{path} is a checkpoint directory, not a run directory; "
                       f"its run directory is {parent}")


def is_checkpoint_dir(path: str) -> bool:
    if is_url(path):
        return open_storage(path).exists(n.MANIFEST)
    p = Path(os.path.abspath(path))
    return (p / n.MANIFEST).is_file() or (p.is_dir() and parse_step(p.name) is not None)


def checkpoint_bytes(storage: Storage, name: str) -> int:
    """Bytes of the files of checkpoint ``name``: on disk, or in the object store."""
    if not is_url(storage.root):
        return disk_bytes(os.path.join(storage.root, name))
    try:
        return sum(storage.size(f"{name}/{file}") for file in storage.list_dir(name))
    except StorageError:
        return 0


def disk_bytes(directory: str) -> int:
    """Bytes of the files directly in ``directory`` (a checkpoint has no subdirectories); 0 for a link."""
    if os.path.islink(directory):
        return 0
    try:
        return sum(e.stat().st_size for e in os.scandir(directory) if e.is_file(follow_symlinks=False))
    except OSError:
        return 0


def check_output(target: str) -> str:
    """``target`` as an absolute path, if it names nothing yet or a regular file (to replace); else a CliError.

    A directory, a symbolic link, a FIFO or a device node is never replaced: the
    message says what is there.
    """
    final = os.path.abspath(target)
    try:
        mode = os.lstat(final).st_mode
    except FileNotFoundError:
        return final
    except OSError as exc:
        raise CliError(f"{target}: cannot be checked ({exc.strerror or exc})") from exc
    if not stat.S_ISREG(mode):
        raise CliError(f"{target} is {kind_of(mode)}; only a regular file is replaced: choose a new file name, "
                       "or remove it first")
    return final


@contextmanager
def atomic_output(target: str) -> Iterator[str]:
    """Yield a temporary path next to ``target``; on success it replaces ``target`` durably, else it goes.

    ``target`` must name nothing yet or a regular file (see :func:`check_output`),
    checked before and again right before the replacement.
    """
    final = check_output(target)
    directory = os.path.dirname(final)
    if not os.path.isdir(directory):
        raise CliError(f"{target}: the directory {directory!r} does not exist")
    tmp = os.path.join(directory, f".{os.path.basename(final)}.{uuid.uuid4().hex[:8]}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies, as for any new file
    mode = os.stat(tmp).st_mode & 0o777
    try:
        yield tmp
        os.chmod(tmp, mode)  # writers that replace the file (safetensors) create it 0600
        _fsync(tmp, os.O_RDONLY)
        check_output(target)  # nothing but a regular file took its place meanwhile
        os.replace(tmp, final)
        if os.name != "nt":
            _fsync(directory, os.O_RDONLY)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise


def _fsync(path: str, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
