"""Snapshots: the bytes of every entry, captured so the caller may mutate its tensors at once.

With a :class:`Staging`, every entry is copied into host buffers that are
allocated once and reused by every later save. Each tensor file's data section
is one buffer, laid out exactly as it will be on disk, so the writer issues a
few large writes. Small contiguous CPU tensors are copied with one ``memmove``
each (a torch op costs microseconds of dispatch; a state of 50,000 tiny
tensors must not); everything else with a typed, strided ``copy_`` straight
into the buffer, so a non-contiguous CPU tensor needs no temporary contiguous
copy and peak extra memory stays at the state's size.

CUDA sources (see :mod:`savegame.engine.pinned` for the page-locked buffers they are
copied into) are grouped by device. Each device gets a side stream that first
waits for that device's current stream, so the copy sees every write the
caller queued there; every stream used is synchronised before ``copy_out``
returns, also when a copy raises. Small tensors of one device (under ``SMALL``
bytes, wherever they lie in the files) are gathered into one device buffer by
one kernel and copied out with one transfer into a page-locked scratch area of
``SCRATCH`` bytes per GPU, then moved to their places on the host; a
non-contiguous device tensor is made contiguous a slice of at most ``CHUNK``
bytes at a time (torch's device-to-host copy of a strided tensor makes a
contiguous device temporary of the size it is given).

Without a staging area the snapshot is the live tensors: the caller must then
write before it returns (``async_save=False``).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch

from savegame.engine.pinned import HostBuffer, Pinner, cuda_pinner
from savegame.format.layout import TensorPlan

SMALL = 1 << 20  # below this, a memmove beats a (multi-threaded) torch copy
SCRATCH = 16 << 20  # page-locked bytes per GPU into which gathered small tensors are copied out at once
CHUNK = 16 << 20  # the largest device temporary a non-contiguous device tensor's copy may make


class Staging:
    """Host buffers reused across saves, one per tensor file; page-locked when sources live on CUDA.

    A page-locked buffer is exactly its file's data section rounded up to a page
    (the largest one saved so far), never taken from torch's caching host
    allocator (which rounds to powers of two and keeps freed blocks pinned); a
    grown buffer releases the old one at once, and :meth:`release` all of them.
    ``pinner`` is a seam for tests; by default ``cudaHostRegister``.
    """

    def __init__(self, pinner: Pinner | None = None) -> None:
        self._buffers: dict[int, torch.Tensor] = {}
        self._host: dict[int, HostBuffer] = {}  # the page-locked ones, by file index
        self._scratch: dict[torch.device, HostBuffer] = {}  # per GPU holding small tensors (see _copy_device)
        self._pinner = pinner

    def buffer(self, index: int, nbytes: int, pinned: bool) -> torch.Tensor:
        buf = self._buffers.get(index)
        if buf is None or buf.numel() < nbytes or (index in self._host) != pinned:
            self._drop(index)
            if pinned:
                host = HostBuffer(max(nbytes, 1), self._pinner or cuda_pinner())
                self._host[index], buf = host, host.tensor
            else:
                buf = torch.empty(max(nbytes, 1), dtype=torch.uint8)
            self._buffers[index] = buf
        return buf

    def trim(self, count: int) -> None:
        """Release the buffers of tensor files beyond the first ``count`` (the state now has fewer)."""
        for index in [i for i in self._buffers if i >= count]:
            self._drop(index)

    def scratch(self, device: torch.device) -> torch.Tensor:
        host = self._scratch.get(device)
        if host is None:
            host = self._scratch[device] = HostBuffer(SCRATCH, self._pinner or cuda_pinner())
        return host.tensor

    def _drop(self, index: int) -> None:
        self._buffers.pop(index, None)
        host = self._host.pop(index, None)
        if host is not None:
            host.release()

    def release(self) -> None:
        """Hand every buffer back (page-locked memory is unregistered now); later saves allocate anew."""
        for index in list(self._buffers):
            self._drop(index)
        for host in self._scratch.values():
            host.release()
        self._scratch.clear()

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self._buffers.values())

    @property
    def pinned_bytes(self) -> int:
        """Bytes of page-locked host memory the buffers hold now."""
        return sum(h.pinned_bytes for h in (*self._host.values(), *self._scratch.values()))


Snapshot = list[torch.Tensor] | None
"""Per tensor file, a uint8 host buffer holding its data section; None: write from the live tensors."""


def copy_out(plan: TensorPlan, staging: Staging | None) -> Snapshot:
    """Capture every entry's bytes; after this returns the caller may mutate its tensors."""
    if staging is None:
        return None
    on_cuda = any(s.is_cuda for s in plan.sources)
    pinned = on_cuda and torch.cuda.is_available()
    buffers = [staging.buffer(k, size, pinned) for k, size in enumerate(plan.file_sizes())]
    staging.trim(len(buffers))
    addresses = [b.data_ptr() for b in buffers]
    sources, sizes, starts, memmove = plan.sources, plan.sizes, plan.start, ctypes.memmove
    on_device: dict[torch.device, list[tuple[int, int]]] = {}  # device -> (file, entry) in file order
    for k, entries in enumerate(plan.files):
        buf, address = buffers[k], addresses[k]
        for e in entries:
            src, size = sources[e], sizes[e]
            if size <= SMALL and src.is_cpu and src.is_contiguous():
                if size:
                    memmove(address + starts[e], src.data_ptr(), size)
            elif src.is_cuda:
                on_device.setdefault(src.device, []).append((k, e))
            else:
                _copy(plan, e, buf)
    if on_device:
        _copy_from_devices(plan, buffers, on_device, staging)
    return buffers


def _copy_from_devices(plan: TensorPlan, buffers: list[torch.Tensor],
                       on_device: dict[torch.device, list[tuple[int, int]]], staging: Staging) -> None:
    """Per device, a side stream ordered after that device's current stream; all synchronised at the end."""
    streams: list[torch.cuda.Stream] = []
    moves: list[list[tuple[int, int, int]]] = []
    try:
        for device, items in on_device.items():
            with torch.cuda.device(device):
                stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
                stream.wait_stream(torch.cuda.current_stream(device))
                streams.append(stream)
                with torch.cuda.stream(stream):
                    moves.append(_copy_device(plan, buffers, items, staging, stream))
    finally:  # never return (or retry into these buffers) while a copy may still be writing them
        for stream in streams:
            stream.synchronize()
    for pending in moves:
        place(pending)


def _copy_device(plan: TensorPlan, buffers: list[torch.Tensor], items: list[tuple[int, int]], staging: Staging,
                 stream: torch.cuda.Stream) -> list[tuple[int, int, int]]:
    """Queue one device's copies on ``stream``; return the host moves due once it is synchronised.

    Large and strided tensors are copied one by one, straight into the buffers.
    Small ones are gathered (one kernel) into a device buffer, copied out with one
    transfer into a page-locked scratch area, and moved to their places after the
    stream is synchronised: one transfer, not one per tensor. Should the scratch
    fill up, the stream is synchronised and the scratch reused.
    """
    src, sizes = plan.sources, plan.sizes
    small = []
    for k, e in items:
        t = src[e]
        if not sizes[e]:
            continue
        if sizes[e] <= SMALL and t.is_contiguous() and not (t.is_conj() or t.is_neg()):
            small.append((k, e))
        else:
            _copy(plan, e, buffers[k])
    moves: list[tuple[int, int, int]] = []
    if not small:
        return moves
    scratch, used = staging.scratch(stream.device), 0
    for batch in batches(small, sizes, SCRATCH):
        total = sum(sizes[e] for _, e in batch)
        if used + total > SCRATCH:
            stream.synchronize()
            place(moves)
            moves, used = [], 0
        gather(plan, batch, buffers, scratch, used, moves)
        used += total
    return moves


def batches(items: Sequence[tuple[int, int]], sizes: Sequence[int], limit: int) -> list[list[tuple[int, int]]]:
    """(file, entry) pairs in order, cut into batches of at most ``limit`` bytes (each entry is at most that)."""
    out: list[list[tuple[int, int]]] = []
    filled = limit + 1
    for item in items:
        size = sizes[item[1]]
        if filled + size > limit:
            out.append([])
            filled = 0
        out[-1].append(item)
        filled += size
    return out


def gather(plan: TensorPlan, batch: list[tuple[int, int]], buffers: list[torch.Tensor], scratch: torch.Tensor,
           at: int, moves: list[tuple[int, int, int]]) -> None:
    """One kernel gathers the batch's tensors into a device buffer, one transfer copies it to ``scratch[at:]``.

    Appends (to, from, nbytes) for each entry: where its bytes go in the buffers, once the copy has landed.
    """
    flat = [plan.sources[e].reshape(-1).view(torch.uint8) for _, e in batch]
    total = sum(f.numel() for f in flat)
    gathered = torch.empty(total, dtype=torch.uint8, device=flat[0].device)
    torch.cat(flat, out=gathered)
    scratch[at:at + total].copy_(gathered, non_blocking=gathered.is_cuda)
    base = scratch.data_ptr() + at
    for (k, e), f in zip(batch, flat, strict=True):
        moves.append((buffers[k].data_ptr() + plan.start[e], base, f.numel()))
        base += f.numel()


def place(moves: list[tuple[int, int, int]]) -> None:
    memmove = ctypes.memmove
    for to, frm, nbytes in moves:
        memmove(to, frm, nbytes)


def _copy(plan: TensorPlan, e: int, buf: torch.Tensor) -> None:
    """A large, strided or device tensor: a typed copy straight into the buffer, no full-size temporary."""
    src, size, start = plan.sources[e], plan.sizes[e], plan.start[e]
    dst = buf[start:start + size]
    try:
        typed = dst.view(plan.dtypes[e]).view(plan.shapes[e])
        if src.is_cuda:
            copy_in_slices(typed, src, CHUNK)
        else:
            typed.copy_(src)
    except (RuntimeError, NotImplementedError):
        # dtypes without copy kernels (bits*, some float8 and unsigned ones): copy raw bytes
        if not (src.is_cpu and src.is_contiguous()):
            src = src.contiguous()
        dst.copy_(src.reshape(-1).view(torch.uint8), non_blocking=src.is_cuda)


def copy_in_slices(dst: torch.Tensor, src: torch.Tensor, limit: int) -> None:
    """``dst.copy_(src)``; a non-contiguous device ``src`` a slice of at most ``limit`` bytes at a time.

    ``dst`` is contiguous, so each of its slices along the first dimension is
    too; torch's device-to-host copy then makes a contiguous device temporary of
    one slice, not of the whole tensor. A slice along the first dimension that
    is itself too big is copied one index at a time, one dimension down.
    """
    if src.is_contiguous() or src.nbytes <= limit or src.dim() == 0:
        dst.copy_(src, non_blocking=src.is_cuda)
        return
    row = src.nbytes // src.shape[0]
    if row > limit:
        for i in range(src.shape[0]):
            copy_in_slices(dst[i], src[i], limit)
        return
    step = limit // row
    for i in range(0, src.shape[0], step):
        dst[i:i + step].copy_(src[i:i + step], non_blocking=src.is_cuda)
