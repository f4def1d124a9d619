"""Local file-system storage with fsync'd files and directories, that never follows a link.

Everything under the storage root is opened, created, appended to, replaced and
read by name without following symbolic links: a link anywhere below the root
(a checkpoint directory, a tensor file, ``metrics.jsonl``, an alias, the lock file)
is refused with a :class:`~savegame.errors.StorageError` naming it, so savegame never
reads or writes a file outside the run directory through one. Only regular files are
read or written (a FIFO or device node in their place is refused, never opened for
reading: that could block). The root itself may be a link; the user chose it.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
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
# O_NOFOLLOW: the last component may not be a link (ELOOP; some systems say EMLINK). O_NONBLOCK: opening a
# FIFO does not wait for a writer, so it can be refused; it has no effect on regular files.
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_FLAGS = getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


def storage_error(exc: OSError, action: str, path: str) -> StorageError:
    """Translate an OSError into a StorageError that says what failed and what to do."""
    remedy = _REMEDY.get(exc.errno or 0, "check the path and the device")
    err = StorageError(f"could not {action} {path!r}: {exc.strerror or exc}; {remedy}")
    err.errno = exc.errno
    return err


def not_followed(action: str, path: str, link: str) -> StorageError:
    """The error for a name that is a symbolic link: savegame does not read or write through it."""
    try:
        target = f" (to {os.readlink(link)!r})"
    except OSError:
        target = ""
    err = StorageError(
        f"refused to {action} {path!r}: {link!r} is a symbolic link{target}; savegame never reads or writes "
        "through links inside a run directory: replace the link by the real file or directory, or remove it")
    err.errno = errno.ELOOP
    return err


def kind_of(mode: int) -> str:
    """What a file's ``st_mode`` says it is, for messages: "a regular file", "a symbolic link", "a FIFO" ..."""
    for test, kind in ((stat.S_ISREG, "a regular file"), (stat.S_ISLNK, "a symbolic link"),
                       (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device")):
        if test(mode):
            return kind
    return "not a regular file"


def not_regular(action: str, path: str, mode: int) -> StorageError:
    """The error for a name that is a directory, FIFO, socket or device where a regular file belongs."""
    err = StorageError(f"refused to {action} {path!r}: it is {kind_of(mode)}, not a regular file; remove it or "
                       "move it out of the run directory")
    err.errno = errno.EINVAL
    return err


def open_regular(path: str, flags: int, action: str, mode: int = 0o644) -> int:
    """``os.open`` a regular file without following a link at ``path`` itself; refuse anything else.

    Intermediate directories are the caller's to check (see :meth:`LocalStorage.check_parents`).
    """
    if not _NOFOLLOW and os.path.islink(path):  # pragma: no cover - systems without O_NOFOLLOW (Windows)
        raise not_followed(action, path, path)
    try:
        fd = os.open(path, flags | _NOFOLLOW | _FLAGS | _NONBLOCK, mode)
    except OSError as exc:
        raise _explain(exc, action, path) from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise not_regular(action, path, info.st_mode)
        if _NONBLOCK:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _explain(exc: OSError, action: str, path: str) -> StorageError:
    """Why opening ``path`` failed: a link or a non-regular file in its place, else the OS error."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return storage_error(exc, action, path)
    if stat.S_ISLNK(mode):
        return not_followed(action, path, path)
    if not stat.S_ISREG(mode):
        return not_regular(action, path, mode)
    return storage_error(exc, action, path)


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

    def check_parents(self, path: str, action: str) -> str:
        """The full path of ``path``, after checking that no directory between the root and it is a link."""
        full = self._p(path)
        folder = self.root
        for part in path.split("/")[:-1]:
            folder = os.path.join(folder, part)
            if os.path.islink(folder):
                raise not_followed(action, full, folder)
        return full

    def create(self, path: str) -> _LocalWrite:
        full = self.check_parents(path, "create")
        return _LocalWrite(open_regular(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL, "create"), full)

    def open_read(self, path: str) -> BinaryIO:
        full = self.check_parents(path, "read")
        return os.fdopen(open_regular(full, os.O_RDONLY, "read"), "rb")

    def size(self, path: str) -> int:
        full = self.check_parents(path, "read")
        try:
            info = os.lstat(full)
        except OSError as exc:
            raise storage_error(exc, "stat", full) from exc
        if stat.S_ISLNK(info.st_mode):
            raise not_followed("read", full, full)
        if not stat.S_ISREG(info.st_mode):
            raise not_regular("read", full, info.st_mode)
        return info.st_size

    def read_bytes(self, path: str) -> bytes:
        with self.open_read(path) as f:
            try:
                return f.read()
            except OSError as exc:
                raise storage_error(exc, "read", self._p(path)) from exc

    def exists(self, path: str) -> bool:
        """Whether the name exists; a link counts (it is refused when used, not mistaken for absence)."""
        return os.path.lexists(self._p(path)) if path else os.path.exists(self.root)

    def append(self, path: str, data: bytes) -> None:
        full = self.check_parents(path, "append to")
        fd = open_regular(full, os.O_WRONLY | os.O_APPEND | os.O_CREAT, "append to", 0o666)  # umask applies
        try:
            view = memoryview(data)
            while view.nbytes:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as exc:
            raise storage_error(exc, "append to", full) from exc
        finally:
            os.close(fd)

    def makedirs(self, path: str) -> None:
        """Create ``path`` and its missing parents; an existing link among them is refused."""
        if not path:
            self._call(lambda p: os.makedirs(p, exist_ok=True), "create directory", path)
            return
        full, folder = self._p(path), self.root
        for part in path.split("/"):
            folder = os.path.join(folder, part)
            try:
                os.mkdir(folder)
                continue
            except FileExistsError:
                pass
            except OSError as exc:
                raise storage_error(exc, "create directory", full) from exc
            info = os.lstat(folder)
            if stat.S_ISLNK(info.st_mode):
                raise not_followed("create directory", full, folder)
            if not stat.S_ISDIR(info.st_mode):
                raise storage_error(OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)), "create directory", folder)

    def list_dir(self, path: str) -> list[str]:
        if path:
            self.check_parents(f"{path}/", "list")
        return sorted(self._call(os.listdir, "list", path))

    def rename(self, src: str, dst: str) -> None:
        """Move ``src`` (which may be a link: the link moves) to ``dst``, absent or a regular file to replace."""
        action = f"rename {self._p(src)!r} to"
        full_src, full_dst = self.check_parents(src, action), self.check_parents(dst, action)
        try:
            info = os.lstat(full_dst)
        except FileNotFoundError:
            info = None
        except OSError as exc:
            raise storage_error(exc, action, full_dst) from exc
        if info is not None and stat.S_ISLNK(info.st_mode):
            raise not_followed("replace", full_dst, full_dst)
        if info is not None and not stat.S_ISREG(info.st_mode):
            raise not_regular("replace", full_dst, info.st_mode)
        try:
            os.replace(full_src, full_dst)
        except OSError as exc:
            raise storage_error(exc, action, full_dst) from exc

    def remove(self, path: str) -> None:
        self.check_parents(path, "remove")
        self._call(os.remove, "remove", path)  # removes a link itself, never its target

    def remove_tree(self, path: str) -> None:
        full = self.check_parents(path, "remove")
        if os.path.islink(full):  # a link in place of a directory: the link goes, what it points to stays
            self._call(os.remove, "remove", path)
            return
        self._call(shutil.rmtree, "remove", path)

    def fsync_dir(self, path: str) -> None:
        if os.name == "nt":  # directories cannot be fsync'd on Windows; renames are durable there
            return
        full = self.check_parents(f"{path}/" if path else "", "fsync directory")

        def sync(p: str) -> None:
            fd = os.open(p, os.O_RDONLY | _FLAGS | _DIRECTORY | (_NOFOLLOW if path else 0))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        try:
            sync(full)
        except OSError as exc:
            if path and os.path.islink(full):
                raise not_followed("fsync directory", full, full) from exc
            raise storage_error(exc, "fsync directory", full) from exc

    def _call(self, fn, action: str, path: str):  # type: ignore[no-untyped-def]
        full = self._p(path)
        try:
            return fn(full)
        except OSError as exc:
            raise storage_error(exc, action, full) from exc
