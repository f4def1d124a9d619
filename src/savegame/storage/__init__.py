"""Storage behind a small protocol: local files, and a fault-injecting wrapper for tests."""

from savegame.storage.base import Storage, WriteHandle
from savegame.storage.faulty import FaultyStorage, InjectedFault
from savegame.storage.local import LocalStorage

__all__ = ["FaultyStorage", "InjectedFault", "LocalStorage", "Storage", "WriteHandle"]
