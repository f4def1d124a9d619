"""The run's content store (``data/``): which packs each manifest uses, and reclaiming the unused ones.

Reclamation is mark-and-sweep, run by the run's writer (the holder of its lock or
lease) after its retention deleted something, when it opens the run, and by
``savegame prune``. *Mark*: every manifest savegame knows is read (the listed
checkpoints, those moved to ``abandoned/``, and any in a temporary directory, a save
being committed), as raw bytes searched for pack names, so even a damaged manifest
keeps its packs. *Sweep*: every pack no manifest names is deleted.

Why this is crash-safe: a pack is written before the manifest naming it, and a
checkpoint's manifest is deleted (or renamed away) before its packs become
unreferenced; so at every instant each listed checkpoint's packs exist. A crash
between writing a pack and committing leaves a pack no manifest names, and a crash
in the middle of a sweep leaves some unreferenced packs: both are removed by the
next sweep, which every writer runs when it opens the run. A sweep never runs while
a save of the same run is in flight: only the writer sweeps, between its own saves
(a distributed job's rank 0 after every rank committed), and no other process
writes while it holds the lock or lease.

Committed manifests never change, so what each one references is read once per
process (:class:`ContentStore` caches it by name; a name this process commits again,
after retention deleted its first holder, is recorded anew by :meth:`ContentStore.remember`,
and no other process writes while this one holds the run).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any

from savegame.errors import StorageError
from savegame.format import names as n
from savegame.run.directory import parse_step
from savegame.storage.base import Storage

log = logging.getLogger("savegame.run")

_PACK_RE = re.compile(rb"data/([0-9a-f]{32})\.safetensors")


def packs_in(raw: bytes) -> set[str]:
    """The pack names (``data/<id>.safetensors``) a manifest's raw bytes mention."""
    return {n.pack_file(m.decode()) for m in _PACK_RE.findall(raw)}


class ContentStore:
    """The content store of the run at ``storage``'s root."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._refs: dict[str, frozenset[str]] = {}  # committed checkpoint -> the packs its manifest names

    def packs(self) -> list[str]:
        """Every pack file in the store (other files in ``data/`` are not savegame's and are left alone)."""
        if not self.storage.exists(n.DATA_DIR):
            return []
        return [f"{n.DATA_DIR}/{f}" for f in self.storage.list_dir(n.DATA_DIR)
                if n.is_pack_file(f"{n.DATA_DIR}/{f}")]

    def manifests(self) -> list[str]:
        """Every directory that may hold a manifest naming packs: checkpoints, in-flight saves, abandoned ones."""
        out = [name for name in self.storage.list_dir("")
               if parse_step(name) is not None or name.startswith(n.TMP_PREFIX)]
        if self.storage.exists(n.ABANDONED_DIR):
            for folder in self.storage.list_dir(n.ABANDONED_DIR):
                path = f"{n.ABANDONED_DIR}/{folder}"
                try:
                    out += [f"{path}/{name}" for name in self.storage.list_dir(path) if parse_step(name) is not None]
                except StorageError:  # a file, not a folder
                    continue
        return out

    def referenced(self, names: Iterable[str] | None = None) -> dict[str, frozenset[str]]:
        """Per manifest directory (all of :meth:`manifests` by default), the packs it names."""
        out = {}
        for name in self.manifests() if names is None else names:
            refs = self._refs.get(name)
            if refs is None:
                refs = self._read(name)
                if refs is not None and not name.startswith(n.TMP_PREFIX):
                    self._refs[name] = refs
            out[name] = refs or frozenset()
        return out

    def _read(self, name: str) -> frozenset[str] | None:
        path = f"{name}/{n.MANIFEST}"
        try:
            if not self.storage.exists(path):
                return None  # no manifest (yet): an interrupted save on an object store references nothing
            return frozenset(packs_in(self.storage.read_bytes(path)))
        except StorageError as exc:  # cannot tell what it uses: the sweep must not run
            raise StorageError(f"{self.storage.root}/{path} cannot be read ({exc}); the content store is not "
                               "swept until it can be") from exc

    def forget(self, name: str) -> None:
        """Checkpoint ``name`` was just committed by a distributed job: read its manifest again when needed."""
        self._refs.pop(name, None)

    def remember(self, name: str, files: Iterable[str]) -> None:
        """This process just committed checkpoint ``name`` naming ``files``: the cache must not hold an older
        checkpoint of the same name (one that retention deleted before)."""
        self._refs[name] = frozenset(f for f in files if n.is_pack_file(f))

    def sweep(self) -> list[str]:
        """Delete every pack no manifest names; return them. Raises StorageError (nothing lost: a later
        sweep finishes the work)."""
        packs = self.packs()
        if not packs:
            return []
        live: set[str] = set()
        for refs in self.referenced().values():
            live |= refs
        for gone in set(self._refs) - set(self.manifests()):
            self._refs.pop(gone, None)
        dead = [p for p in packs if p not in live]
        for pack in dead:
            self.storage.remove(pack)
        if dead:
            log.info("content store: removed %d pack(s) no checkpoint uses any more", len(dead))
        return dead


def usage(docs: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[int, int]]:
    """Per checkpoint of ``docs`` (name -> expanded manifest), ``(own, shared)``: the bytes of pack entries
    only it uses (deleting it alone frees them) and those another checkpoint of ``docs`` uses too."""
    users: dict[tuple[str, int, int], int] = {}
    ranges: dict[str, set[tuple[str, int, int]]] = {}
    for name, doc in docs.items():
        files, entries = doc[n.M_FILES], doc[n.M_ENTRIES]
        mine = ranges[name] = {(files[k], start, end) for k, start, end in
                               zip(entries[n.E_FILE], entries[n.E_START], entries[n.E_END], strict=True)
                               if n.is_pack_file(files[k])}
        for r in mine:
            users[r] = users.get(r, 0) + 1
    out = {}
    for name, mine in ranges.items():
        own = sum(r[2] - r[1] for r in mine if users[r] == 1)
        out[name] = (own, sum(r[2] - r[1] for r in mine) - own)
    return out


def users_of(storage: Storage, names: Iterable[str], problems: Iterable[str]) -> dict[str, list[str]]:
    """For each pack that ``problems`` (messages of damaged checkpoints) name: every one of ``names`` using it."""
    damaged = set().union(*(packs_in(p.encode()) for p in problems)) if problems else set()
    if not damaged:
        return {}
    refs = ContentStore(storage).referenced(list(names))
    return {pack: sorted(name for name, used in refs.items() if pack in used) for pack in sorted(damaged)}
