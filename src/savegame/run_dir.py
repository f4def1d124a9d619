"""A run directory: its checkpoints, their names, aliases, and the one-writer lock."""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

from savegame import reader
from savegame.commit import RenameCommit, write_file_atomic
from savegame.errors import CorruptCheckpointError, RunLockedError, StorageError
from savegame.format import names as n
from savegame.storage.base import Storage

log = logging.getLogger("savegame.run")

_NAME_RE = re.compile(r"step-(\d{10})(?:-[^/\\]*)?(?:\.(\d+))?")


@dataclass(frozen=True)
class CheckpointInfo:
    """What a run directory knows about one committed checkpoint (from its manifest)."""

    name: str
    step: int
    epoch: int | None
    metrics: dict[str, float]
    extra: Any
    time: float
    bytes: int = 0
    pinned: bool = False
    aliases: tuple[str, ...] = field(default=())


def checkpoint_name(step: int, fields: str = "") -> str:
    base = n.CHECKPOINT_NAME.format(step=step)
    return f"{base}-{fields}" if fields else base


def parse_step(name: str) -> int | None:
    match = _NAME_RE.fullmatch(name)
    return int(match.group(1)) if match else None


class RunDir:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.commit = RenameCommit()
        # Committed checkpoints never change, so what their manifests say is read once.
        self._infos: dict[str, CheckpointInfo] = {}

    def names(self) -> list[str]:
        """Committed checkpoint names, oldest step first (leftovers and other files ignored)."""
        if not self.storage.exists(""):
            return []
        found = [name for name in self.storage.list_dir("") if parse_step(name) is not None]
        return sorted(found, key=lambda name: (parse_step(name), name))

    def unique_name(self, step: int, fields: str = "") -> str:
        base, existing = checkpoint_name(step, fields), set(self.storage.list_dir("")) if self.storage.exists("") else set()
        name, k = base, 0
        while name in existing:
            k += 1
            name = f"{base}.{k}"
        return name

    def remember(self, info: CheckpointInfo) -> None:
        """Record a checkpoint this process just committed (no need to read its manifest back)."""
        self._infos[info.name] = info

    def delete(self, name: str) -> None:
        self._infos.pop(name, None)
        self.commit.delete(self.storage, name)

    def info(self, name: str) -> CheckpointInfo:
        """Read one manifest (checksummed); raises CorruptCheckpointError."""
        if name in self._infos:
            return self._infos[name]
        doc = reader.read_manifest(self.storage, name)
        meta = reader.decode_meta(doc)
        size = reader.data_bytes(doc)
        info = CheckpointInfo(name, meta["step"], meta["epoch"], meta["metrics"] or {}, meta["extra"],
                              float(meta["time"] or 0.0), size, doc.get(n.M_PINNED) is True)
        self._infos[name] = info
        return info

    def infos(self) -> list[CheckpointInfo]:
        """Every checkpoint whose manifest reads; the others are logged and left out."""
        out = []
        for name in self.names():
            try:
                out.append(self.info(name))
            except CorruptCheckpointError as exc:
                log.warning("skipping checkpoint %s: %s", name, exc)
        return out

    # Aliases: tiny JSON pointer files, replaced atomically. They are hints only.
    def write_alias(self, alias: str, target: str) -> None:
        data = json.dumps({"alias": alias, "target": target}).encode()
        write_file_atomic(self.storage, _alias_file(alias), data)

    def read_alias(self, alias: str) -> str | None:
        try:
            doc = json.loads(self.storage.read_bytes(_alias_file(alias)))
        except (StorageError, ValueError, UnicodeDecodeError):
            return None
        target = doc.get("target") if isinstance(doc, dict) else None
        return target if isinstance(target, str) and parse_step(target) is not None else None

    def aliases(self) -> dict[str, str]:
        out = {}
        for name in self.storage.list_dir("") if self.storage.exists("") else []:
            if name.endswith(n.ALIAS_SUFFIX):
                alias = name[: -len(n.ALIAS_SUFFIX)].replace("__", ":")
                target = self.read_alias(alias)
                if target:
                    out[alias] = target
        return out


def _alias_file(alias: str) -> str:
    return alias.replace(":", "__") + n.ALIAS_SUFFIX


class RunLock:
    """An OS lock on the run directory, released by the kernel if the process dies."""

    def __init__(self, root: str) -> None:
        self.path = os.path.join(root, n.LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> None:
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _lock(self._fd)
        except OSError as exc:
            os.close(self._fd)
            self._fd = None
            raise RunLockedError(
                f"another process is writing to the run directory {os.path.dirname(self.path)!r} "
                "(it holds the lock); stop it, or use a different run directory"
            ) from exc
        os.ftruncate(self._fd, 0)
        os.write(self._fd, str(os.getpid()).encode())

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None


def _lock(fd: int) -> None:
    if os.name == "nt":  # pragma: no cover - exercised on Windows only
        import msvcrt
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined,unused-ignore]
    else:
        import fcntl
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
