"""Incremental saves: which entries of a save the run's content store already holds.

An incremental checkpoint (format v4) writes only its new bytes, into a pack file of
the run's content store (``data/<id>.safetensors``), and references every other
entry where an earlier save put it. An entry's identity is its xxh3-128 digest and
size (its checksum in a v4 manifest, so nothing is hashed twice); for an entry stored
compressed (v5), the digest and size of its raw bytes, which the manifest's ``content``
and ``raw`` columns record, so compressed and plain saves share entries.

:class:`Dedup` decides, in the training thread before the snapshot, which entries
can be referenced, so unchanged tensors are neither copied nor written. It compares
against the last save it committed (:meth:`Dedup.committed`), whose packs that save's
own manifest keeps alive until the next save commits. A tensor is taken for
unchanged only when

* it is the very storage the last save saw (this object holds a reference to it, so
  its address cannot have been reused by another tensor), its version counter has not
  moved (every in-place torch op bumps it) and a sampled fingerprint of its bytes is
  unchanged (writes that bypass the counter, through ``.data`` or NumPy, show up there);
* or, for a small CPU tensor (at most ``FULL`` bytes) whose counter did not move (matched
  by position with the last save, a hint only) or which is new, its full digest is in
  the index: exact, and cheaper than any bookkeeping.

A save references a pack only where it uses at least ``LIVE`` of the pack's bytes
(:func:`worth_keeping`), so a few unchanged bytes never keep a large dead pack alive.

A tensor whose counter moved is presumed changed and written without hashing first
(its digest is computed while it is written, as every checksum is), so a full-training
save costs what a plain one does. At the first save of a process nothing has been seen:
entries are then hashed up front (CPU tensors) and matched against the newest
checkpoint's index, so a resumed run does not rewrite its frozen parts.
"""

from __future__ import annotations

import ctypes
import logging
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import xxhash

from savegame.errors import StorageError
from savegame.format import checksum, layout
from savegame.format import names as n

log = logging.getLogger("savegame.engine.dedup")

FULL = 64 << 10  # CPU tensors up to this size are hashed in full instead of fingerprinted
SAMPLES = 64  # blocks of SAMPLE bytes a fingerprint reads, spread evenly over the tensor
SAMPLE = 64
LIVE = 0.5  # a save references a pack only when it uses at least this share of the pack's bytes


@dataclass(frozen=True)
class Location:
    """Where an entry's bytes lie in the content store: a pack, its header checksum, a byte range."""

    file: str
    file_sum: checksum.Value
    start: int
    end: int
    digest: checksum.Value  # of the stored bytes (the entry's checksum)
    codec: str = n.CODEC_RAW  # v5: how the bytes are stored; compressed, ``raw`` and ``content`` say what they hold
    raw: int = -1
    content: checksum.Value = ""


Key = tuple[checksum.Value, int]  # (xxh3-128 digest, size in bytes)


@dataclass
class _Seen:
    tensor: torch.Tensor  # held: while it lives, no other tensor can get its address
    version: int
    fingerprint: str
    key: Key


class Index:
    """What a save stored where: content key -> :class:`Location`. Built from a manifest's columns without an
    object per entry (a save of 50,000 tensors must not make 50,000 of them); a location is made when asked."""

    def __init__(self, doc: Mapping[str, Any] | None = None, pairs: Iterable[tuple[Key, Location]] = ()) -> None:
        self._made: dict[Key, Location] = dict(pairs)
        self._at: dict[checksum.Value, int] = {}  # digest -> entry (keyed by the digest alone: no tuple per entry)
        if doc is None or doc.get(n.M_CHECKSUM_ALGO) != checksum.XXH3_128:
            return
        entries, self._files, self._sums = doc[n.M_ENTRIES], doc[n.M_FILES], doc[n.M_FILE_CHECKSUMS]
        self._file, self._start, self._end, self._digest = (entries[c] for c in (n.E_FILE, n.E_START, n.E_END,
                                                                                n.E_SUM))
        # v5: compressed entries are known by the digest of their bytes before compression, and their raw size
        self._codec, self._raw = entries.get(n.E_CODEC), entries.get(n.E_RAW)
        self._content = entries.get(n.E_CONTENT) if self._codec is not None else self._digest
        if self._content is None:  # (compressed entries without a content identity: never shared)
            self._content = [d if c == n.CODEC_RAW else "" for d, c in zip(self._digest, self._codec, strict=True)]
        if all(map(n.is_pack_file, self._files)):
            self._at = dict(zip(self._content, range(len(self._start))))
        else:  # (a v4 manifest may also name files of its own directory: those are not shared)
            packed = [n.is_pack_file(f) for f in self._files]
            self._at = {d: e for e, d in enumerate(self._content) if packed[self._file[e]]}
        self._at.pop("", None)

    def __bool__(self) -> bool:
        return bool(self._at or self._made)

    def __len__(self) -> int:
        return len(self._at) + len(self._made)

    def get(self, key: Key) -> Location | None:
        loc = self._made.get(key)
        if loc is None and (e := self._at.get(key[0])) is not None and self._size(e) == key[1]:
            k = self._file[e]
            if self._codec is None or self._codec[e] == n.CODEC_RAW:
                loc = Location(self._files[k], self._sums[k], self._start[e], self._end[e], self._digest[e])
            else:
                loc = Location(self._files[k], self._sums[k], self._start[e], self._end[e], self._digest[e],
                               self._codec[e], self._raw[e], self._content[e])
            self._made[key] = loc
        return loc

    def _size(self, e: int) -> int:
        """Entry ``e``'s size before compression."""
        return int(self._raw[e]) if self._raw is not None else self._end[e] - self._start[e]


def index_of(doc: Mapping[str, Any]) -> Index:
    """The content index of a v4 manifest (expanded by :func:`savegame.format.manifest.loads`)."""
    return Index(doc)


class Dedup:
    """The incremental state of one writer: the last committed save's index and what it saw of the tensors."""

    def __init__(self) -> None:
        self.index = Index()
        self._versions: list[int] | None = None  # per entry of the last save: its version counter
        self._seen: dict[tuple[Any, ...], _Seen] = {}  # tensors over FULL bytes of the last save
        self._pending: dict[tuple[Any, ...], tuple[torch.Tensor, int, str | None, int]] = {}  # ident -> (t, ver, fp, e)
        self._pending_versions: list[int] = []
        self._pack_sizes: dict[str, int] = {}

    def seed(self, doc: Mapping[str, Any]) -> None:
        """Start from an existing checkpoint's index (the newest one, or the one restored) if none is held."""
        if not self.index:
            self.index = index_of(doc)

    def apply(self, plan: layout.TensorPlan, shard_bytes: int,
              pack_size: Callable[[str], int] | None = None) -> dict[int, Location]:
        """:meth:`reuse` (kept to packs worth keeping, see :func:`worth_keeping`), and ``plan`` laid out again
        with only the entries to write."""
        found = self.reuse(plan)
        if found and pack_size is not None:
            try:
                found = worth_keeping(found, self._sized(pack_size))
            except StorageError as exc:  # a pack went missing behind savegame's back: store everything anew
                log.warning("the content store lost a pack this save would use (%s); writing every tensor", exc)
                self.forget()
                found = {}
        if found:
            layout.leave_out(plan, found, shard_bytes)
        return found

    def _sized(self, pack_size: Callable[[str], int]) -> Callable[[str], int]:
        """``pack_size``, cached: packs never change."""
        def size(file: str) -> int:
            if file not in self._pack_sizes:
                self._pack_sizes[file] = pack_size(file)
            return self._pack_sizes[file]
        return size

    def reuse(self, plan: layout.TensorPlan) -> dict[int, Location]:
        """Entries of ``plan`` the content store already holds (entry -> where); call before the snapshot.

        Per entry this costs one read of the version counter when its tensor changed (full training);
        entries are matched by position with the last save's, which is only ever a hint: a small tensor
        is then hashed (exact), a large one must pass the checks of :meth:`_unchanged`.
        """
        index, sources, sizes = self.index, plan.sources, plan.sizes
        versions = self._pending_versions = [src._version for src in sources]
        old = self._versions if self._versions is not None and len(self._versions) == len(versions) else None
        self._pending = {}
        found: dict[int, Location] = {}
        spans = {plan.tensor_entry[v["tensor"]] for v in plan.views}
        any_index = bool(index)
        for e, size in enumerate(sizes):
            if size <= FULL:  # hashed in full (exact and cheap) unless its counter moved: presumed changed
                if not any_index or (old is not None and old[e] != versions[e]) or not size:
                    continue
                src = sources[e]
                if src.is_cpu and src.is_contiguous() and (loc := index.get((digest(src, size), size))):
                    found[e] = loc
            elif e not in spans and sources[e].is_contiguous():  # (a span is a fresh tensor each save)
                loc = self._unchanged(sources[e], size, versions[e], e, first=old is None)
                if loc is not None:
                    found[e] = loc
        return found

    def _unchanged(self, src: torch.Tensor, size: int, version: int, e: int, *, first: bool) -> Location | None:
        """Where a large tensor's bytes are, if it is the very storage the last save saw, with the same version
        and fingerprint (or, at a process's first save, its CPU bytes hash to a stored entry)."""
        ident = (src.device, src.data_ptr(), size, src.dtype, tuple(src.shape))
        seen = self._seen.get(ident)
        if seen is not None and seen.version == version:
            fingerprint: str | None = _fingerprint(src, size)
            self._pending[ident] = (src, version, fingerprint, e)
            if seen.fingerprint == fingerprint:
                return self.index.get(seen.key)
        else:  # changed (full training): fingerprinted from the bytes saved, in the writer (see committed)
            self._pending[ident] = (src, version, None, e)
        if first and self.index and src.is_cpu:
            return self.index.get((digest(src, size), size))
        return None

    def committed(self, body: Mapping[str, Any], plan: layout.TensorPlan | None = None,
                  snap: list[torch.Tensor] | None = None) -> None:
        """The save planned last is durable; ``body`` is its manifest (expanded), ``plan`` and ``snap`` its
        plan and staged bytes (None: it wrote the live tensors, unchanged since).

        The fingerprints of tensors that changed are taken here, from the bytes the save wrote: off the
        training thread, and a fingerprint of exactly what the checkpoint holds.
        """
        entries = body[n.M_ENTRIES]
        self.index = index_of(body)
        self._versions, self._pending_versions = self._pending_versions, []
        seen = {ident: _Seen(tensor.detach(), version,
                             fingerprint if fingerprint is not None else _saved_fingerprint(tensor, e, plan, snap),
                             key_of(entries, e))
                for ident, (tensor, version, fingerprint, e) in self._pending.items()}
        self._pending = {}
        # A tensor nothing else holds (a fresh copy a state_dict() made) is not kept alive until the next save.
        self._seen = {ident: s for ident, s in seen.items() if _held_elsewhere(s.tensor)}

    def keep(self, written: list[tuple[Key, Location]]) -> None:
        """A distributed save committed: what this rank stored or referenced is the next save's index."""
        self.index = Index(pairs=written)

    def forget(self) -> None:
        """A save failed: nothing seen is trusted any more (the next save writes or hashes everything)."""
        self.index, self._seen, self._pending, self._versions = Index(), {}, {}, None
        self._pack_sizes = {}


def key_of(entries: Mapping[str, Any], e: int) -> Key:
    """Entry ``e``'s content key in an (expanded) entry table: the digest and size of its bytes before
    compression (for an entry stored raw, its checksum and size)."""
    codecs = entries.get(n.E_CODEC)
    if codecs is None or codecs[e] == n.CODEC_RAW:
        return entries[n.E_SUM][e], entries[n.E_END][e] - entries[n.E_START][e]
    return entries[n.E_CONTENT][e], entries[n.E_RAW][e]


def worth_keeping(found: Mapping[int, Location], pack_size: Callable[[str], int]) -> dict[int, Location]:
    """``found`` without the entries of packs a save would use less than ``LIVE`` of (by bytes).

    A pack lives while any checkpoint uses any entry of it. Without this rule a small unchanged
    tensor (an RNG state, a step counter) of full training would keep the first save's whole pack
    alive for ever; rewriting its few bytes frees the pack once the older checkpoints go. So every
    pack the newest checkpoint uses is at least ``LIVE`` used by it.
    """
    used: dict[str, int] = {}
    for loc in found.values():
        used[loc.file] = used.get(loc.file, 0) + loc.end - loc.start
    keep = {file for file, nbytes in used.items() if nbytes >= LIVE * pack_size(file)}
    return {e: loc for e, loc in found.items() if loc.file in keep}


def _held_elsewhere(tensor: torch.Tensor) -> bool:
    """Whether some other tensor shares ``tensor``'s storage (a model's parameter, an optimizer's state)."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:  # (a private torch function: without it, assume so)
        return True
    return int(count(tensor.untyped_storage()._cdata)) > 2  # this tensor's and the temporary storage object's


def digest(src: torch.Tensor, size: int | None = None) -> str:
    """The xxh3-128 digest of a contiguous CPU tensor's bytes."""
    size = src.nbytes if size is None else size
    if not size:
        return xxhash.xxh3_128_hexdigest(b"")
    kind = _CHARS.get(size)
    if kind is None:
        kind = _CHARS[size] = ctypes.c_char * size
    return xxhash.xxh3_128_hexdigest(memoryview(kind.from_address(src.data_ptr())))


_CHARS: dict[int, Any] = {}  # ctypes array types by size: making one costs microseconds


def _saved_fingerprint(live: torch.Tensor, e: int, plan: layout.TensorPlan | None,
                       snap: list[torch.Tensor] | None) -> str:
    """The fingerprint of entry ``e`` as saved: from its staged copy, else from ``live`` (a save that wrote the
    live tensors, which did not change while it did)."""
    size = live.nbytes
    if plan is None or snap is None or plan.shard[e] < 0:
        return _fingerprint(live, size)
    start = plan.start[e]
    return _fingerprint(snap[plan.shard[e]][start:start + size], size)


def _fingerprint(src: torch.Tensor, size: int) -> str:
    """A digest of ``SAMPLES`` blocks spread over the tensor's bytes (the same bytes wherever it lives)."""
    index = _samples(size)
    if src.is_cpu:
        kind = _CHARS.get(size)
        if kind is None:
            kind = _CHARS[size] = ctypes.c_char * size
        sample = np.frombuffer(memoryview(kind.from_address(src.data_ptr())), dtype=np.uint8)[index]
    else:
        flat = src.reshape(-1).view(torch.uint8)
        sample = flat.index_select(0, torch.from_numpy(index).to(src.device)).cpu().numpy()
    return xxhash.xxh3_64_hexdigest(sample.tobytes())


def _samples(size: int) -> np.ndarray:
    """The byte offsets a fingerprint of ``size`` bytes reads (cached by size)."""
    index = _SAMPLES.get(size)
    if index is None:
        block = min(SAMPLE, size)
        starts = np.linspace(0, size - block, num=min(SAMPLES, size // block), dtype=np.int64)
        index = _SAMPLES[size] = (starts[:, None] + np.arange(block, dtype=np.int64)[None, :]).reshape(-1)
    return index


_SAMPLES: dict[int, np.ndarray] = {}
