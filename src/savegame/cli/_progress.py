"""Progress by bytes for jobs that can take more than a second.

:class:`ByteProgress` draws a rich bar on stderr, only when stderr is a terminal
and only once the job has run for :data:`DELAY` seconds, so fast jobs never
flicker and pipes and logs stay clean. The library never prints: it reports
bytes through callbacks, and :class:`CountingStorage` turns a reader's file
reads into such callbacks.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, BinaryIO, Self

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from savegame.cli._output import console
from savegame.engine import reader
from savegame.format import names as n
from savegame.errors import CorruptCheckpointError
from savegame.storage.base import Storage
from savegame.storage.local import LocalStorage
from savegame.storage.urls import is_url

DELAY = 1.0  # seconds a job runs before its bar appears


class ByteProgress:
    """Context manager: phases with byte totals, advanced by byte counts, drawn after :data:`DELAY` seconds."""

    def __init__(self, err: Console | None = None, *, delay: float = DELAY,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.console = err or console(stderr=True)
        self._bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                             DownloadColumn(binary_units=True),  # KiB, MiB: the unit of every size the CLI prints
                             TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=True)
        self._enabled = self.console.is_terminal
        self._clock, self._delay = clock, delay
        self._begun = clock()
        self.shown = False
        self._task: TaskID | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.shown:
            self._bar.stop()

    def phase(self, description: str, total: int) -> None:
        """Start a new phase (its own bar) of ``total`` bytes."""
        if self._task is not None:
            self._bar.update(self._task, visible=False)
        self._task = self._bar.add_task(description, total=max(total, 1))
        self._maybe_show()

    def describe(self, description: str) -> None:
        if self._task is not None:
            self._bar.update(self._task, description=description)

    def advance(self, nbytes: int) -> None:
        if self._task is not None:
            self._bar.advance(self._task, nbytes)
        self._maybe_show()

    def _maybe_show(self) -> None:
        if self._enabled and not self.shown and self._clock() - self._begun >= self._delay:
            self._bar.start()
            self.shown = True


class CountingStorage(LocalStorage):
    """Local storage whose reads report their sizes: a reader's progress, by bytes."""

    def __init__(self, root: str, progress: Callable[[int], None]) -> None:
        super().__init__(root)
        self._progress = progress

    def open_read(self, path: str) -> BinaryIO:
        return _CountingFile(super().open_read(path), self._progress)  # type: ignore[return-value]


class _CountingFile:
    """A file opened for reading that reports every read's size; everything else goes to the file."""

    def __init__(self, inner: BinaryIO, progress: Callable[[int], None]) -> None:
        self._inner, self._progress = inner, progress

    def read(self, n: int = -1) -> bytes:
        data = self._inner.read(n)
        self._progress(len(data))
        return data

    def readinto(self, buffer: Any) -> int:
        count = self._inner.readinto(buffer)  # type: ignore[attr-defined]
        self._progress(count or 0)
        return int(count or 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._inner.close()


def verify_bytes(storage: Storage, name: str, bar: ByteProgress) -> None:
    """Check every byte of checkpoint ``name`` as a progress phase (local ones); CorruptCheckpointError if damaged."""
    doc = reader.read_manifest(storage, name)
    if is_url(storage.root):
        problems = reader.verify_checkpoint(storage, name)
    else:
        where = os.path.join(storage.root, name)
        bar.phase(f"verifying {name}", sum(_size(n.file_path(where, f)) for f in reader.data_files(doc)))
        problems = reader.verify_checkpoint(CountingStorage(storage.root, bar.advance), name)
    if problems:
        raise CorruptCheckpointError("; ".join(problems))


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0
