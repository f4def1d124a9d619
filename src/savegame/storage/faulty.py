"""A storage wrapper that fails chosen operations, so tests can break any step of a save.

Every mutating operation (create, write, close, rename, remove, remove_tree,
fsync_dir, makedirs) gets a running number. ``fail_at=N`` makes operation N
fail (``fail_if(op, path)`` picks every matching operation instead): with an
``OSError``-backed StorageError (``errno_``), or, with
``crash=True``, with :class:`InjectedFault`, a BaseException that the library
does not catch: it stands for the process dying at that instant, so no
cleanup code runs and the test sees exactly what a crash would leave.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import BinaryIO

from savegame.storage.base import Storage, WriteHandle, lend
from savegame.storage.local import storage_error


class InjectedFault(BaseException):
    """A simulated crash at a chosen storage operation (never caught by savegame)."""


class FaultyStorage:
    def __init__(self, inner: Storage, *, fail_at: int | None = None, errno_: int = errno.EIO,
                 crash: bool = False, fail_if: Callable[[str, str], bool] | None = None) -> None:
        self.inner, self.root = inner, inner.root
        self.fail_at, self.errno_, self.crash, self.fail_if = fail_at, errno_, crash, fail_if
        self.ops: list[tuple[str, str]] = []

    def _tick(self, op: str, path: str) -> None:
        self.ops.append((op, path))
        chosen = self.fail_if is not None and self.fail_if(op, path)
        if chosen or (self.fail_at is not None and len(self.ops) - 1 == self.fail_at):
            if self.crash:
                raise InjectedFault(f"crash injected at operation {self.fail_at}: {op} {path}")
            raise storage_error(OSError(self.errno_, os.strerror(self.errno_)), op, path)

    def create(self, path: str) -> WriteHandle:
        self._tick("create", path)
        return _FaultyWrite(self, self.inner.create(path), path)

    def _read(self, op: str, path: str) -> None:
        """Reads are not numbered (``fail_at`` counts mutations only); ``fail_if`` can fail them."""
        if self.fail_if is not None and self.fail_if(op, path):
            raise storage_error(OSError(self.errno_, os.strerror(self.errno_)), op, path)

    def open_read(self, path: str) -> BinaryIO:
        self._read("open_read", path)
        return self.inner.open_read(path)

    def size(self, path: str) -> int:
        return self.inner.size(path)

    def read_bytes(self, path: str) -> bytes:
        self._read("read_bytes", path)
        return self.inner.read_bytes(path)

    def exists(self, path: str) -> bool:
        return self.inner.exists(path)

    def list_dir(self, path: str) -> list[str]:
        return self.inner.list_dir(path)

    def append(self, path: str, data: bytes) -> None:
        self._tick("append", path)
        self.inner.append(path, data)

    def makedirs(self, path: str) -> None:
        self._tick("makedirs", path)
        self.inner.makedirs(path)

    def rename(self, src: str, dst: str) -> None:
        self._tick("rename", src)
        self.inner.rename(src, dst)

    def remove(self, path: str) -> None:
        self._tick("remove", path)
        self.inner.remove(path)

    def remove_tree(self, path: str) -> None:
        self._tick("remove_tree", path)
        self.inner.remove_tree(path)

    def fsync_dir(self, path: str) -> None:
        self._tick("fsync_dir", path)
        self.inner.fsync_dir(path)


class _FaultyWrite:
    def __init__(self, owner: FaultyStorage, inner: WriteHandle, path: str) -> None:
        self._owner, self._inner, self._path = owner, inner, path

    def write(self, data: memoryview) -> None:
        self._owner._tick("write", self._path)
        self._inner.write(data)

    def lend(self, data: memoryview) -> None:
        self._owner._tick("write", self._path)
        lend(self._inner, data)

    def close(self) -> None:
        try:
            self._owner._tick("close", self._path)
        except Exception:
            self._inner.abort()
            raise
        self._inner.close()

    def abort(self) -> None:
        self._inner.abort()
