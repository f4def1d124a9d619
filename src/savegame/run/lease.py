"""The one-writer lease of a run on an object store, where there is no file lock.

The lease is the object ``.savegame.lease``: ``{"owner", "pid", "host", "token", "expires",
"seconds"}``. The writer takes it when no lease is there or the one there has expired, and a
background thread renews it every third of its length. A second writer is refused with
:class:`~savegame.errors.RunLockedError` naming the owner while the lease is fresh; a writer
that died stops renewing, and its lease is taken over ``lease_seconds`` (60 s by default)
after its last renewal. Before every commit the holder checks that the lease is still its own
and unexpired (:meth:`RunLease.check`), so a writer that stalled past its lease and was taken
over commits nothing more. Object stores do not all enforce conditional writes between
concurrent writers, so the lease, read back after it is written, is what keeps one writer.
Expiry is judged by wall clocks: hosts sharing a run need clocks within a few seconds.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
import weakref
from typing import Any, Protocol

from savegame.errors import RunLockedError, StorageError
from savegame.format import names as n
from savegame.run.lock import RunLock
from savegame.storage.base import Storage
from savegame.storage.commit import commit_of, write_file_atomic, write_new_file

log = logging.getLogger("savegame.run")

LEASE_FILE = n.LEASE_FILE


class WriterLock(Protocol):
    """What a run's single-writer guard offers: :class:`RunLock` on file systems, :class:`RunLease` elsewhere."""

    @property
    def held(self) -> bool: ...

    def acquire(self) -> None: ...

    def release(self) -> None: ...


def writer_lock(storage: Storage) -> WriterLock:
    """The single-writer guard ``storage`` calls for: a lease where it has ``lease_seconds``, else a file lock."""
    seconds = getattr(storage, "lease_seconds", None)
    return RunLock(storage.root) if seconds is None else RunLease(storage, float(seconds))


class RunLease:
    """An exclusive lease on the run at ``storage``, renewed in the background while held."""

    def __init__(self, storage: Storage, seconds: float) -> None:
        self.storage, self.seconds = storage, seconds
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: str | None = None
        self._expires = 0.0  # when the lease this process last wrote expires

    @property
    def held(self) -> bool:
        return self._thread is not None and self._lost is None

    def acquire(self) -> None:
        if self._thread is not None:
            return
        current = self._read()
        now = time.time()
        if current is not None and current.get("token") != self.token and _expires(current) > now:
            raise RunLockedError(
                f"another process is writing to the run {self.storage.root!r}: its lease is held by "
                f"{_owner(current)} and is fresh for {_expires(current) - now:.0f} s more (renewed while it "
                f"runs). Stop it, or use a different run; a writer that died is taken over once its lease "
                f"expires ({current.get('seconds', self.seconds)} s after its last renewal)")
        if current is not None:
            log.warning("taking over the run %s: the lease of %s expired %.0f s ago (its writer stopped renewing it)",
                        self.storage.root, _owner(current), now - _expires(current))
        try:
            self._write(new=current is None)  # no lease yet: created only if still absent, where the store can
        except StorageError as exc:
            if exc.errno != errno.EEXIST:
                raise
            raise RunLockedError(f"another process took the lease of the run {self.storage.root!r} at the same "
                                 f"time: {_owner(self._read() or {})}. Stop it, or use a different run") from exc
        mine = self._read()
        if mine is None or mine.get("token") != self.token:  # another writer took it in the same instant
            raise RunLockedError(f"another process took the lease of the run {self.storage.root!r} at the same "
                                 f"time: {_owner(mine or {})}. Stop it, or use a different run")
        self._lost = None
        self._stop.clear()
        strategy = commit_of(self.storage)
        if hasattr(strategy, "guard"):
            strategy.guard = self.check
        self._thread = threading.Thread(target=self._renew, name="savegame-lease", daemon=True)
        self._thread.start()
        _LEASES.add(self)

    def check(self) -> None:
        """Raise RunLockedError unless this process still holds a fresh lease (called before each commit)."""
        if self._lost is not None:
            raise RunLockedError(self._lost)
        if time.time() < self._expires - self.seconds / 3:  # nobody takes a lease over before it expires
            return
        current = self._read()
        if current is None or current.get("token") != self.token:
            self._lost = (f"this process lost the lease of the run {self.storage.root!r} to "
                          f"{_owner(current or {})}: it stalled longer than the lease ({self.seconds} s) and "
                          "another writer took over; nothing more is committed by this process")
            raise RunLockedError(self._lost)

    def release(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        _LEASES.discard(self)
        self._stop.set()
        thread.join()
        strategy = commit_of(self.storage)
        if getattr(strategy, "guard", None) == self.check:
            strategy.guard = None  # type: ignore[attr-defined]
        try:
            current = self._read()
            if current is not None and current.get("token") == self.token:
                self.storage.remove(LEASE_FILE)
        except StorageError as exc:
            log.warning("could not hand back the lease of %s (%s); it expires in %s s", self.storage.root, exc,
                        self.seconds)

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                self.check()
                self._write()
            except RunLockedError as exc:
                log.error("%s", exc)
                return
            except StorageError as exc:  # transient trouble outlasting the retries: try again at the next tick
                log.warning("could not renew the lease of %s: %s", self.storage.root, exc)

    def _write(self, *, new: bool = False) -> None:
        now = time.time()
        doc = {"owner": f"process {os.getpid()} on host {socket.gethostname()!r}", "pid": os.getpid(),
               "host": socket.gethostname(), "token": self.token, "expires": now + self.seconds,
               "seconds": self.seconds}
        data = json.dumps(doc).encode()
        if new:
            write_new_file(self.storage, LEASE_FILE, data)
        else:
            write_file_atomic(self.storage, LEASE_FILE, data)
        self._expires = now + self.seconds

    def _read(self) -> dict[str, Any] | None:
        try:
            doc = json.loads(self.storage.read_bytes(LEASE_FILE))
        except StorageError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        except (ValueError, UnicodeDecodeError):
            return {}  # a damaged lease: expired (no "expires"), so it is taken over
        return doc if isinstance(doc, dict) else {}


# Leases this process holds. A forked child (a DataLoader worker) does not hold them: it must never
# renew or hand back its parent's lease, so it forgets them at once.
_LEASES: weakref.WeakSet[RunLease] = weakref.WeakSet()


def _forget_in_child() -> None:
    for lease in list(_LEASES):
        lease._thread = None
        lease._lost = "this process is a fork of the lease's holder; only the holder writes the run"
    _LEASES.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def _expires(doc: dict[str, Any]) -> float:
    value = doc.get("expires")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _owner(doc: dict[str, Any]) -> str:
    owner = doc.get("owner")
    return owner if isinstance(owner, str) else "an unknown writer"
