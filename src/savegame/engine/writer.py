"""From a state tree to a committed checkpoint: prepare, snapshot, write, commit.

``prepare`` encodes the tree (values to JSON, tensors to a layout plan) in the
caller's thread. ``snapshot`` (see :mod:`savegame.engine.staging`) makes the bytes
immune to later mutation. ``write_checkpoint`` streams the bytes into
safetensors-compatible files, computing checksums as it writes, writes the
manifest last and commits atomically. :class:`BackgroundWriter` runs that last
step off the training thread, one save at a time.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from savegame._version import __version__
from savegame.engine import packs
from savegame.engine.dedup import Location
from savegame.engine.gcpause import never_in_this_thread, pausing
from savegame.engine.staging import SMALL, Snapshot, Staging, copy_out
from savegame.format import checksum, codec, compression, layout, manifest
from savegame.format import names as n
from savegame.format.tensorfile import build_header
from savegame.storage.base import Storage, WriteHandle, lend
from savegame.storage.commit import CommitStrategy, RenameCommit

log = logging.getLogger("savegame.engine.writer")

T = TypeVar("T")
DEFAULT_SHARD_BYTES = 1 << 30
BOUNCE = 4 << 20  # small entries written without staging are gathered into writes of this size
# Writes of 4-16 MB went into the page cache at a steady ~5 GB/s on the development VM; 64 MB and
# larger ones sometimes stalled for seconds, and 1 MB ones were 10x slower (benchmarks/, BENCHMARKS.md).
WRITE = 8 << 20
PACKERS = min(4, os.cpu_count() or 1)  # threads compressing the entries of one file (compression="zstd")
WRITER_NICE = 19  # the background writer's nice value on Linux: the lowest priority (see _yield_to_training)

__all__ = ["BackgroundWriter", "Prepared", "Staging", "prepare", "snapshot", "write_checkpoint"]


@dataclass
class Prepared:
    """An encoded checkpoint whose tensor bytes are not yet captured."""

    body: dict[str, Any]
    plan: layout.TensorPlan
    reuse: dict[int, Location] | None = None  # incremental (v4): entries the content store holds already
    compression: str | None = None  # "zstd": entries stored compressed where it pays (v5)

    @property
    def nbytes(self) -> int:
        return self.plan.nbytes


_RNG_PATH = n.TREE_RNG + "."


@pausing
def prepare(tree: Any, meta: Mapping[str, Any], shard_bytes: int = DEFAULT_SHARD_BYTES, *,
            rng_apart: bool = True) -> Prepared:
    """Encode ``tree``; raises UnsupportedValueError naming the key path of a bad value.

    ``rng_apart``: the RNG states go into a small tensor file of their own (see :func:`layout.plan`);
    an incremental save (one pack per save) keeps them in its pack.
    """
    tensors: list[torch.Tensor] = []
    rng_tensors: list[int] = []

    def sink(tensor: torch.Tensor, path: str) -> int:
        layout.check_supported(tensor, path)
        if rng_apart and path.startswith(_RNG_PATH):
            rng_tensors.append(len(tensors))
        tensors.append(tensor)
        return len(tensors) - 1

    encoded = codec.encode(tree, sink)
    plan = layout.plan(tensors, shard_bytes, apart=rng_tensors)
    body = {**header_fields(n.FORMAT_VERSION), **meta, n.M_TREE: encoded, n.M_TENSORS: plan.table()}
    return Prepared(body, plan)


def header_fields(version: int) -> dict[str, Any]:
    """The members every manifest starts with: format, version and the writers' versions."""
    return {n.M_FORMAT: n.FORMAT_NAME, n.M_VERSION: version, n.M_SAVEGAME_VERSION: __version__,
            n.M_TORCH_VERSION: torch.__version__}


def snapshot(prepared: Prepared, staging: Staging | None) -> Snapshot:
    """Capture every tensor's bytes (see :mod:`savegame.engine.staging`); then the caller may mutate its state.

    A staged write never reads the live tensors again, so they are dropped here: tensors
    a ``state_dict()`` made fresh (EMA copies, casts) are freed now, not when the write ends.
    """
    snap = copy_out(prepared.plan, staging)
    if snap is not None:
        prepared.plan.sources = []
    return snap


def write_checkpoint(storage: Storage, final: str, prepared: Prepared, snap: Snapshot,
                     commit: CommitStrategy | None = None) -> dict[str, Any]:
    """Write the tensor files, then commit them with their manifest as ``final`` (``commit``'s strategy:
    under a temporary name then renamed on file systems, the manifest last on object stores).

    Not paused for the garbage collector (see :mod:`savegame.engine.gcpause`): a write lasts
    long, and in the background writer a pause would stop collection for every thread.
    """
    commit = commit or RenameCommit()
    plan, packed = prepared.plan, prepared.reuse is not None
    algo = checksum.CONTENT if packed else checksum.CURRENT
    tmp = commit.begin(storage, final)
    try:
        if packed:  # new bytes go into packs of the run's content store, under names never used before
            names = [n.pack_file(uuid.uuid4().hex) for _ in plan.files]
            paths = names
            if names:
                storage.makedirs(n.DATA_DIR)
        else:
            names = [n.TENSOR_FILE.format(index=k) for k in range(len(plan.files))]
            paths = [f"{tmp}/{name}" for name in names]

        coded = _Coded(len(plan.sizes), packed) if prepared.compression else None

        def write(k: int) -> str | int:
            buffer = snap[k] if snap is not None else None
            if coded is not None:
                return write_compressed_file(storage, paths[k], plan, k, buffer, sums, algo, coded)
            return write_tensor_file(storage, paths[k], plan, k, buffer, sums, algo)

        sums: list[checksum.Value] = [0] * len(plan.sizes)  # not sources: dropped once staged
        file_sums = _each(write, len(names))
        body = {**prepared.body, n.M_CHECKSUM_ALGO: algo.name, n.M_FILES: names,
                n.M_FILE_CHECKSUMS: file_sums, n.M_ENTRIES: _entry_table(plan, sums)}
        if coded is not None and coded.any():  # nothing compressed: the plain format, which any reader reads
            body[n.M_VERSION] = n.COMPRESSED_FORMAT_VERSION
            body[n.M_ENTRIES] = coded.table(body[n.M_ENTRIES], plan)
        if prepared.reuse is not None:
            packs.reference(storage, body, prepared.reuse, fresh=bool(names))
        commit.commit(storage, tmp, final, manifest.dumps(manifest.compact(body)))
    except Exception:  # not BaseException: a crash (or a simulated one) leaves what it leaves
        commit.abort(storage, tmp)
        raise
    return body


def _each(fn: Callable[[int], T], count: int, threads: int = 4) -> list[T]:
    """``[fn(0), ..., fn(count - 1)]``, side by side. Once the interpreter is exiting no thread pool takes
    work (a process that saves and then ends still completes its save from an atexit handler): what a
    pool refuses runs here, one after another."""
    if count < 2:
        return [fn(k) for k in range(count)]
    futures = []
    with ThreadPoolExecutor(max_workers=min(threads, count)) as pool:
        for k in range(count):
            try:
                futures.append(pool.submit(fn, k))
            except RuntimeError:  # "cannot schedule new futures after interpreter shutdown"
                break
        rest = [fn(k) for k in range(len(futures), count)]
        return [f.result() for f in futures] + rest


def _entry_table(plan: layout.TensorPlan, sums: list[checksum.Value]) -> dict[str, Any]:
    names = {d: codec.dtype_name(d) for d in set(plan.dtypes)}
    dtypes = [names[d] for d in plan.dtypes]
    return {n.E_FILE: plan.shard, n.E_DTYPE: dtypes, n.E_SHAPE: plan.shapes,
            n.E_START: plan.start, n.E_END: [s + z for s, z in zip(plan.start, plan.sizes, strict=True)],
            n.E_SUM: sums}


class _Coded:
    """Per entry, how a compressed save stored it: codec, offset and size of the stored bytes."""

    def __init__(self, count: int, identify: bool) -> None:
        self.codec, self.start, self.size = [n.CODEC_RAW] * count, [0] * count, [0] * count
        self.content: list[checksum.Value] | None = [""] * count if identify else None  # incremental: identities

    def any(self) -> bool:
        return any(c != n.CODEC_RAW for c in self.codec)

    def table(self, entries: dict[str, Any], plan: layout.TensorPlan) -> dict[str, Any]:
        """The entry table of a v5 manifest: stored ranges, each entry's codec and raw size (and, for an
        incremental save, its content identity: the digest of its raw bytes, which is the checksum of an
        entry stored raw)."""
        ends = [s + z for s, z in zip(self.start, self.size, strict=True)]
        table = {**entries, n.E_START: self.start, n.E_END: ends, n.E_CODEC: self.codec, n.E_RAW: plan.sizes}
        if self.content is not None:
            table[n.E_CONTENT] = [c if codec != n.CODEC_RAW else s
                                  for c, codec, s in zip(self.content, self.codec, entries[n.E_SUM], strict=True)]
        return table


def write_compressed_file(storage: Storage, path: str, plan: layout.TensorPlan, k: int, buffer: torch.Tensor | None,
                          sums: list[checksum.Value], algo: checksum.Algorithm, coded: _Coded) -> checksum.Value:
    """Tensor file ``k`` with each entry compressed where it pays (``coded`` records how); return the header's sum.

    Entries stored raw come first, in the plan's order (so they stay aligned); compressed ones follow
    as ``U8`` byte strings. The compressed bytes of the whole file are held in memory until the header,
    which needs their sizes, is written. Checksums cover the stored bytes.
    """
    local, blobs = threading.local(), {}

    def pack(e: int) -> None:  # in a few threads: zstd and the checksum release the GIL
        packer = getattr(local, "packer", None) or compression.Packer()
        local.packer = packer
        data = _entry_bytes(plan, e, buffer)
        coded.codec[e], blobs[e] = packer.pack(data, plan.dtypes[e].itemsize)
        sums[e] = algo.of(blobs[e])
        if coded.content is not None and coded.codec[e] != n.CODEC_RAW:
            coded.content[e] = algo.of(data)

    small = [e for e in plan.files[k] if plan.sizes[e] < compression.MIN_BYTES]  # stored raw: no thread needed
    for e in small:
        blobs[e] = _entry_bytes(plan, e, buffer)
        sums[e] = algo.of(blobs[e])
    large = [e for e in plan.files[k] if plan.sizes[e] >= compression.MIN_BYTES]
    _each(lambda i: pack(large[i]), len(large), PACKERS)
    order = sorted(plan.files[k], key=lambda e: coded.codec[e] != n.CODEC_RAW)
    offset = 0
    for e in order:
        coded.start[e], coded.size[e] = offset, len(blobs[e])
        offset += len(blobs[e])
    raw = [coded.codec[e] == n.CODEC_RAW for e in order]
    header = build_header([f"e{e}" for e in order], [plan.dtypes[e] if r else torch.uint8 for e, r in zip(order, raw)],
                          [plan.shapes[e] if r else (coded.size[e],) for e, r in zip(order, raw)],
                          [coded.size[e] for e in order])
    handle = storage.create(path)
    try:
        handle.write(memoryview(header))
        for e in order:  # the blobs are held until the file is closed
            blob = memoryview(blobs[e])
            for start in range(0, len(blob), WRITE):
                lend(handle, blob[start:start + WRITE])
    except Exception:
        handle.abort()
        raise
    handle.close()
    return algo.of(header)


def _entry_bytes(plan: layout.TensorPlan, e: int, buffer: torch.Tensor | None) -> memoryview:
    """Entry ``e``'s bytes: a slice of its staged buffer, or of (a CPU copy of) the live tensor."""
    if buffer is not None:
        start = plan.start[e]
        return buffer.numpy().data[start:start + plan.sizes[e]]
    if not plan.sizes[e]:
        return memoryview(b"")
    return plan.sources[e].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data


def write_tensor_file(storage: Storage, path: str, plan: layout.TensorPlan, k: int, buffer: torch.Tensor | None,
                      sums: list[checksum.Value], algo: checksum.Algorithm = checksum.CURRENT) -> checksum.Value:
    """Write tensor file ``k`` (header, then data); fill ``sums`` for its entries; return the header's sum."""
    entries = plan.files[k]
    header = build_header([f"e{e}" for e in entries], [plan.dtypes[e] for e in entries],
                          [plan.shapes[e] for e in entries], [plan.sizes[e] for e in entries])
    handle = storage.create(path)
    try:
        handle.write(memoryview(header))
        if buffer is not None:
            _write_staged(handle, plan, entries, buffer, sums, algo)
        else:
            _write_live(handle, plan, entries, sums, algo)
    except Exception:
        handle.abort()
        raise
    handle.close()
    return algo.of(header)


def _write_staged(handle: WriteHandle, plan: layout.TensorPlan, entries: list[int], buffer: torch.Tensor,
                  sums: list[checksum.Value], algo: checksum.Algorithm) -> None:
    """The data section is already laid out in ``buffer``: checksum each entry, write big chunks."""
    view = buffer.numpy().data
    of, starts, sizes = algo.function, plan.start, plan.sizes

    def checksums() -> None:
        for e in entries:
            start = starts[e]
            sums[e] = of(view[start:start + sizes[e]])

    total = sum(plan.sizes[e] for e in entries)
    if total < WRITE:
        checksums()
        lend(handle, view[:total])
        return
    with ThreadPoolExecutor(max_workers=1) as pool:  # checksums beside the writes: both release the GIL
        done = pool.submit(checksums)
        for start in range(0, total, WRITE):  # the staging buffer is not touched before the file is closed
            lend(handle, view[start:min(start + WRITE, total)])
        done.result()


def _write_live(handle: WriteHandle, plan: layout.TensorPlan, entries: list[int],
                sums: list[checksum.Value], algo: checksum.Algorithm) -> None:
    """Write straight from the tensors; small ones are gathered into one write per few MB."""
    bounce = _Bounce(handle)
    of = algo.function
    for e in entries:
        src, size = plan.sources[e], plan.sizes[e]
        if src.is_cpu and size <= SMALL and src.is_contiguous():
            sums[e] = of(bounce.add(src.data_ptr(), size))
            continue
        bounce.flush()
        data = src.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        view = data.numpy().data if size else memoryview(b"")
        running = algo.running()
        for start in range(0, size, WRITE):
            chunk = view[start:start + WRITE]
            running.update(chunk)
            handle.write(chunk)
        sums[e] = running.value()
    bounce.flush()


class _Bounce:
    """A reusable buffer gathering small entries into one write."""

    def __init__(self, handle: WriteHandle) -> None:
        self._handle, self._array = handle, np.empty(BOUNCE, dtype=np.uint8)
        self._view, self._address, self._used = self._array.data, self._array.ctypes.data, 0

    def add(self, address: int, size: int) -> memoryview:
        """Copy ``size`` bytes from ``address``; return a view of the copy (valid until the next flush)."""
        if self._used + size > BOUNCE:
            self.flush()
        ctypes.memmove(self._address + self._used, address, size)
        self._used += size
        return self._view[self._used - size:self._used]

    def flush(self) -> None:
        if self._used:
            self._handle.write(self._view[:self._used])
            self._used = 0


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
        _yield_to_training()
        never_in_this_thread()  # the collector stays on for the training threads while this job runs
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


def _yield_to_training() -> None:
    """Lower this (writer) thread's scheduling priority, so training threads win the CPU cores.

    On Linux a thread is a task with its own nice value; elsewhere, or where it is not
    allowed, nothing changes. The writer mostly waits on the disk; when it does need a
    core (checksums, copying into the page cache) it should not steal it from training:
    on 2 cores, a CPU training loop saving every 50 steps ran 22% slower with the writer
    at normal priority and within noise of no checkpointing at the lowest one. Whenever
    training needs the save finished (the next save's back-pressure, wait(), close(),
    exit), the training thread is blocked, so the writer then has the cores to itself.
    """
    if not hasattr(os, "setpriority") or not sys.platform.startswith("linux"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)
    except OSError as exc:
        log.debug("could not lower the writer thread's priority: %s", exc)


@atexit.register
def _drain_at_exit() -> None:
    for writer in list(_LIVE):
        try:
            writer.wait()
        except BaseException as exc:
            log.error("a checkpoint save failed at interpreter exit: %s", exc)
