"""The atomic, durable commit protocol, as a named strategy per storage kind.

``RenameCommit`` (file systems): a checkpoint is built in a hidden temporary
directory, every file is fsync'd as it is closed, the directory is fsync'd,
renamed into its final name in one step, and the run directory is fsync'd.
A crash at any instant therefore leaves either no new checkpoint name at all
(only a hidden leftover, ignored by readers and removed by the next writer) or
the complete new checkpoint. Deletion is the same in reverse: rename out of
the visible namespace first, then remove.

``ManifestLastCommit`` (object stores, which have no rename): the data objects are
written under the checkpoint's final name, and the manifest last, as the commit
marker (created only if absent, where the store can refuse to replace). A checkpoint
without a manifest is never listed; the next writer removes its objects. Deletion
removes the manifest first, then the data, so a half-deleted checkpoint is never listed.

A storage names its strategy with a ``commit`` attribute (:func:`commit_of`); storages
without one are file systems.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Protocol, cast

from savegame.errors import StorageError
from savegame.format import names as n
from savegame.storage.base import ObjectStorage, Storage

log = logging.getLogger("savegame.storage.commit")


class CommitStrategy(Protocol):
    name: str

    def begin(self, storage: Storage, final: str) -> str: ...

    def commit(self, storage: Storage, tmp: str, final: str, manifest: bytes) -> None: ...

    def abort(self, storage: Storage, tmp: str) -> None: ...

    def delete(self, storage: Storage, name: str) -> None: ...

    def visible(self, storage: Storage, names: list[str]) -> list[str]: ...

    def clean_leftovers(self, storage: Storage) -> list[str]: ...

    def replace_file(self, storage: Storage, name: str, data: bytes) -> None: ...


def commit_of(storage: Storage) -> CommitStrategy:
    """The commit strategy ``storage`` names (its ``commit`` attribute); rename-into-place by default."""
    strategy: CommitStrategy | None = getattr(storage, "commit", None)
    return strategy if strategy is not None else RenameCommit()


class RenameCommit:
    name = "rename"

    def begin(self, storage: Storage, final: str) -> str:
        tmp = f"{n.TMP_PREFIX}{final}-{uuid.uuid4().hex[:8]}"
        storage.makedirs(tmp)
        return tmp

    def commit(self, storage: Storage, tmp: str, final: str, manifest: bytes) -> None:
        write_new_file(storage, f"{tmp}/{n.MANIFEST}", manifest)
        storage.fsync_dir(tmp)
        storage.rename(tmp, final)
        storage.fsync_dir("")

    def abort(self, storage: Storage, tmp: str) -> None:
        """Best-effort removal of a failed save's leftovers (a later writer retries)."""
        try:
            if storage.exists(tmp):
                storage.remove_tree(tmp)
        except StorageError as exc:
            log.warning("could not remove the leftovers of a failed save %s (%s); the next run removes them", tmp, exc)

    @staticmethod
    def replace_file(storage: Storage, name: str, data: bytes) -> None:
        """Write a temporary file next to ``name`` (same directory, hidden prefix) and rename it over ``name``,
        so the rename never crosses directories; a failed write removes it."""
        folder, _, base = name.rpartition("/")
        hidden = f"{n.TMP_PREFIX}{base}-{uuid.uuid4().hex[:8]}"
        tmp = f"{folder}/{hidden}" if folder else hidden
        try:
            write_new_file(storage, tmp, data)
            storage.rename(tmp, name)
        except StorageError:
            _discard(storage, tmp)
            raise
        storage.fsync_dir(folder)

    def delete(self, storage: Storage, name: str) -> None:
        """Remove a checkpoint: it leaves the visible namespace atomically, then its files go."""
        trash = f"{n.TRASH_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
        storage.rename(name, trash)
        storage.fsync_dir("")
        storage.remove_tree(trash)

    @staticmethod
    def is_leftover(name: str) -> bool:
        return name.startswith((n.TMP_PREFIX, n.TRASH_PREFIX))

    @staticmethod
    def visible(storage: Storage, names: list[str]) -> list[str]:
        """Every checkpoint name in the namespace is committed (uncommitted ones have hidden names)."""
        return names

    def clean_leftovers(self, storage: Storage) -> list[str]:
        removed = []
        for name in storage.list_dir(""):
            if self.is_leftover(name):
                if storage.exists(name):
                    self._remove_any(storage, name)
                removed.append(name)
        return removed

    @staticmethod
    def _remove_any(storage: Storage, name: str) -> None:
        try:
            storage.remove_tree(name)
        except StorageError:
            storage.remove(name)  # a leftover small file (alias being written), not a directory


class ManifestLastCommit:
    """Commit on stores without rename: data objects first, the manifest written last is the commit.

    ``guard``, when set (by the run's lease), is called right before the manifest is written:
    a writer that lost its lease raises there and commits nothing.
    """

    name = "manifest-last"

    def __init__(self) -> None:
        self.guard: Callable[[], None] | None = None

    def begin(self, storage: Storage, final: str) -> str:
        return final  # no temporary name: without a manifest the objects are invisible anyway

    def commit(self, storage: Storage, tmp: str, final: str, manifest: bytes) -> None:
        if self.guard is not None:
            self.guard()
        write_new_file(storage, f"{final}/{n.MANIFEST}", manifest)

    def abort(self, storage: Storage, tmp: str) -> None:
        """Best-effort removal of a failed save's data objects (the next writer retries)."""
        try:
            if not storage.exists(f"{tmp}/{n.MANIFEST}"):
                storage.remove_tree(tmp)
        except StorageError as exc:
            log.warning("could not remove the objects of a failed save %s (%s); the next run removes them", tmp, exc)

    @staticmethod
    def replace_file(storage: Storage, name: str, data: bytes) -> None:
        """One PUT replaces an object whole and atomically: no temporary object, no rename."""
        cast(ObjectStorage, storage).put(name, data)

    def delete(self, storage: Storage, name: str) -> None:
        """The manifest goes first (the checkpoint leaves the listing at once), then the data objects."""
        if storage.exists(f"{name}/{n.MANIFEST}"):
            storage.remove(f"{name}/{n.MANIFEST}")
        storage.remove_tree(name)

    @staticmethod
    def visible(storage: Storage, names: list[str]) -> list[str]:
        """Only checkpoints whose manifest exists are committed."""
        return [name for name in names if storage.exists(f"{name}/{n.MANIFEST}")]

    def clean_leftovers(self, storage: Storage) -> list[str]:
        """Remove checkpoints without a manifest (interrupted saves or deletions) and temporary objects.

        Only the lease holder calls this, so no save of another writer is in flight.
        """
        removed = []
        for name in storage.list_dir(""):
            partial = name.startswith(n.CHECKPOINT_PREFIX) and not storage.exists(f"{name}/{n.MANIFEST}")
            if partial or RenameCommit.is_leftover(name):
                try:
                    storage.remove_tree(name)
                except StorageError as exc:
                    log.warning("could not remove the leftover %s (%s); the next run tries again", name, exc)
                    continue
                removed.append(name)
        abort_uploads = getattr(storage, "abort_uploads", None)  # S3: a killed writer's unfinished uploads
        if callable(abort_uploads):
            try:
                removed += [f"unfinished upload of {key}" for key in abort_uploads()]
            except StorageError as exc:
                log.warning("could not abort the unfinished uploads under %s (%s)", storage.root, exc)
        return removed


def write_new_file(storage: Storage, path: str, data: bytes) -> None:
    """Create ``path`` (it must not exist) holding ``data``, durably (fsync'd on close)."""
    handle = storage.create(path)
    try:
        handle.write(memoryview(data))
    except BaseException:
        handle.abort()
        raise
    handle.close()


def write_file_atomic(storage: Storage, name: str, data: bytes) -> None:
    """Replace a small file (an alias pointer, the metrics history, the lease) atomically and durably,
    as ``storage``'s commit strategy does it (:meth:`RenameCommit.replace_file`, :meth:`ManifestLastCommit.replace_file`)."""
    commit_of(storage).replace_file(storage, name, data)


def _discard(storage: Storage, path: str) -> None:
    try:
        if storage.exists(path):
            storage.remove(path)
    except StorageError as exc:
        log.warning("could not remove the temporary file %s (%s); the next run removes it", path, exc)
