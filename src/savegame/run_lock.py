"""The one-writer lock of a run directory: an OS file lock the kernel releases if the process dies."""

from __future__ import annotations

import errno
import gc
import logging
import os

from savegame.errors import RunLockedError, SavegameError, StorageError
from savegame.format import names as n
from savegame.storage.local import storage_error

log = logging.getLogger("savegame.run")

# errno values that mean "somebody else holds the lock"; any other failure means locking does not work here.
_HELD = {errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES} | ({errno.EDEADLK} if os.name == "nt" else set())
# Lock files this process holds, so a second Checkpointer in the same process gets a message that fits.
_HELD_HERE: set[str] = set()


class RunLock:
    """An exclusive, non-blocking lock on ``root``/.savegame.lock.

    ``acquire`` raises RunLockedError when another holder has it, StorageError when the
    lock file cannot be opened or written, or when the file system does not support
    locks (the message says what to do in each case).
    """

    def __init__(self, root: str) -> None:
        self.path = os.path.join(root, n.LOCK_FILE)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        fd = self._open()
        try:
            _try_lock(fd, self.path)
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        except SavegameError:
            os.close(fd)
            raise
        except OSError as exc:
            os.close(fd)
            raise storage_error(exc, "write the lock file", self.path) from exc
        self._fd = fd
        _HELD_HERE.add(os.path.realpath(self.path))

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            _HELD_HERE.discard(os.path.realpath(self.path))
            os.close(fd)  # closing the descriptor releases the lock

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise storage_error(exc, "open the lock file", self.path) from exc


def _try_lock(fd: int, path: str) -> None:
    """Lock ``fd`` or raise a savegame error that says why not."""
    folder = os.path.dirname(path)
    for attempt in (1, 2):
        try:
            _lock(fd)
            return
        except OSError as exc:
            if exc.errno not in _HELD:
                raise StorageError(
                    f"cannot lock {path!r}: {exc.strerror or exc} (errno {exc.errno}); the file system of "
                    f"{folder!r} does not support file locks. Mount it with lock support (Lustre: -o flock; "
                    "NFS: without 'nolock'), or use a run directory on a local disk") from exc
            if os.path.realpath(path) not in _HELD_HERE:
                raise RunLockedError(
                    f"another process is writing to the run directory {folder!r} (it holds the lock); "
                    "stop it, or use a different run directory") from exc
            if attempt == 1:
                gc.collect()  # an unreachable Checkpointer that was never closed releases its lock when collected
                continue
            raise RunLockedError(
                f"this process already has a Checkpointer (or tool) writing to {folder!r} that was not closed; "
                "call its close(), or use `with savegame.Checkpointer(...) as ckpt:`, before opening another") from exc


def _lock(fd: int) -> None:
    if os.name == "nt":  # pragma: no cover - exercised on Windows only
        import msvcrt
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined,unused-ignore]
    else:
        import fcntl
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
