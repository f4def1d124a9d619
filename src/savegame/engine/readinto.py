"""Reading a checkpoint's entries into tensors: mapped, checked and copied once.

The data section of each tensor file is memory-mapped; every entry is checked
against its checksum and copied either into a target tensor the caller already
owns (a model's parameters) or into a fresh tensor with its own storage; an
entry bound for a GPU is streamed there by :mod:`savegame.engine.todevice`. Large
entries are checked and copied in a few threads (both release the GIL), in
pieces small enough to stay in cache between the two passes. With ``lazy``
(``load(mmap=True)``) tensors are views of the mapping instead.
"""

from __future__ import annotations

import ctypes
import mmap as _mmap
import os
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import numpy as np
import torch

from savegame.engine import inflate, todevice
from savegame.engine.staging import SMALL
from savegame.errors import CorruptCheckpointError, StorageError
from savegame.format import checksum, codec, compression
from savegame.format import names as n
from savegame.format.tensorfile import read_header
from savegame.storage.base import Storage

PIECE = 1 << 20  # checked then copied while still in cache
GAP = 1 << 16  # reading through a gap this small between entries beats a new ranged request


def dtypes_of(names: Sequence[str]) -> list[torch.dtype]:
    known = {name: codec.dtype_from_name(name) for name in set(names)}
    return [known[name] for name in names]


def file_ends(doc: Mapping[str, Any]) -> list[int]:
    """Per tensor file, how many data bytes its entries need."""
    entries = doc[n.M_ENTRIES]
    ends = [0] * len(doc[n.M_FILES])
    for k, end in zip(entries[n.E_FILE], entries[n.E_END], strict=True):
        ends[k] = max(ends[k], end)
    return ends


def allocate(doc: Mapping[str, Any], targets: Mapping[int, torch.Tensor]) -> list[torch.Tensor]:
    """Per entry, the tensor its bytes will be read into: the caller's own (``targets``, by entry) or a new one.

    Nothing is read yet, so the tree can be decoded and checked around these tensors before any byte
    reaches a target.
    """
    entries, empty = doc[n.M_ENTRIES], torch.empty
    pairs = zip(dtypes_of(entries[n.E_DTYPE]), entries[n.E_SHAPE], strict=True)
    if not targets:  # (empty(*shape) parses faster than empty(shape): this runs once per entry)
        return [empty(*shape, dtype=dtype) if shape else empty((), dtype=dtype) for dtype, shape in pairs]
    out = []
    for e, (dtype, shape) in enumerate(pairs):
        dst = targets.get(e)
        out.append(dst if dst is not None else empty(*shape, dtype=dtype) if shape else empty((), dtype=dtype))
    return out


def read_entries(storage: Storage, name: str, doc: Mapping[str, Any], *, verify: bool,
                 into: list[torch.Tensor] | None, on_device: set[int] | None = None,
                 live: Collection[int] = ()) -> list[torch.Tensor]:
    """Check and copy every entry into ``into`` (from :func:`allocate`), and return it; with ``into=None``
    (``mmap=True``) entries become views of the mapped files instead, storage spans copies. Entries in
    ``on_device`` (their tensor in ``into`` is on a GPU) are streamed there by :func:`savegame.engine.todevice.fill`.

    Compressed entries (v5) are read, checked and decompressed first, every one of them, before any
    byte reaches the tensors in ``live`` (the caller's own) or a GPU: a frame that does not decode
    leaves them untouched. With ``mmap=True`` they are tensors of their own.
    """
    entries = doc[n.M_ENTRIES]
    algo = checksum.Algorithm(doc[n.M_CHECKSUM_ALGO])
    packed = set(compression.compressed(entries))
    by_file: list[list[int]] = [[] for _ in doc[n.M_FILES]]
    for e, k in enumerate(entries[n.E_FILE]):
        if e not in packed:
            by_file[k].append(e)
    spans = {doc[n.M_TENSORS][n.T_ENTRY][v["tensor"]] for v in doc[n.M_TENSORS][n.T_VIEWS]}
    lazy = into is None
    job = _Job(entries, dtypes_of(entries[n.E_DTYPE]), algo if verify else None, into, spans, on_device or set())
    later = inflate.inflate(storage, name, doc, sorted(packed), job.out, algo if verify else None,
                            set(live) | job.on_device, lazy) if packed else {}
    ends = file_ends(doc)
    ranged = not lazy and getattr(storage, "ranged_reads", False)  # an object store: no mapping, reads by range
    for k, (file, expected) in enumerate(zip(doc[n.M_FILES], doc[n.M_FILE_CHECKSUMS], strict=True)):
        where = f"{storage.root}/{n.file_path(name, file)}"
        if packed and not by_file[k]:
            continue  # every entry of it was compressed, and read above
        if ranged and not job.on_device.intersection(by_file[k]):
            _read_straight(storage, n.file_path(name, file), where, expected, algo, job, by_file[k])
            continue
        with _DataSection(storage, n.file_path(name, file), where, expected, algo, lazy) as data:
            if ends[k] > data.length:
                raise CorruptCheckpointError(f"{where}: truncated ({data.length} data bytes, needs {ends[k]})")
            job.run(by_file[k], data, where)
    with torch.no_grad():  # (a model's parameters)
        for e, tensor in later.items():
            job.out[e].copy_(tensor)
    return job.out


def _read_straight(storage: Storage, path: str, where: str, expected: checksum.Value | None,
                   algo: checksum.Algorithm, job: _Job, entries: list[int]) -> None:
    """Read each entry's bytes from the store straight into its tensor's memory (one ranged stream over the
    file, in entry order) and check its checksum there: no file-sized buffer, no second copy."""
    starts, ends, sums = (job.entries[c] for c in (n.E_START, n.E_END, n.E_SUM))
    try:
        size = storage.size(path)
        with cast(Any, storage).read_through(path, size) as f:
            start, _ = read_header(f, size, where, expected, algo=algo, parse=False)
            need = max((ends[e] for e in entries), default=0)
            if need > size - start:
                raise CorruptCheckpointError(f"{where}: truncated ({size - start} data bytes, needs {need})")
            for e in sorted(entries, key=lambda e: starts[e]):
                count = ends[e] - starts[e]
                if not count:
                    continue
                gap = start + starts[e] - f.tell()
                if 0 < gap <= GAP:
                    f.read(gap)  # alignment padding: read through it rather than start a new request
                elif gap:
                    f.seek(start + starts[e])
                view = memoryview((ctypes.c_char * count).from_address(job.out[e].data_ptr())).cast("B")
                if cast(Any, f).readinto(view) != count:  # RangedFile: from the socket into the tensor
                    raise CorruptCheckpointError(f"{where}: truncated (entry {e} incomplete); the checkpoint is damaged")
                if job.algo is not None and job.algo.of(view) != sums[e]:
                    raise CorruptCheckpointError(f"{where}: checksum mismatch in entry {e}; the data is damaged")
    except StorageError as exc:
        raise CorruptCheckpointError(f"{where}: cannot be read ({exc}); the checkpoint is incomplete") from exc


class _DataSection:
    """The data section of one tensor file, memory-mapped (or read, where mapping is impossible)."""

    def __init__(self, storage: Storage, path: str, where: str, expected: checksum.Value | None,
                 algo: checksum.Algorithm, lazy: bool) -> None:
        self.where, self.lazy = where, lazy
        try:
            size = storage.size(path)
            with storage.open_read(path) as f:
                self.start, _ = read_header(f, size, where, expected, algo=algo, parse=False)
                self.length = size - self.start
                self._map(f, size)
        except StorageError as exc:
            raise CorruptCheckpointError(f"{where}: cannot be read ({exc}); the checkpoint is incomplete") from exc

    def _map(self, f: Any, size: int) -> None:
        self._mm: _mmap.mmap | None = None
        if self.length:
            try:
                self._mm = _mmap.mmap(f.fileno(), 0, access=_mmap.ACCESS_COPY if self.lazy else _mmap.ACCESS_READ)
            except (OSError, ValueError, AttributeError):  # no file descriptor behind this storage
                self._mm = None
        if self._mm is not None:
            self._array = np.frombuffer(self._mm, dtype=np.uint8, offset=self.start, count=self.length)
            return
        f.seek(self.start)
        self._array = np.empty(self.length, dtype=np.uint8)
        if self.length and f.readinto(self._array.data) != self.length:
            raise CorruptCheckpointError(f"{self.where}: truncated; the checkpoint is damaged")

    def __enter__(self) -> _DataSection:
        self.view = self._array.data
        self.address = self._array.ctypes.data
        return self

    def lazy_tensor(self, start: int, size: int) -> torch.Tensor:
        """A uint8 tensor viewing the mapping (stays valid after close, keeping the mapping alive)."""
        if self._mm is None or not size:
            return torch.from_numpy(self._array[start:start + size].copy())
        return torch.frombuffer(self._mm, dtype=torch.uint8, offset=self.start + start, count=size)

    def __exit__(self, *exc: object) -> None:
        self.view.release()
        del self._array
        if self._mm is not None and not self.lazy:
            self._mm.close()


class _Job:
    """Checks and copies the entries of a checkpoint into their tensors (``out``, per entry).

    The manifest was validated (:func:`savegame.format.manifest.loads`): every entry's byte range
    matches its dtype and shape.
    """

    def __init__(self, entries: Mapping[str, Any], dtypes: list[torch.dtype], algo: checksum.Algorithm | None,
                 into: list[torch.Tensor] | None, spans: set[int], on_device: set[int]) -> None:
        self.entries, self.dtypes, self.algo, self.spans = entries, dtypes, algo, spans
        self.out: list[torch.Tensor] = into if into is not None else [torch.empty(0)] * len(dtypes)
        self.on_device = on_device  # entries whose tensor is on a GPU: streamed there by savegame.engine.todevice

    def run(self, entries: list[int], data: _DataSection, where: str) -> None:
        starts, ends, shapes, sums = (self.entries[c] for c in (n.E_START, n.E_END, n.E_SHAPE, n.E_SUM))
        check = self.algo.function if self.algo is not None else None
        dtypes, out, view, address = self.dtypes, self.out, data.view, data.address
        memmove, big, device, on_device = ctypes.memmove, [], [], self.on_device
        for e in entries:
            start, size = starts[e], ends[e] - starts[e]
            if data.lazy:
                if e not in self.spans:  # storage spans are copied: their views need their own storage
                    self._map_lazy(e, data, where)
                    continue
                out[e] = torch.empty(shapes[e], dtype=dtypes[e])
            elif on_device and e in on_device:
                device.append(e)
                continue
            if size > SMALL:
                big.append(e)
                continue
            if check is not None and check(view[start:start + size]) != sums[e]:
                raise CorruptCheckpointError(f"{where}: checksum mismatch in entry {e}; the data is damaged")
            if size:
                memmove(out[e].data_ptr(), address + start, size)
        if device:
            todevice.fill(device, out, self.entries, self.algo, data.address, where)
        if big:
            with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1, len(big))) as pool:
                for e, ok in zip(big, pool.map(lambda e: self._copy_big(e, data), big), strict=True):
                    if not ok:
                        raise CorruptCheckpointError(f"{where}: checksum mismatch in entry {e}; the data is damaged")

    def _map_lazy(self, e: int, data: _DataSection, where: str) -> None:
        """With mmap=True: the entry's tensor is a view of the mapping (checked first if verifying)."""
        start, end = self.entries[n.E_START][e], self.entries[n.E_END][e]
        if self.algo is not None and self.algo.of(data.view[start:end]) != self.entries[n.E_SUM][e]:
            raise CorruptCheckpointError(f"{where}: checksum mismatch in entry {e}; the data is damaged")
        dtype, shape = self.dtypes[e], self.entries[n.E_SHAPE][e]
        self.out[e] = data.lazy_tensor(start, end - start).view(dtype).view(shape) if end > start \
            else torch.empty(shape, dtype=dtype)

    def _copy_big(self, e: int, data: _DataSection) -> bool:
        start, end = self.entries[n.E_START][e], self.entries[n.E_END][e]
        running = self.algo.running() if self.algo is not None else None
        address = self.out[e].data_ptr() - start
        for lo in range(start, end, PIECE):
            hi = min(lo + PIECE, end)
            if running is not None:
                running.update(data.view[lo:hi])
            ctypes.memmove(address + lo, data.address + lo, hi - lo)
        return running is None or running.value() == self.entries[n.E_SUM][e]
