"""Snapshots: the bytes of every entry, captured so the caller may mutate its tensors at once.

With a :class:`Staging`, every entry is copied into host buffers that are
allocated once and reused by every later save (pinned when tensors live on
CUDA; the device-to-host copies then run on a side stream). Each tensor file's
data section is one buffer, laid out exactly as it will be on disk, so the
writer issues a few large writes. Small contiguous CPU tensors are copied with
one ``memmove`` each (a torch op costs microseconds of dispatch; a state of
50,000 tiny tensors must not); everything else with a typed, strided
``copy_`` straight into the buffer, so a non-contiguous tensor needs no
temporary contiguous copy and peak extra memory stays at the state's size.

Without a staging area the snapshot is the live tensors: the caller must then
write before it returns (``async_save=False``).
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator

import torch

from savegame.format.layout import TensorPlan

SMALL = 1 << 20  # below this, a memmove beats a (multi-threaded) torch copy


class Staging:
    """Host buffers reused across saves, one per tensor file; pinned when sources live on CUDA."""

    def __init__(self) -> None:
        self._buffers: dict[int, torch.Tensor] = {}

    def buffer(self, index: int, nbytes: int, pinned: bool) -> torch.Tensor:
        buf = self._buffers.get(index)
        if buf is None or buf.numel() < nbytes or buf.is_pinned() != pinned:
            self._buffers.pop(index, None)
            buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pinned)
            self._buffers[index] = buf
        return buf

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self._buffers.values())


Snapshot = list[torch.Tensor] | None
"""Per tensor file, a uint8 host buffer holding its data section; None: write from the live tensors."""


def copy_out(plan: TensorPlan, staging: Staging | None) -> Snapshot:
    """Capture every entry's bytes; after this returns the caller may mutate its tensors."""
    if staging is None:
        return None
    on_cuda = any(s.is_cuda for s in plan.sources)
    pinned = on_cuda and torch.cuda.is_available()
    buffers = [staging.buffer(k, size, pinned) for k, size in enumerate(plan.file_sizes())]
    addresses = [b.data_ptr() for b in buffers]
    sources, sizes, starts, memmove = plan.sources, plan.sizes, plan.start, ctypes.memmove
    with _side_stream(on_cuda):
        for k, entries in enumerate(plan.files):
            buf, address = buffers[k], addresses[k]
            for e in entries:
                src, size = sources[e], sizes[e]
                if size <= SMALL and src.is_cpu and src.is_contiguous():
                    if size:
                        memmove(address + starts[e], src.data_ptr(), size)
                else:
                    _copy(plan, e, buf)
    return buffers


def _copy(plan: TensorPlan, e: int, buf: torch.Tensor) -> None:
    """A large, strided or device tensor: a typed copy straight into the buffer, no temporary."""
    src, size, start = plan.sources[e], plan.sizes[e], plan.start[e]
    dst = buf[start:start + size]
    try:
        dst.view(plan.dtypes[e]).view(plan.shapes[e]).copy_(src, non_blocking=src.is_cuda)
    except (RuntimeError, NotImplementedError):
        # dtypes without copy kernels (bits*, some float8 and unsigned ones): copy raw bytes
        if not (src.is_cpu and src.is_contiguous()):
            src = src.contiguous()
        dst.copy_(src.reshape(-1).view(torch.uint8), non_blocking=src.is_cuda)


@contextlib.contextmanager
def _side_stream(on_cuda: bool) -> Iterator[None]:
    """Run device-to-host copies on a side stream that first waits for the current one, then sync."""
    if not on_cuda:
        yield
        return
    stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        yield
    stream.synchronize()
