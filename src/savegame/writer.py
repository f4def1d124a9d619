"""From a state tree to a committed checkpoint: prepare, snapshot, write, commit.

``prepare`` encodes the tree (values to JSON, tensors to a layout plan) in the
caller's thread. ``snapshot`` makes the bytes immune to later mutation: with a
:class:`Staging` it copies every tensor into reusable host buffers (pinned for
CUDA tensors, copied on a side stream); without one it uses the live tensors
(the caller then writes before returning). ``write_checkpoint`` streams the
bytes into safetensors-compatible files, computing checksums as it writes,
writes the manifest last and commits atomically. :class:`BackgroundWriter`
runs that last step off the training thread, one save at a time.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
import atexit
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from savegame._version import __version__
from savegame.commit import RenameCommit
from savegame.format import codec, layout, manifest
from savegame.format import names as n
from savegame.format.tensorfile import Entry, write_entries
from savegame.storage.base import Storage

log = logging.getLogger("savegame.writer")

DEFAULT_SHARD_BYTES = 1 << 30


@dataclass
class Prepared:
    """An encoded checkpoint whose tensor bytes are not yet captured."""

    body: dict[str, Any]
    plan: layout.TensorPlan

    @property
    def nbytes(self) -> int:
        return sum(spec.nbytes for spec in self.plan.specs)


def prepare(tree: Any, meta: Mapping[str, Any], shard_bytes: int = DEFAULT_SHARD_BYTES) -> Prepared:
    """Encode ``tree``; raises UnsupportedValueError naming the key path of a bad value."""
    tensors: list[torch.Tensor] = []

    def sink(tensor: torch.Tensor, path: str) -> int:
        layout.check_supported(tensor, path)
        tensors.append(tensor)
        return len(tensors) - 1

    encoded = codec.encode(tree, sink)
    plan = layout.plan(tensors, shard_bytes)
    body = {
        n.M_FORMAT: n.FORMAT_NAME, n.M_VERSION: n.FORMAT_VERSION,
        n.M_SAVEGAME_VERSION: __version__, n.M_TORCH_VERSION: torch.__version__,
        **meta, n.M_TREE: encoded, n.M_TENSORS: plan.records,
    }
    return Prepared(body, plan)


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous 1-D uint8 view of a tensor's data (copies only if not contiguous)."""
    if tensor.requires_grad:
        tensor = tensor.detach()
    return tensor.contiguous().reshape(-1).view(torch.uint8)


class Staging:
    """Host buffers reused across saves, one per shard; pinned when sources live on CUDA."""

    def __init__(self) -> None:
        self._buffers: dict[int, torch.Tensor] = {}

    def buffer(self, shard: int, nbytes: int, pinned: bool) -> torch.Tensor:
        buf = self._buffers.get(shard)
        if buf is None or buf.numel() < nbytes or buf.is_pinned() != pinned:
            self._buffers.pop(shard, None)
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
            self._buffers[shard] = buf
        return buf


def snapshot(prepared: Prepared, staging: Staging | None) -> list[list[Entry]]:
    """Capture every entry's bytes; after this returns the caller may mutate its tensors."""
    specs = prepared.plan.specs
    shards: list[list[Entry]] = [[] for _ in range(max((s.shard for s in specs), default=-1) + 1)]
    if staging is None:
        for spec in specs:
            shards[spec.shard].append(Entry(spec.key, spec.dtype, spec.shape, as_bytes(spec.source.cpu()), spec.nbytes))
        return shards
    on_cuda = any(spec.source.is_cuda for spec in specs)
    totals = [0] * len(shards)
    for spec in specs:
        totals[spec.shard] += spec.nbytes
    buffers = [staging.buffer(i, total, on_cuda and torch.cuda.is_available()) for i, total in enumerate(totals)]
    offsets = [0] * len(shards)
    stream = torch.cuda.Stream() if on_cuda else None  # type: ignore[no-untyped-call]
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream) if stream is not None else _null():
        for spec in specs:
            start = offsets[spec.shard]
            dst = buffers[spec.shard][start:start + spec.nbytes]
            dst.copy_(as_bytes(spec.source), non_blocking=spec.source.is_cuda)
            offsets[spec.shard] += spec.nbytes
            shards[spec.shard].append(Entry(spec.key, spec.dtype, spec.shape, dst, spec.nbytes))
    if stream is not None:
        stream.synchronize()
    return shards


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def write_checkpoint(storage: Storage, final: str, prepared: Prepared, shards: list[list[Entry]],
                     commit: RenameCommit | None = None) -> None:
    """Write files and manifest under a temporary name, then commit atomically as ``final``."""
    commit = commit or RenameCommit()
    tmp = commit.begin(storage, final)
    try:
        files = [n.TENSOR_FILE.format(index=i) for i in range(len(shards))]
        jobs = [(f"{tmp}/{name}", entries) for name, entries in zip(files, shards)]
        if len(jobs) > 1:
            with ThreadPoolExecutor(max_workers=min(4, len(jobs))) as pool:
                results = list(pool.map(lambda job: _write_file(storage, *job), jobs))
        else:
            results = [_write_file(storage, *job) for job in jobs]
        body = {**prepared.body, n.M_ENTRIES: _entries_meta(files, shards, [crcs for _, crcs in results]),
                n.M_FILES: files, n.M_HEADER_CRCS: [header_crc for header_crc, _ in results]}
        _write_small(storage, f"{tmp}/{n.MANIFEST}", manifest.dumps(body))
        commit.commit(storage, tmp, final)
    except Exception:
        commit.abort(storage, tmp)
        raise


def _entries_meta(files: list[str], shards: list[list[Entry]], crcs: list[list[int]]) -> list[dict[str, Any]]:
    """The manifest's entry list, in entry-number order, with each entry's place and checksum."""
    out: list[dict[str, Any]] = []
    for name, entries, file_crcs in zip(files, shards, crcs):
        offset = 0
        for entry, crc in zip(entries, file_crcs):
            out.append({"key": entry.key, "file": name, "dtype": codec.dtype_name(entry.dtype),
                        "shape": list(entry.shape), "start": offset, "end": offset + entry.nbytes, "crc32": crc})
            offset += entry.nbytes
    out.sort(key=lambda e: int(e["key"][1:]))
    return out


def _write_file(storage: Storage, path: str, entries: list[Entry]) -> tuple[int, list[int]]:
    handle = storage.create(path)
    try:
        crcs = write_entries(handle, entries, {"format": n.FORMAT_NAME})
    except Exception:
        handle.abort()
        raise
    handle.close()
    return crcs


def _write_small(storage: Storage, path: str, data: bytes) -> None:
    handle = storage.create(path)
    try:
        handle.write(memoryview(data))
    except Exception:
        handle.abort()
        raise
    handle.close()


_LIVE: weakref.WeakSet[BackgroundWriter] = weakref.WeakSet()


class BackgroundWriter:
    """Runs one job at a time off the caller's thread and keeps its error for the next caller.

    ``submit`` first waits for the previous job (back-pressure). A job's
    exception is re-raised by the next ``submit``/``wait``; nothing fails
    silently. Threads are non-daemon and an atexit hook waits for them, so a
    process that saves and exits still leaves a complete checkpoint.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        _LIVE.add(self)

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Callable[[], None]) -> float:
        """Wait for the previous job, surface its error, start ``job``; return seconds waited."""
        waited = self.wait()
        self._thread = threading.Thread(target=self._run, args=(job,), name="savegame-writer")
        self._thread.start()
        return waited

    def _run(self, job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as exc:  # kept and re-raised in the training thread
            self._error = exc
            log.error("background save failed: %s", exc)

    def wait(self) -> float:
        start = time.perf_counter()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        waited = time.perf_counter() - start
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return waited


@atexit.register
def _drain_at_exit() -> None:
    for writer in list(_LIVE):
        try:
            writer.wait()
        except BaseException as exc:
            log.error("a checkpoint save failed at interpreter exit: %s", exc)
