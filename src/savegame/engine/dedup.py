"""Incremental saves: which entries of a save the run's content store already holds.

An incremental checkpoint (format v4) writes only its new bytes, into a pack file of
the run's content store (``data/<id>.safetensors``), and references every other
entry where an earlier save put it. An entry's identity is its xxh3-128 digest and
size (its checksum in a v4 manifest, so nothing is hashed twice).

:class:`Dedup` decides, in the training thread before the snapshot, which entries
can be referenced, so unchanged tensors are neither copied nor written. It compares
against the last save it committed (:meth:`Dedup.committed`), whose packs that save's
own manifest keeps alive until the next save commits. A tensor is taken for
unchanged only when

* it is the very storage the last save saw (this object holds a reference to it, so
  its address cannot have been reused by another tensor), its version counter has not
  moved (every in-place torch op bumps it) and a sampled fingerprint of its bytes is
  unchanged (writes that bypass the counter, through ``.data`` or NumPy, show up there);
* or, for a small CPU tensor (at most ``FULL`` bytes) whose counter did not move or which
  is new to this object (a fresh copy, an RNG state), its full digest is in the index:
  exact, and cheaper than any bookkeeping.

A tensor whose counter moved is presumed changed and written without hashing first
(its digest is computed while it is written, as every checksum is), so a full-training
save costs what a plain one does. At the first save of a process nothing has been seen:
entries are then hashed up front (CPU tensors) and matched against the newest
checkpoint's index, so a resumed run does not rewrite its frozen parts.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from savegame.format import checksum, layout
from savegame.format import names as n

FULL = 64 << 10  # CPU tensors up to this size are hashed in full instead of fingerprinted
SAMPLES = 64  # blocks of SAMPLE bytes a fingerprint reads, spread evenly over the tensor
SAMPLE = 64


@dataclass(frozen=True)
class Location:
    """Where an entry's bytes lie in the content store: a pack, its header checksum, a byte range."""

    file: str
    file_sum: checksum.Value
    start: int
    end: int
    digest: checksum.Value


Key = tuple[checksum.Value, int]  # (xxh3-128 digest, size in bytes)


@dataclass
class _Seen:
    tensor: torch.Tensor  # held: while it lives, no other tensor can get its address
    version: int
    fingerprint: str
    key: Key


def index_of(doc: Mapping[str, Any]) -> dict[Key, Location]:
    """The content index of a v4 manifest (expanded by :func:`savegame.format.manifest.loads`)."""
    if doc.get(n.M_CHECKSUM_ALGO) != checksum.XXH3_128:
        return {}
    entries, files, sums = doc[n.M_ENTRIES], doc[n.M_FILES], doc[n.M_FILE_CHECKSUMS]
    out: dict[Key, Location] = {}
    for k, start, end, digest in zip(entries[n.E_FILE], entries[n.E_START], entries[n.E_END], entries[n.E_SUM],
                                     strict=True):
        if n.is_pack_file(files[k]):
            out[(digest, end - start)] = Location(files[k], sums[k], start, end, digest)
    return out


class Dedup:
    """The incremental state of one writer: the last committed save's index and the tensors it saw."""

    def __init__(self) -> None:
        self.index: dict[Key, Location] = {}
        self._seen: dict[tuple[Any, ...], _Seen] = {}
        self._pending: dict[tuple[Any, ...], tuple[torch.Tensor, int, str, int]] = {}  # ident -> (t, ver, fp, e)

    def seed(self, doc: Mapping[str, Any]) -> None:
        """Start from an existing checkpoint's index (the newest one, or the one restored) if none is held."""
        if not self.index:
            self.index = index_of(doc)

    def apply(self, plan: layout.TensorPlan, shard_bytes: int) -> dict[int, Location]:
        """:meth:`reuse`, and ``plan`` laid out again with only the entries to write."""
        found = self.reuse(plan)
        if found:
            layout.leave_out(plan, found, shard_bytes)
        return found

    def reuse(self, plan: layout.TensorPlan) -> dict[int, Location]:
        """Entries of ``plan`` the content store already holds (entry -> where); call before the snapshot."""
        spans = {plan.tensor_entry[v["tensor"]] for v in plan.views}
        found: dict[int, Location] = {}
        self._pending = {}
        first, index = not self._seen, self.index
        for e, src in enumerate(plan.sources):
            size = plan.sizes[e]
            if not size or not src.is_contiguous() or (not src.is_cpu and size <= FULL):
                continue  # (a small GPU tensor: a fingerprint's device round trip costs more than writing it)
            ident = (src.device, src.data_ptr(), size, src.dtype, tuple(src.shape))
            version = src._version
            if src.is_cpu and size <= FULL:  # exact and cheap: hashed in full unless its counter moved
                seen = self._seen.get(ident)
                self._pending[ident] = (src, version, "", e)
                if index and (seen is None or seen.version == version):  # new to us (a fresh copy, an RNG state)
                    key = (digest(src, size), size)
                    if key in self.index:
                        found[e] = self.index[key]
                continue
            if e in spans:  # a span of a shared storage is a fresh tensor each save: no counter to go by
                continue
            seen = self._seen.get(ident)
            fingerprint = _fingerprint(src, size)
            self._pending[ident] = (src, version, fingerprint, e)
            if seen is not None and seen.tensor.data_ptr() == src.data_ptr() and seen.version == version \
                    and seen.fingerprint == fingerprint and seen.key in self.index:
                found[e] = self.index[seen.key]
            elif first and index and src.is_cpu and (key := (digest(src, size), size)) in self.index:
                found[e] = self.index[key]
        return found

    def committed(self, body: Mapping[str, Any]) -> None:
        """The save planned last is durable; ``body`` is its manifest (expanded)."""
        entries = body[n.M_ENTRIES]
        keys = [(d, end - start) for d, start, end in zip(entries[n.E_SUM], entries[n.E_START], entries[n.E_END],
                                                          strict=True)]
        self.index = index_of(body)
        seen = {ident: _Seen(tensor.detach(), version, fingerprint, keys[e])
                for ident, (tensor, version, fingerprint, e) in self._pending.items()}
        self._pending = {}
        # A tensor nothing else holds (a fresh copy a state_dict() made) is not kept alive until the next save.
        self._seen = {ident: s for ident, s in seen.items() if _held_elsewhere(s.tensor)}

    def keep(self, written: list[tuple[Key, Location]]) -> None:
        """A distributed save committed: what this rank stored or referenced is the next save's index."""
        self.index = dict(written)

    def forget(self) -> None:
        """A save failed: nothing seen is trusted any more (the next save writes or hashes everything)."""
        self.index, self._seen, self._pending = {}, {}, {}


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
    raw = (ctypes.c_char * size).from_address(src.data_ptr())
    return xxhash.xxh3_128_hexdigest(memoryview(raw))


def _fingerprint(src: torch.Tensor, size: int) -> str:
    """A digest of ``SAMPLES`` blocks spread over the tensor's bytes (on its device, then brought here)."""
    flat = src.reshape(-1).view(torch.uint8)
    step = max(1, (size - SAMPLE) // max(1, SAMPLES - 1))
    starts = torch.arange(0, max(1, size - SAMPLE + 1), step, device=src.device)[:SAMPLES]
    index = (starts[:, None] + torch.arange(min(SAMPLE, size), device=src.device)[None, :]).reshape(-1)
    sample = flat.index_select(0, index)
    return xxhash.xxh3_64_hexdigest(sample.cpu().numpy().tobytes())
