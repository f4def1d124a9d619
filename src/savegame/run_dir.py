"""A run directory: its checkpoints, their names and records, and the alias pointer files."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from savegame import reader
from savegame.commit import RenameCommit, write_file_atomic
from savegame.errors import CorruptCheckpointError, StorageError
from savegame.format import codec
from savegame.format import names as n
from savegame.policies import CheckpointRecord
from savegame.run_lock import RunLock
from savegame.storage.base import Storage

__all__ = ["CheckpointInfo", "RunDir", "RunLock", "alias_file", "alias_of_file", "checkpoint_name", "parse_step"]

log = logging.getLogger("savegame.run")

_NAME_RE = re.compile(r"step-(\d{10,})(?:-[^/\\]*)?(?:\.(\d+))?")
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


@dataclass(frozen=True)
class CheckpointInfo:
    """What a run directory knows about one committed checkpoint (from its manifest).

    ``best`` is the best-tracking state stored in it (``{metric: {"mode", "entries"}}``),
    or None when it has none.
    """

    name: str
    step: int
    epoch: int | None
    metrics: dict[str, float]
    extra: Any
    time: float
    bytes: int = 0
    pinned: bool = False
    aliases: tuple[str, ...] = field(default=())
    best: Mapping[str, Any] | None = None

    def record(self) -> CheckpointRecord:
        return CheckpointRecord(step=self.step, name=self.name, time=self.time, epoch=self.epoch,
                                metrics=self.metrics, pinned=self.pinned)


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
        self._warned: set[str] = set()  # damaged checkpoints already reported

    def names(self) -> list[str]:
        """Committed checkpoint names, oldest step first (leftovers and other files ignored)."""
        if not self.storage.exists(""):
            return []
        found = [name for name in self.storage.list_dir("") if parse_step(name) is not None]
        return sorted(found, key=lambda name: (parse_step(name), name))

    def newest_first(self) -> list[str]:
        """Every checkpoint name, newest first: by step, then save time (damaged ones by name)."""
        def key(name: str) -> tuple[int, float, str]:
            info = self._infos.get(name)
            return (parse_step(name) or 0, info.time if info else -math.inf, name)
        self.infos()  # reads (and caches) every manifest that reads
        return sorted(self.names(), key=key, reverse=True)

    def unique_name(self, step: int, fields: str = "", *, freed: frozenset[str] = frozenset()) -> str:
        """A name for a new checkpoint of ``step`` that no entry has (``freed`` ones are about to go)."""
        existing = set(self.storage.list_dir("")) - freed if self.storage.exists("") else set()
        base = checkpoint_name(step, fields)
        name, k = base, 0
        while name in existing:
            k += 1
            name = f"{base}.{k}"
        return name

    def remember(self, info: CheckpointInfo) -> None:
        """Record a checkpoint this process just committed (no need to read its manifest back)."""
        self._infos[info.name] = info

    def forget(self, name: str) -> None:
        self._infos.pop(name, None)

    def delete(self, name: str) -> None:
        self.forget(name)
        self.commit.delete(self.storage, name)

    def info(self, name: str) -> CheckpointInfo:
        """Read one manifest (checksummed); raises CorruptCheckpointError."""
        if name in self._infos:
            return self._infos[name]
        doc = reader.read_manifest(self.storage, name)
        meta = reader.decode_meta(doc)
        size = reader.data_bytes(doc)
        info = CheckpointInfo(name, meta["step"], meta["epoch"], meta["metrics"] or {}, meta["extra"],
                              float(meta["time"] or 0.0), size, doc.get(n.M_PINNED) is True, best=_stored_best(doc))
        self._infos[name] = info
        return info

    def infos(self) -> list[CheckpointInfo]:
        """Every checkpoint whose manifest reads; the others are left out (and logged once each)."""
        out = []
        for name in self.names():
            try:
                out.append(self.info(name))
            except CorruptCheckpointError as exc:
                if name not in self._warned:
                    self._warned.add(name)
                    log.warning("skipping checkpoint %s: %s", name, exc)
        return out

    def unreadable(self) -> list[str]:
        """Listed checkpoints whose manifest does not read (after :meth:`infos`)."""
        return [name for name in self.names() if name not in self._infos]

    # Aliases: tiny JSON pointer files, replaced atomically. They are hints for people and tools.
    def write_alias(self, alias: str, target: str, **about: Any) -> None:
        data = json.dumps({"alias": alias, "target": target, **about}).encode()
        write_file_atomic(self.storage, alias_file(alias), data)

    def read_alias(self, alias: str) -> str | None:
        try:
            doc = json.loads(self.storage.read_bytes(alias_file(alias)))
        except (StorageError, ValueError, UnicodeDecodeError):
            return None
        target = doc.get("target") if isinstance(doc, dict) else None
        return target if isinstance(target, str) and parse_step(target) is not None else None

    def aliases(self) -> dict[str, str]:
        out = {}
        for name in self.storage.list_dir("") if self.storage.exists("") else []:
            alias = alias_of_file(name)
            if alias is not None:
                target = self.read_alias(alias)
                if target:
                    out[alias] = target
        return out


def alias_file(alias: str) -> str:
    """The file name of an alias: ':' is written '__', any other character outside [A-Za-z0-9._-] as %XX.

    ``best:val/loss`` -> ``best__val%2Floss.alias.json``; reversible by :func:`alias_of_file`.
    """
    head, sep, metric = alias.partition(":")
    escaped = "".join(c if c in _SAFE else "".join(f"%{b:02X}" for b in c.encode()) for c in metric)
    return f"{head}__{escaped}{n.ALIAS_SUFFIX}" if sep else f"{head}{n.ALIAS_SUFFIX}"


def alias_of_file(file: str) -> str | None:
    """The alias a file name stands for (the inverse of :func:`alias_file`), or None."""
    if not file.endswith(n.ALIAS_SUFFIX) or file.startswith((n.TMP_PREFIX, n.TRASH_PREFIX)):
        return None
    head, sep, metric = file[: -len(n.ALIAS_SUFFIX)].partition("__")
    try:
        return f"{head}:{_unescape(metric)}" if sep else head
    except ValueError:
        return None


def _unescape(text: str) -> str:
    raw, i = bytearray(), 0
    while i < len(text):
        if text[i] == "%":
            raw.append(int(text[i + 1:i + 3], 16))
            i += 3
        else:
            raw += text[i].encode()
            i += 1
    return raw.decode()


def _stored_best(doc: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The best-tracking state inside a manifest's value tree (it never holds tensors)."""
    tree = doc.get(n.M_TREE)
    run = tree.get(n.TREE_RUN) if isinstance(tree, dict) else None
    try:
        decoded = codec.decode(run, [])
    except CorruptCheckpointError:
        return None
    best = decoded.get("best") if isinstance(decoded, dict) else None
    return best if isinstance(best, dict) else None
