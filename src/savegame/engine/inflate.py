"""Reading compressed (format v5) entries: read, checked against their checksum, decompressed.

:func:`savegame.engine.readinto.read_entries` runs this before it copies any raw entry,
so a frame that does not decode is found before a byte reaches the caller's tensors.
Each file is read in entry order; entries are checked and decompressed in a few threads
(zstd and the checksum release the GIL), with a bounded number of blobs in flight.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO

import torch

from savegame.errors import CorruptCheckpointError, StorageError
from savegame.format import checksum, codec, compression
from savegame.format import names as n
from savegame.format.tensorfile import read_header
from savegame.storage.base import Storage

THREADS = min(4, os.cpu_count() or 1)


def inflate(storage: Storage, name: str, doc: Mapping[str, Any], packed: list[int], out: list[torch.Tensor],
            algo: checksum.Algorithm | None, hold: set[int], lazy: bool) -> dict[int, torch.Tensor]:
    """Read, check (``algo``; None: not) and decompress the compressed entries ``packed`` into ``out``.

    Entries in ``hold`` (the caller's own or GPU tensors) are decompressed into new CPU tensors,
    returned by entry for the caller to copy once everything has been read; with ``lazy``
    (``mmap=True``) every entry gets a new tensor in ``out``.
    """
    job = _Inflater(doc, out, algo, hold, lazy)
    files = doc[n.M_ENTRIES][n.E_FILE]
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        for k, (file, expected) in enumerate(zip(doc[n.M_FILES], doc[n.M_FILE_CHECKSUMS], strict=True)):
            mine = [e for e in packed if files[e] == k]
            if mine:
                job.file(storage, n.file_path(name, file), expected, mine, pool)
    return job.later


class _Inflater:
    def __init__(self, doc: Mapping[str, Any], out: list[torch.Tensor], algo: checksum.Algorithm | None,
                 hold: set[int], lazy: bool) -> None:
        self.entries, self.out, self.algo, self.hold, self.lazy = doc[n.M_ENTRIES], out, algo, hold, lazy
        self.header_algo = checksum.Algorithm(doc[n.M_CHECKSUM_ALGO])
        self.dtypes = {name: codec.dtype_from_name(name) for name in set(self.entries[n.E_DTYPE])}
        self.later: dict[int, torch.Tensor] = {}

    def file(self, storage: Storage, path: str, expected: checksum.Value, mine: list[int],
             pool: ThreadPoolExecutor) -> None:
        where = f"{storage.root}/{path}"
        starts = self.entries[n.E_START]
        pending: deque[Future[None]] = deque()
        try:
            size = storage.size(path)
            with storage.open_read(path) as f:
                start, _ = read_header(f, size, where, expected, algo=self.header_algo, parse=False)
                need = max(self.entries[n.E_END][e] for e in mine)
                if start + need > size:  # before reading (and allocating) what the manifest claims
                    raise CorruptCheckpointError(f"{where}: truncated ({size - start} data bytes, needs {need})")
                for e in sorted(mine, key=starts.__getitem__):
                    pending.append(pool.submit(self._decode, e, self._read(f, start, e, where), where))
                    if len(pending) > 2 * THREADS:
                        pending.popleft().result()
            while pending:
                pending.popleft().result()
        except StorageError as exc:
            raise CorruptCheckpointError(f"{where}: cannot be read ({exc}); the checkpoint is incomplete") from exc

    def _read(self, f: BinaryIO, start: int, e: int, where: str) -> bytes:
        count = self.entries[n.E_END][e] - self.entries[n.E_START][e]
        f.seek(start + self.entries[n.E_START][e])
        blob = f.read(count)
        if len(blob) != count:
            raise CorruptCheckpointError(f"{where}: truncated (entry {e} incomplete); the checkpoint is damaged")
        return blob

    def _decode(self, e: int, blob: bytes, where: str) -> None:
        entries = self.entries
        if self.algo is not None and self.algo.of(blob) != entries[n.E_SUM][e]:
            raise CorruptCheckpointError(f"{where}: checksum mismatch in entry {e}; the data is damaged")
        dtype = self.dtypes[entries[n.E_DTYPE][e]]
        own = self.lazy or e in self.hold
        dest = torch.empty(entries[n.E_SHAPE][e], dtype=dtype) if own else self.out[e]
        compression.unpack_into(entries[n.E_CODEC][e], blob, entries[n.E_RAW][e], dtype.itemsize, dest.data_ptr(),
                                f"{where}: entry {e}")
        if own and not self.lazy:
            self.later[e] = dest
        else:
            self.out[e] = dest
