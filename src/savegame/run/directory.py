"""A run directory: its checkpoints, their names and records, and the alias pointer files."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from savegame.engine import reader
from savegame.errors import CorruptCheckpointError, StorageError
from savegame.format import names as n
from savegame.policies import CheckpointRecord
from savegame.policies._common import recency
from savegame.run.lock import RunLock
from savegame.run.records import CheckpointInfo, info_from_manifest
from savegame.storage.base import Storage
from savegame.storage.commit import commit_of, write_file_atomic

__all__ = ["CheckpointInfo", "RunDir", "RunLock", "alias_file", "alias_of_file", "checkpoint_name",
           "info_from_manifest", "parse_step"]

log = logging.getLogger("savegame.run")

_NAME_RE = re.compile(r"step-(\d{10,})(?:-[^/\\]*)?(?:\.(\d+))?", re.ASCII)
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def checkpoint_name(step: int, fields: str = "") -> str:
    base = n.CHECKPOINT_NAME.format(step=step)
    return f"{base}-{fields}" if fields else base


def parse_step(name: str) -> int | None:
    match = _NAME_RE.fullmatch(name)
    return int(match.group(1)) if match else None


class RunDir:
    """The checkpoints of one run directory and what their manifests say.

    The listing and the records are read once and then kept current by this object's own
    changes (:meth:`remember`, :meth:`delete`, :meth:`forget`), so the bookkeeping of a save
    neither lists the directory nor reads a manifest again, however long the run is.
    :meth:`refresh` lists it again (``restore()`` does, as another process may have changed it).
    A checkpoint whose manifest, or any field of it the run needs, cannot be read is
    *damaged*: listed by :meth:`unreadable`, never in :meth:`infos`. One that disappears
    while being read (deleted by its writer's retention) is gone, not damaged.
    """

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.commit = commit_of(storage)
        # Committed checkpoints never change, so what their manifests say is read once.
        self._infos: dict[str, CheckpointInfo] = {}
        self._damaged: dict[str, str] = {}  # name -> why it cannot be read
        self._warned: set[str] = set()  # damaged checkpoints already reported
        self._listed: set[str] | None = None
        self._named: set[str] = set()  # names unique_name() gave out (a failed save's objects may remain)
        self._sorted: list[str] | None = None
        self._readable: list[CheckpointInfo] | None = None
        self._records: list[CheckpointRecord] | None = None
        self._by_step: dict[int, set[str]] = {}  # step -> names of its readable saves
        self._all_read = False  # every listed manifest has been read once
        self._max_seq = -1
        self._aliases: dict[str, str] = {}  # alias -> the target this object last wrote

    def refresh(self) -> None:
        """Forget the listing and the damaged checkpoints: the next question reads the directory again."""
        self._listed = None
        self._all_read = False
        self._damaged.clear()
        self._changed()

    def names(self) -> list[str]:
        """Committed checkpoint names, oldest step first (leftovers and other files ignored)."""
        if self._sorted is None:
            if self._listed is None:
                self._listed = set(self._list())
                for gone in set(self._infos) - self._listed:
                    self._drop(gone)
            self._sorted = sorted(self._listed, key=lambda name: (parse_step(name), name))
        return list(self._sorted)

    def _list(self) -> list[str]:
        if not self.storage.exists(""):
            return []
        names = [name for name in self.storage.list_dir("") if parse_step(name) is not None]
        return self.commit.visible(self.storage, names)

    def newest_first(self) -> list[str]:
        """Every checkpoint name, newest first: readable ones by :func:`policies.recency`
        (step, commit sequence, save time), damaged ones by step and name."""
        records = {r.name: recency(r) for r in self.records()}

        def key(name: str) -> tuple[int, bool, int, float, str]:
            return records.get(name) or (parse_step(name) or 0, False, 0, -math.inf, name)
        return sorted(self.names(), key=key, reverse=True)

    def unique_name(self, step: int, fields: str = "", *, freed: frozenset[str] = frozenset()) -> str:
        """A name for a new checkpoint of ``step`` that no entry has (``freed`` ones are about to go)."""
        base = checkpoint_name(step, fields)
        name, k = base, 0
        while name not in freed and (name in self._named or self._taken(name)):
            k += 1
            name = f"{base}.{k}"
        self._named.add(name)
        return name

    def _taken(self, name: str) -> bool:
        """On an object store whose listing this object holds, the answer needs no request (so save() sends
        none on the caller's thread): the lease holder removed every uncommitted leftover when it took the
        run, and no other process writes while it holds the lease."""
        if self.commit.name == "manifest-last" and self._listed is not None:
            return name in self._listed
        return self.storage.exists(name)

    def next_seq(self) -> int:
        """The commit sequence of the next save: above that of every readable checkpoint."""
        if not self._all_read:
            self.infos()
        return self._max_seq + 1

    def saves_of(self, step: int) -> list[CheckpointRecord]:
        """The records of the readable saves of ``step`` (after :meth:`infos`)."""
        return [self._infos[name].record() for name in self._by_step.get(step, ())]

    def records_of(self, names: Iterable[str]) -> list[CheckpointRecord]:
        """The records of those of ``names`` that are readable checkpoints (after :meth:`infos`)."""
        return [self._infos[name].record() for name in names if name in self._infos]

    def remember(self, info: CheckpointInfo) -> None:
        """Record a checkpoint this process just committed (no need to read its manifest back)."""
        self._add(info)
        if self._listed is not None:
            self._listed.add(info.name)
        self._changed()

    def forget(self, name: str) -> None:
        """``name`` left the run directory (deleted or moved aside by this process)."""
        self._drop(name)
        self._damaged.pop(name, None)
        if self._listed is not None:
            self._listed.discard(name)
        self._changed()

    def delete(self, name: str) -> None:
        try:
            self.commit.delete(self.storage, name)
        finally:
            if not self.storage.exists(name):
                self.forget(name)

    def info(self, name: str) -> CheckpointInfo:
        """Read one manifest (checksummed) and check the fields the run uses; raises CorruptCheckpointError."""
        if name in self._infos:
            return self._infos[name]
        if name in self._damaged:
            raise CorruptCheckpointError(self._damaged[name])
        doc = reader.read_manifest(self.storage, name)
        info = info_from_manifest(f"{self.storage.root}/{name}", name, doc)
        self._add(info)
        return info

    def infos(self) -> list[CheckpointInfo]:
        """Every checkpoint whose manifest reads; the others are left out (and logged once each)."""
        if self._readable is None:
            readable = [info for name in self.names() if (info := self._try_info(name)) is not None]
            self._readable, self._all_read = readable, True
        return list(self._readable)

    def records(self) -> list[CheckpointRecord]:
        """The policy records of :meth:`infos`, in the same order."""
        if self._records is None or self._readable is None:
            self._records = [info.record() for info in self.infos()]
        return list(self._records)

    def unreadable(self) -> list[str]:
        """Listed checkpoints whose manifest does not read (after :meth:`infos`)."""
        return [name for name in self.names() if name not in self._infos]

    def problem(self, name: str) -> str | None:
        """Why checkpoint ``name`` is damaged, when it is known to be."""
        return self._damaged.get(name)

    def _try_info(self, name: str) -> CheckpointInfo | None:
        if name in self._damaged:
            return None
        try:
            return self.info(name)
        except CorruptCheckpointError as exc:
            if not self.storage.exists(name):  # deleted while being read (another process's retention): gone
                log.debug("checkpoint %s disappeared while being read", name)
                if self._listed is not None:
                    self._listed.discard(name)
                self._sorted = None
                return None
            self._damaged[name] = str(exc)
            if name not in self._warned:
                self._warned.add(name)
                log.warning("skipping checkpoint %s: %s", name, exc)
            return None

    def _add(self, info: CheckpointInfo) -> None:
        self._drop(info.name)
        self._infos[info.name] = info
        self._by_step.setdefault(info.step, set()).add(info.name)
        self._damaged.pop(info.name, None)
        if info.seq is not None:
            self._max_seq = max(self._max_seq, info.seq)

    def _drop(self, name: str) -> None:
        info = self._infos.pop(name, None)
        if info is not None:
            saves = self._by_step.get(info.step, set())
            saves.discard(name)
            if not saves:
                self._by_step.pop(info.step, None)

    def _changed(self) -> None:
        self._sorted = self._readable = self._records = None

    # Aliases: tiny JSON pointer files, replaced atomically. They are hints for people and tools.
    def write_alias(self, alias: str, target: str, **about: Any) -> None:
        data = json.dumps({"alias": alias, "target": target, **about}).encode()
        self._aliases.pop(alias, None)
        write_file_atomic(self.storage, alias_file(alias), data)
        self._aliases[alias] = target  # what this process wrote last (a writer holds the run's lock)

    def write_aliases(self, targets: Mapping[str, CheckpointRecord], modes: Mapping[str, str], *,
                      only_stale: bool = False) -> list[str]:
        """Write the alias files of ``targets`` (see :func:`policies.alias_targets`); best ones say their metric,
        mode and value. ``only_stale``: only those that do not name their target already. Returns the aliases
        written; raises StorageError."""
        first = next(iter(modes), None)
        written = []
        for alias, target in targets.items():
            if only_stale and (self._aliases.get(alias) or self.read_alias(alias)) == target.name:
                continue
            metric = alias.partition(":")[2] or (first if alias == "best" else None)
            about: dict[str, Any] = {"step": target.step}
            if metric is not None:
                about = {"metric": metric, "mode": modes[metric], "value": target.metrics[metric], **about}
            self.write_alias(alias, target.name, **about)
            written.append(alias)
        return written

    def read_alias(self, alias: str) -> str | None:
        target = self.alias_about(alias).get("target")
        return target if isinstance(target, str) and parse_step(target) is not None else None

    def alias_about(self, alias: str) -> dict[str, Any]:
        """What an alias file says (``target``, ``step``, ``metric``...); empty when missing or damaged."""
        try:
            doc = json.loads(self.storage.read_bytes(alias_file(alias)))
        except (StorageError, ValueError, UnicodeDecodeError, RecursionError):
            return {}  # a damaged alias file is a missing hint: readers derive the alias from the manifests
        return doc if isinstance(doc, dict) else {}

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
