"""A Storage that reports the bytes moved through it: the progress of a long read or write, by bytes.

:class:`CountingStorage` wraps any storage (local, object store, fault-injecting).
Reading, it calls ``on_read`` with how much further into a file each read got (a file
read whole by ``read_bytes``, or opened by ``open_read``, or by ``read_through`` where the
store has it): a file read to its end counts its size once, whatever was skipped on the
way (alignment padding) or read again (a reader checking a part twice), so the counts add
up to the sizes of the files read. Writing, it calls ``on_write`` with the size of every
write into a file it created. Everything else, including what only some stores have (the
commit strategy, the lease length, ranged reads), is the wrapped storage's own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, BinaryIO, Self, cast

from savegame.storage.base import Storage, WriteHandle, lend

Progress = Callable[[int], None]  # called with the number of bytes just read or written


class CountingStorage:
    """``inner``, with the bytes read through it reported to ``on_read`` and those written to ``on_write``."""

    def __init__(self, inner: Storage, *, on_read: Progress | None = None, on_write: Progress | None = None) -> None:
        self.inner, self._on_read, self._on_write = inner, on_read, on_write
        self.root = inner.root
        self._reached: dict[str, int] = {}  # path -> the furthest byte read so far
        self._lock = threading.Lock()  # files may be read from several threads

    def __getattr__(self, name: str) -> Any:
        """What only some storages have (``commit``, ``lease_seconds``, ``ranged_reads``, ``put`` ...), as theirs;
        ``read_through`` (object stores) with its reads counted."""
        if name == "inner":  # not set yet (a copy being made): never recurse
            raise AttributeError(name)
        value = getattr(self.inner, name)
        if name == "read_through" and self._on_read is not None:
            return lambda path, size: _CountingFile(value(path, size), lambda end: self._reach(path, end))
        return value

    def open_read(self, path: str) -> BinaryIO:
        f = self.inner.open_read(path)
        return f if self._on_read is None else cast(BinaryIO, _CountingFile(f, lambda end: self._reach(path, end)))

    def _reach(self, path: str, end: int) -> None:
        with self._lock:
            past = end - self._reached.get(path, 0)
            if past > 0:
                self._reached[path] = end
        if past > 0 and self._on_read is not None:
            self._on_read(past)

    def create(self, path: str) -> WriteHandle:
        handle = self.inner.create(path)
        return handle if self._on_write is None else _CountingWrite(handle, self._on_write)

    def size(self, path: str) -> int:
        return self.inner.size(path)

    def read_bytes(self, path: str) -> bytes:
        data = self.inner.read_bytes(path)
        self._reach(path, len(data))
        return data

    def exists(self, path: str) -> bool:
        return self.inner.exists(path)

    def append(self, path: str, data: bytes) -> None:
        self.inner.append(path, data)

    def makedirs(self, path: str) -> None:
        self.inner.makedirs(path)

    def list_dir(self, path: str) -> list[str]:
        return self.inner.list_dir(path)

    def rename(self, src: str, dst: str) -> None:
        self.inner.rename(src, dst)

    def remove(self, path: str) -> None:
        self.inner.remove(path)

    def remove_tree(self, path: str) -> None:
        self.inner.remove_tree(path)

    def fsync_dir(self, path: str) -> None:
        self.inner.fsync_dir(path)


class _CountingFile:
    """A file opened for reading that reports the position each read ends at; everything else goes to the file."""

    def __init__(self, inner: BinaryIO, reached: Progress) -> None:
        self._inner, self._reached = inner, reached

    def read(self, n: int = -1) -> bytes:
        data = self._inner.read(n)
        if data:
            self._reached(self._inner.tell())
        return data

    def readinto(self, buffer: Any) -> int:
        count = int(self._inner.readinto(buffer) or 0)  # type: ignore[attr-defined]
        if count:
            self._reached(self._inner.tell())
        return count

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._inner.close()


class _CountingWrite:
    """A new file that reports every write's size."""

    def __init__(self, inner: WriteHandle, progress: Progress) -> None:
        self._inner, self._progress = inner, progress

    def write(self, data: memoryview) -> None:
        self._inner.write(data)
        self._progress(data.nbytes)

    def lend(self, data: memoryview) -> None:
        lend(self._inner, data)
        self._progress(data.nbytes)

    def close(self) -> None:
        self._inner.close()

    def abort(self) -> None:
        self._inner.abort()
