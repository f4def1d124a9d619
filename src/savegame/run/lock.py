"""The one-writer lock of a run directory: an OS file lock the kernel releases if the process dies.

The lock is ``flock`` on ``.savegame.lock``, held through one file descriptor. A
``flock`` belongs to the open file description, which ``fork`` shares: a DataLoader
worker (or any child forked without ``exec``) would keep the lock alive after its
parent was killed, and a restarted trainer would find the run locked until the
child exits. So every child forked from Python closes its copy of the descriptor
at once (``os.register_at_fork``); closing a shared copy does not release the
parent's lock, only the last copy does. Children that ``exec`` never see it
(``O_CLOEXEC``). See docs/design.md for why not POSIX record locks.

The holder writes ``<pid> <host>`` into the file, so a refused writer learns who
holds the run directory and whether that process is still alive.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import socket
import weakref

from savegame.errors import RunLockedError, SavegameError, StorageError
from savegame.format import names as n
from savegame.storage.local import open_regular, storage_error

log = logging.getLogger("savegame.run")

# errno values that mean "somebody else holds the lock"; any other failure means locking does not work here.
_HELD = {errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES} | ({errno.EDEADLK} if os.name == "nt" else set())
# Lock files this process holds, so a second Checkpointer in the same process gets a message that fits.
_HELD_HERE: set[str] = set()
# Locks this process holds, closed in every forked child (see the module docstring), and the
# descriptors of locks being acquired right now (a fork from another thread may happen meanwhile).
_LOCKS: weakref.WeakSet[RunLock] = weakref.WeakSet()
_ACQUIRING: set[int] = set()


class RunLock:
    """An exclusive, non-blocking lock on ``root``/.savegame.lock.

    ``acquire`` raises RunLockedError when another holder has it (naming its pid and
    whether it runs), StorageError when the lock file cannot be opened or written (a
    link or anything but a regular file in its place is refused, never written
    through), or when the file system does not support locks. The lock is held by
    this process only: forked children do not keep it.
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
        fd = open_regular(self.path, os.O_RDWR | os.O_CREAT, "open the lock file")
        _ACQUIRING.add(fd)
        try:
            _try_lock(fd, self.path)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        except SavegameError:
            _ACQUIRING.discard(fd)
            os.close(fd)
            raise
        except OSError as exc:
            _ACQUIRING.discard(fd)
            os.close(fd)
            raise storage_error(exc, "write the lock file", self.path) from exc
        self._fd = fd
        _HELD_HERE.add(os.path.realpath(self.path))
        _LOCKS.add(self)
        _ACQUIRING.discard(fd)

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            _HELD_HERE.discard(os.path.realpath(self.path))
            _LOCKS.discard(self)
            os.close(fd)  # closing the last descriptor of the open file releases the lock

    def _forget_in_child(self) -> None:
        """In a forked child: drop this process's copy of the descriptor; the parent keeps the lock."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError:
                pass  # already closed by the child's own code: nothing is held through it either way


def _close_in_child() -> None:
    for lock in list(_LOCKS):
        lock._forget_in_child()
    for fd in list(_ACQUIRING):  # the thread acquiring it does not exist in the child
        try:
            os.close(fd)
        except OSError:
            pass  # not open in the child any more: nothing is held through it
    _LOCKS.clear()
    _ACQUIRING.clear()
    _HELD_HERE.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


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
                    f"another process is writing to the run directory {folder!r}: {holder(fd)}. Stop it, "
                    "or use a different run directory") from exc
            if attempt == 1:
                gc.collect()  # an unreachable Checkpointer that was never closed releases its lock when collected
                continue
            raise RunLockedError(
                f"this process already has a Checkpointer (or tool) writing to {folder!r} that was not closed; "
                "call its close(), or use `with savegame.Checkpointer(...) as ckpt:`, before opening another") from exc


def holder(fd: int) -> str:
    """Who holds the lock, from what the holder wrote into the lock file: pid, host, and whether it runs."""
    try:
        text = os.pread(fd, 256, 0).decode("utf-8", "replace").split()
    except (OSError, AttributeError):  # no pread (Windows), or the holder's lock forbids reading
        text = []
    if not text or not text[0].isdigit():
        return "its holder has not recorded its pid (it may be starting)"
    pid, host = int(text[0]), text[1] if len(text) > 1 else None
    if host is not None and host != socket.gethostname():
        return f"it is held by process {pid} on host {host!r} (whether it still runs cannot be checked from here)"
    return f"it is held by process {pid}, which is {_liveness(pid)}"


def _liveness(pid: int) -> str:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "not running (a child it forked outside Python may still hold the lock: stop that process)"
    except PermissionError:
        return "alive (owned by another user)"
    except OSError:
        return "in an unknown state"
    return "alive"


def _lock(fd: int) -> None:
    if os.name == "nt":  # pragma: no cover - exercised on Windows only
        import msvcrt
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined,unused-ignore]
    else:
        import fcntl
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
