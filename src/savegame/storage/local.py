"""Local file-system storage with fsync'd files and directories."""

from __future__ import annotations

import errno
import os
import shutil
from typing import BinaryIO

from savegame.errors import StorageError

_REMEDY = {
    errno.ENOSPC: "the disk is full: free space or move the run directory; earlier checkpoints are intact",
    errno.EDQUOT: "the disk quota is exceeded: free space or raise the quota; earlier checkpoints are intact",
    errno.EFBIG: "the file is larger than allowed (file size limit): raise `ulimit -f` or the file system limit",
    errno.EIO: "the device reported an I/O error: check the disk; earlier checkpoints are intact",
    errno.EACCES: "permission denied: check the run directory's permissions",
    errno.EROFS: "the file system is read-only: choose a writable run directory",
}


def storage_error(exc: OSError, action: str, path: str) -> StorageError:
    """Translate an OSError into a StorageError that says what failed and what to do."""
    remedy = _REMEDY.get(exc.errno or 0, "check the path and the device")
    err = StorageError(f"could not {action} {path!r}: {exc.strerror or exc}; {remedy}")
    err.errno = exc.errno
    return err


class _LocalWrite:
    def __init__(self, fd: int, path: str) -> None:
        self._fd, self._path = fd, path

    def write(self, data: memoryview) -> None:
        view = data.cast("B") if data.format != "B" or data.ndim != 1 else data
        try:
            while view.nbytes:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError as exc:
            raise storage_error(exc, "write", self._path) from exc

    def close(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as exc:
            self.abort()
            raise storage_error(exc, "fsync", self._path) from exc
        try:
            os.close(self._fd)
        except OSError as exc:
            raise storage_error(exc, "close", self._path) from exc

    def abort(self) -> None:
        try:
            os.close(self._fd)
        except OSError:
            pass  # the file is being discarded; the error that led here is what matters


class LocalStorage:
    """Files under ``root``; ``create`` + ``close`` = durable file, ``fsync_dir`` = durable names."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.fspath(root)

    def _p(self, path: str) -> str:
        return os.path.join(self.root, path) if path else self.root

    def create(self, path: str) -> _LocalWrite:
        full = self._p(path)
        try:
            fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
        except OSError as exc:
            raise storage_error(exc, "create", full) from exc
        return _LocalWrite(fd, full)

    def open_read(self, path: str) -> BinaryIO:
        handle: BinaryIO = self._call(lambda p: open(p, "rb"), "open", path)
        return handle

    def size(self, path: str) -> int:
        return int(self._call(os.path.getsize, "stat", path))

    def read_bytes(self, path: str) -> bytes:
        def read(p: str) -> bytes:
            with open(p, "rb") as f:
                return f.read()
        data: bytes = self._call(read, "read", path)
        return data

    def exists(self, path: str) -> bool:
        return os.path.exists(self._p(path))

    def append(self, path: str, data: bytes) -> None:
        def append(p: str) -> None:
            with open(p, "ab") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        self._call(append, "append to", path)

    def makedirs(self, path: str) -> None:
        self._call(lambda p: os.makedirs(p, exist_ok=True), "create directory", path)

    def list_dir(self, path: str) -> list[str]:
        return sorted(self._call(os.listdir, "list", path))

    def rename(self, src: str, dst: str) -> None:
        try:
            os.replace(self._p(src), self._p(dst))
        except OSError as exc:
            raise storage_error(exc, f"rename {self._p(src)!r} to", self._p(dst)) from exc

    def remove(self, path: str) -> None:
        self._call(os.remove, "remove", path)

    def remove_tree(self, path: str) -> None:
        self._call(shutil.rmtree, "remove", path)

    def fsync_dir(self, path: str) -> None:
        if os.name == "nt":  # directories cannot be fsync'd on Windows; renames are durable there
            return
        def sync(p: str) -> None:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self._call(sync, "fsync directory", path)

    def _call(self, fn, action: str, path: str):  # type: ignore[no-untyped-def]
        full = self._p(path)
        try:
            return fn(full)
        except OSError as exc:
            raise storage_error(exc, action, full) from exc
