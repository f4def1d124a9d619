"""The atomic, durable commit protocol, as a named strategy per storage kind.

``RenameCommit`` (file systems): a checkpoint is built in a hidden temporary
directory, every file is fsync'd as it is closed, the directory is fsync'd,
renamed into its final name in one step, and the run directory is fsync'd.
A crash at any instant therefore leaves either no new checkpoint name at all
(only a hidden leftover, ignored by readers and removed by the next writer) or
the complete new checkpoint. Deletion is the same in reverse: rename out of
the visible namespace first, then remove.
"""

from __future__ import annotations

import logging
import uuid

from savegame.errors import StorageError
from savegame.format import names as n
from savegame.storage.base import Storage

log = logging.getLogger("savegame.commit")


class RenameCommit:
    name = "rename"

    def begin(self, storage: Storage, final: str) -> str:
        tmp = f"{n.TMP_PREFIX}{final}-{uuid.uuid4().hex[:8]}"
        storage.makedirs(tmp)
        return tmp

    def commit(self, storage: Storage, tmp: str, final: str) -> None:
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

    def delete(self, storage: Storage, name: str) -> None:
        """Remove a checkpoint: it leaves the visible namespace atomically, then its files go."""
        trash = f"{n.TRASH_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
        storage.rename(name, trash)
        storage.fsync_dir("")
        storage.remove_tree(trash)

    @staticmethod
    def is_leftover(name: str) -> bool:
        return name.startswith((n.TMP_PREFIX, n.TRASH_PREFIX))

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


def write_file_atomic(storage: Storage, name: str, data: bytes) -> None:
    """Replace a small file (an alias pointer) atomically and durably."""
    tmp = f"{n.TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
    handle = storage.create(tmp)
    try:
        handle.write(memoryview(data))
    except Exception:
        handle.abort()
        raise
    handle.close()
    storage.rename(tmp, name)
    storage.fsync_dir("")
