"""Progress by bytes for jobs that can take more than a second.

:class:`ByteProgress` draws a rich bar on stderr, only when stderr is a terminal
and only once the job has run for :data:`DELAY` seconds, so fast jobs never
flicker and pipes and logs stay clean. The library never prints: it reports
bytes through callbacks, and :class:`~savegame.storage.counting.CountingStorage`
turns a reader's file reads into such callbacks, on any storage (local or object store).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Self

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
from savegame.errors import CorruptCheckpointError, StorageError
from savegame.format import names as n
from savegame.storage.base import Storage
from savegame.storage.counting import CountingStorage

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


def verify_bytes(storage: Storage, name: str, bar: ByteProgress) -> None:
    """Check every byte of checkpoint ``name`` as a progress phase; CorruptCheckpointError if damaged."""
    doc = reader.read_manifest(storage, name)
    files = [f"{name}/{n.MANIFEST}", *(n.file_path(name, f) for f in reader.data_files(doc))]
    bar.phase(f"verifying {name}", sum(_size(storage, f) for f in files))  # what verifying reads, once each
    problems = reader.verify_checkpoint(CountingStorage(storage, on_read=bar.advance), name)
    if problems:
        raise CorruptCheckpointError("; ".join(problems))


def _size(storage: Storage, path: str) -> int:
    try:
        return storage.size(path)
    except StorageError:  # a missing file: verifying reports it
        return 0
