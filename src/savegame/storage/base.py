"""The Storage protocol: the handful of operations a durable checkpoint needs.

Paths are relative to the storage root, with ``/`` separators. Every method
raises :class:`~savegame.errors.StorageError` (never a bare OSError) with the
path and a remedy in the message. Nothing outside the root is read or written
through a name below it: a file-system storage refuses symbolic links and
non-regular files there (see :mod:`savegame.storage.local`).
"""

from __future__ import annotations

from typing import BinaryIO, Protocol


class WriteHandle(Protocol):
    """A file being written. ``close()`` makes it durable (fsync) before returning.

    ``write(data)`` is done with ``data`` when it returns. A handle may also have ``lend(data)``:
    the same write, with the caller's promise that the bytes stay unchanged until ``close()`` or
    ``abort()`` returns, so the handle may send them from where they are instead of copying them
    (an object store's upload parts). :func:`lend` uses it where there is one.
    """

    def write(self, data: memoryview) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


def lend(handle: WriteHandle, data: memoryview) -> None:
    """Write ``data`` through ``handle``, whose bytes the caller leaves unchanged until the handle is closed or
    aborted: through the handle's ``lend`` where it has one, else its ``write``."""
    method = getattr(handle, "lend", None)
    (method or handle.write)(data)


class Storage(Protocol):
    root: str

    def create(self, path: str) -> WriteHandle:
        """Open a new file for writing (fails if it exists)."""
        ...

    def open_read(self, path: str) -> BinaryIO: ...

    def size(self, path: str) -> int: ...

    def read_bytes(self, path: str) -> bytes: ...

    def exists(self, path: str) -> bool: ...

    def append(self, path: str, data: bytes) -> None:
        """Append to a file durably (the metrics history); creates it if needed."""
        ...

    def makedirs(self, path: str) -> None: ...

    def list_dir(self, path: str) -> list[str]: ...

    def rename(self, src: str, dst: str) -> None:
        """Atomically move ``src`` to ``dst``; ``dst`` must not exist, or be a regular file to replace."""
        ...

    def remove(self, path: str) -> None: ...

    def remove_tree(self, path: str) -> None: ...

    def fsync_dir(self, path: str) -> None: ...


class ObjectStorage(Storage, Protocol):
    """A store of whole objects (no rename, no append): one PUT replaces an object atomically."""

    lease_seconds: float

    def put(self, path: str, data: bytes) -> None:
        """Write the whole object ``path``, replacing any, in one atomic request."""
        ...
