"""Restoring onto a GPU: which device each tensor goes to, and its bytes streamed there once.

Where (:func:`entry_places`): an entry whose tensor the caller already owns (a
model's parameter or buffer, on any device) is read straight into it. With
``map_location``, every other tensor of a model, and every tensor saved on a
GPU, goes to that device; a tensor saved on the CPU outside a model stays on
the CPU (``restore``), so a non-capturable Adam's ``step`` counters are not
moved to the GPU, where the optimizer would call ``.item()`` on each of them
every step. ``load()`` passes no models: everything follows ``map_location``.

How (:func:`fill`): entries bound for a GPU are copied from the mapped file
into a few small page-locked slots, each sent on with a non-blocking copy into
the destination tensor on its device's current stream; a slot is refilled once
the event recorded after its copies has completed, so reading the next slot
overlaps the transfer of the previous one; a large piece is read into its slot
by a few threads. No pageable CPU copy of the state and no second copy on the
GPU is made.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from savegame.engine.pinned import HostBuffer, Pinner, cuda_pinner
from savegame.errors import CorruptCheckpointError
from savegame.format import checksum, codec
from savegame.format import names as n

SLOT = 8 << 20  # bytes per page-locked slot
SLOTS = 4  # slots used in turn: 32 MiB of page-locked memory during a GPU restore, released after it
SPLIT = 1 << 20  # a piece at least this big is copied into its slot by several threads (memmove releases the GIL)
THREADS = min(4, os.cpu_count() or 1)


def resolve(device: torch.device | None) -> torch.device | None:
    """``cuda`` without an index means the current device; name it, so devices compare equal."""
    if device is not None and device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def module_tensors(objects: Mapping[str, Any], doc: Mapping[str, Any]) -> set[int]:
    """The tensor numbers of the checkpoint's model states (objects that are ``nn.Module``)."""
    tree = doc.get(n.M_TREE)
    saved = tree.get(n.TREE_STATE) if isinstance(tree, Mapping) else None
    if not isinstance(saved, Mapping):
        return set()
    count, out = len(doc[n.M_TENSORS][n.T_ENTRY]), set[int]()
    for name, obj in objects.items():
        encoded = saved.get(name)
        if isinstance(obj, torch.nn.Module) and isinstance(encoded, Mapping):
            out.update(codec.tensor_refs(encoded, count).values())
    return out


def entry_places(table: Mapping[str, Any], count: int, device: torch.device | None,
                 follow: set[int] | None, chosen: Mapping[int, torch.Tensor]) -> list[torch.device | None] | None:
    """Per entry, the device its tensor is read to (None: the CPU); None when everything stays on the CPU.

    ``table`` is the manifest's tensors table (each tensor's entry and saved
    device), ``device`` the restore's ``map_location``, ``follow`` the tensors
    that go to ``device`` wherever they were saved (None: all of them), and
    ``chosen`` the entries read straight into a tensor the caller owns: that
    tensor's device wins.
    """
    moves = device is not None and device.type != "cpu"
    if not moves and all(t.is_cpu for t in chosen.values()):
        return None
    out: list[torch.device | None] = [None] * count
    if moves:
        for j, (e, saved) in enumerate(zip(table[n.T_ENTRY], table[n.T_DEVICE], strict=True)):
            if follow is None or j in follow or saved != "cpu":
                out[e] = device
    for e, target in chosen.items():
        out[e] = None if target.is_cpu else target.device
    return out


def allocate(entries: Mapping[str, Any], dtypes: Sequence[torch.dtype], places: Sequence[torch.device | None],
             chosen: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """An empty tensor on its GPU for every entry bound there with no target of its own."""
    shapes = entries[n.E_SHAPE]
    return {e: torch.empty(shapes[e], dtype=dtypes[e], device=place) for e, place in enumerate(places)
            if place is not None and place.type == "cuda" and e not in chosen}


class _Slots:
    """A few page-locked buffers used in turn; one is refilled only after its copies have completed."""

    def __init__(self, count: int, size: int, pinner: Pinner, pool: ThreadPoolExecutor | None) -> None:
        self.size, self.index, self.used, self.pool = size, count - 1, size, pool  # the first put moves to slot 0
        self.hosts: list[HostBuffer] = []
        self.done: list[list[torch.cuda.Event]] = [[] for _ in range(count)]
        self.streams: dict[torch.device, torch.cuda.Stream] = {}  # streams reading the current slot
        for _ in range(count):
            self.hosts.append(HostBuffer(size, pinner))
        self.views = [h.tensor.numpy().data for h in self.hosts]

    def put(self, address: int, nbytes: int) -> tuple[torch.Tensor, memoryview]:
        """Copy ``nbytes`` from ``address`` into a slot; the slot's bytes as a tensor and a view."""
        if self.used + nbytes > self.size:
            self._advance()
        host, lo = self.hosts[self.index], self.used
        to = host.tensor.data_ptr() + lo
        if self.pool is None or nbytes < SPLIT:
            ctypes.memmove(to, address, nbytes)
        else:  # reading from the page cache (or faulting pages in) is the slow side: use a few cores
            part = -(-nbytes // THREADS)
            parts = [(to + i, address + i, min(part, nbytes - i)) for i in range(0, nbytes, part)]
            for _ in self.pool.map(lambda p: ctypes.memmove(*p), parts):
                pass
        self.used += nbytes
        return host.tensor[lo:lo + nbytes], self.views[self.index][lo:lo + nbytes]

    def sent(self, device: torch.device, stream: torch.cuda.Stream) -> None:
        self.streams[device] = stream

    def _record(self) -> None:
        for stream in self.streams.values():
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(stream)
            self.done[self.index].append(event)
        self.streams = {}

    def _advance(self) -> None:
        self._record()
        self.index = (self.index + 1) % len(self.hosts)
        for event in self.done[self.index]:
            event.synchronize()
        self.done[self.index], self.used = [], 0

    def close(self) -> None:
        """Wait for every copy still reading a slot, then unlock the slots."""
        try:
            self._record()
            for events in self.done:
                for event in events:
                    event.synchronize()
        finally:
            for host in self.hosts:
                host.release()


def fill(entries: Sequence[int], targets: Mapping[int, torch.Tensor] | Sequence[torch.Tensor], columns: Mapping[str, Any],
         algo: checksum.Algorithm | None, address: int, where: str, slot: int = SLOT,
         pinner: Pinner | None = None) -> None:
    """Copy each entry's bytes (at ``address`` + its start) into its GPU tensor, checking them on the way.

    Returns when every copy has completed. Raises CorruptCheckpointError on a
    checksum mismatch; the entries before it (and part of that one) are then
    already in their tensors. (A CPU tensor is filled the same way, synchronously:
    tests use that, with ``pinner`` faked, to check the slot logic without a GPU.)
    """
    starts, ends, sums = columns[n.E_START], columns[n.E_END], columns[n.E_SUM]
    big = THREADS > 1 and any(ends[e] - starts[e] >= SPLIT for e in entries)
    with ThreadPoolExecutor(max_workers=THREADS) if big else _nothing() as pool:
        slots = _Slots(SLOTS, slot, pinner or cuda_pinner(), pool)
        try:
            with torch.no_grad():
                for e in entries:
                    value = _send(slots, targets[e], address, starts[e], ends[e], algo, slot)
                    if value is not None and value != sums[e]:
                        raise CorruptCheckpointError(f"{where}: checksum mismatch in entry {e}; the data is damaged")
        finally:
            slots.close()


@contextlib.contextmanager
def _nothing() -> Iterator[None]:
    yield None


def _send(slots: _Slots, dst: torch.Tensor, address: int, start: int, end: int, algo: checksum.Algorithm | None,
          slot: int) -> checksum.Value | None:
    """One entry, a slot-sized piece at a time; its checksum (None when not verifying)."""
    if end == start:
        return algo.of(b"") if algo is not None else None
    flat = dst.reshape(-1).view(torch.uint8)  # contiguous: a view, not a copy
    # torch runs a host-to-device copy on the destination device's current stream
    stream = torch.cuda.current_stream(dst.device) if dst.is_cuda else None
    running = algo.running() if algo is not None else None
    for lo in range(start, end, slot):
        hi = min(lo + slot, end)
        piece, view = slots.put(address + lo, hi - lo)
        if running is not None:
            running.update(view)
        flat[lo - start:hi - start].copy_(piece, non_blocking=stream is not None)
        if stream is not None:
            slots.sent(dst.device, stream)
    return running.value() if running is not None else None
