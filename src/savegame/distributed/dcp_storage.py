"""torch.distributed.checkpoint's storage layer, writing savegame's files and a JSON manifest.

DCP plans (which rank writes which replicated tensor, how a DTensor's shards fit
together, how they reshard on load); this module stores. Each rank writes one
safetensors-compatible file, ``tensors-<rank>.safetensors``, checksumming every
piece as it writes. Rank 0 turns DCP's metadata and every rank's write results
into the manifest (JSON: DCP's default ``.metadata`` is a pickle, and its default
reader unpickles non-tensor entries: a crafted file runs code on load) and commits.
Reading verifies each piece's checksum before a byte of it reaches a tensor.
Non-tensor values never pass through DCP: they live in the manifest's JSON tree.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from savegame.engine.dedup import Dedup, Key, Location, digest, worth_keeping
from savegame.engine.writer import write_tensor_file
from savegame.errors import CorruptCheckpointError, SavegameError, StorageError
from savegame.format import checksum, codec, layout
from savegame.format import names as n
from savegame.format.tensorfile import build_header, read_header
from savegame.storage.base import Storage


@dataclass(frozen=True)
class Piece:
    """Where one written chunk lies: file (= rank), dtype, chunk shape, byte range, checksums."""

    file: str  # the rank's tensor file, or (incremental) a pack of the content store
    dtype: str
    shape: list[int]
    start: int
    end: int
    checksum: str
    header: str  # the checksum of its file's header


def empty_header_checksum() -> str:
    """The header checksum of a tensor file with no entries (a rank DCP gave nothing to write)."""
    return str(checksum.CURRENT.of(build_header([], [], [], [])))


class SavegameWriter(StorageWriter):
    """Writes this rank's share of a save into ``tmp``; on rank 0, ``finish`` builds the manifest and commits."""

    def __init__(self, storage: Storage, tmp: str, rank: int,
                 finish: Callable[[Metadata, list[list[WriteResult]]], None] | None,
                 dedup: Dedup | None = None) -> None:
        super().__init__()
        self.storage, self.tmp, self.rank, self._finish = storage, tmp, rank, finish
        self.dedup = dedup  # incremental: pieces whose content an earlier save of this rank stored are referenced
        self.written: list[tuple[Key, Location]] = []  # this rank's pieces, for the index of the next save

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        pass

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        pass

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return plans

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        out: Future[list[WriteResult]] = Future()
        out.set_result(self._write(plan, planner))
        return out

    def _write(self, plan: SavePlan, planner: SavePlanner) -> list[WriteResult]:
        items = []
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                raise SavegameError(f"{item.index.fqn!r} is not a tensor; savegame stores non-tensor values in "
                                    "its JSON manifest, never through torch.distributed.checkpoint")
            data = planner.resolve_data(item)
            assert isinstance(data, torch.Tensor)
            items.append((item, data.detach().contiguous().cpu()))
        if self.dedup is not None:
            return self._write_packed(items, self.dedup)
        tensor_plan = _one_file([t for _, t in items])
        sums: list[checksum.Value] = [0] * len(items)
        file = n.tensor_file(self.rank)
        header = write_tensor_file(self.storage, f"{self.tmp}/{file}", tensor_plan, 0, None, sums)
        return [WriteResult(index=item.index, size_in_bytes=tensor_plan.sizes[e], storage_data=Piece(
                    file, codec.dtype_name(tensor.dtype), list(tensor.shape), tensor_plan.start[e],
                    tensor_plan.start[e] + tensor_plan.sizes[e], str(sums[e]), str(header)))
                for e, (item, tensor) in enumerate(items)]

    def _write_packed(self, items: list[tuple[Any, torch.Tensor]], dedup: Dedup) -> list[WriteResult]:
        """Incremental: every piece is hashed (exact; the pieces are fresh copies, so no version counter
        says what changed); those the index holds are referenced, the rest go into one new pack."""
        keys = [(digest(t), t.nbytes) for _, t in items]
        found = {i: loc for i, key in enumerate(keys)  # (a distributed save stores and references raw bytes only)
                 if (loc := dedup.index.get(key)) and loc.codec == n.CODEC_RAW}
        where: dict[int, Location] = worth_keeping(found, self.storage.size)
        new = [i for i in range(len(items)) if i not in where]
        if new:
            tensor_plan = _one_file([items[i][1] for i in new])
            sums: list[checksum.Value] = [0] * len(new)
            pack = n.pack_file(uuid.uuid4().hex)
            self.storage.makedirs(n.DATA_DIR)
            header = write_tensor_file(self.storage, pack, tensor_plan, 0, None, sums, checksum.CONTENT)
            self.storage.fsync_dir(n.DATA_DIR)
            for e, i in enumerate(new):
                start = tensor_plan.start[e]
                where[i] = Location(pack, header, start, start + tensor_plan.sizes[e], sums[e])
        self.written = [(key, where[i]) for i, key in enumerate(keys)]
        return [WriteResult(index=item.index, size_in_bytes=tensor.nbytes, storage_data=Piece(
                    where[i].file, codec.dtype_name(tensor.dtype), list(tensor.shape), where[i].start, where[i].end,
                    str(where[i].digest), str(where[i].file_sum)))
                for i, (item, tensor) in enumerate(items)]

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        if self._finish is not None:
            self._finish(metadata, results)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False  # always handed over explicitly, never found from an id


def _one_file(tensors: Sequence[torch.Tensor]) -> layout.TensorPlan:
    """A plan writing ``tensors`` back to back into one file, in this order."""
    tensor_plan = layout.TensorPlan()
    offset = 0
    for tensor in tensors:
        e = tensor_plan.add(tensor, tensor.dtype, tuple(tensor.shape))
        tensor_plan.start.append(offset)
        tensor_plan.shard.append(0)
        offset += tensor_plan.sizes[e]
    tensor_plan.files = [list(range(len(tensors)))]
    return tensor_plan


def tables(metadata: Metadata, results: Sequence[Sequence[WriteResult]], keys: Sequence[str],
           world_size: int, *, packed: bool = False) -> dict[str, Any]:
    """The manifest's files, file checksums, entries and tensor table for tensors ``keys`` (in tree order):
    one tensor file per rank, or (``packed``) the packs the pieces lie in."""
    entries: dict[str, list[Any]] = {c: [] for c in (n.E_FILE, n.E_DTYPE, n.E_SHAPE, n.E_START, n.E_END, n.E_SUM)}
    where: dict[MetadataIndex, int] = {}
    files = [] if packed else [n.tensor_file(r) for r in range(world_size)]
    headers = [empty_header_checksum()] * len(files)
    position = {f: k for k, f in enumerate(files)}
    for rank_results in results:
        for result in rank_results:
            piece = result.storage_data
            assert isinstance(piece, Piece)
            k = position.get(piece.file)
            if k is None:
                k = position[piece.file] = len(files)
                files.append(piece.file)
                headers.append(piece.header)
            where[MetadataIndex(result.index.fqn, result.index.offset)] = len(entries[n.E_FILE])
            for column, value in zip(entries, (k, piece.dtype, piece.shape, piece.start, piece.end,
                                               piece.checksum), strict=True):
                entries[column].append(value)
            headers[k] = piece.header
    entry, records = [], []
    for j, key in enumerate(keys):
        meta = metadata.state_dict_metadata.get(key)
        if not isinstance(meta, TensorStorageMetadata) or not meta.chunks:
            raise SavegameError(f"torch.distributed.checkpoint wrote no data for tensor {key!r}")
        pieces = [[where[MetadataIndex(key, chunk.offsets)], list(chunk.offsets)] for chunk in meta.chunks]
        entry.append(pieces[0][0])
        if len(pieces) > 1 or list(meta.chunks[0].sizes) != list(meta.size):
            records.append({"tensor": j, "shape": list(meta.size), "chunks": pieces})
    return {
        n.M_CHECKSUM_ALGO: (checksum.CONTENT if packed else checksum.CURRENT).name, n.M_FILES: files,
        n.M_FILE_CHECKSUMS: headers, n.M_ENTRIES: entries,
        n.M_TENSORS: {n.T_ENTRY: entry, n.T_DEVICE: ["cpu"] * len(keys), n.T_VIEWS: [], n.T_KEY: list(keys),
                      n.T_CHUNKS: records},
    }


def metadata_of(doc: Mapping[str, Any]) -> tuple[Metadata, dict[MetadataIndex, int]]:
    """DCP's view of a checkpoint from its (validated) manifest, and the entry of every stored chunk."""
    table, entries = doc[n.M_TENSORS], doc[n.M_ENTRIES]
    keys = table.get(n.T_KEY) or [f"tensor{j}" for j in range(len(table[n.T_ENTRY]))]
    shapes = {r["tensor"]: r for r in table.get(n.T_CHUNKS) or []}
    state: dict[str, Any] = {}
    storage: dict[MetadataIndex, int] = {}
    for j, (key, e) in enumerate(zip(keys, table[n.T_ENTRY], strict=True)):
        record = shapes.get(j)
        pieces = record["chunks"] if record else [[e, [0] * len(entries[n.E_SHAPE][e])]]
        size = record["shape"] if record else entries[n.E_SHAPE][e]
        chunks = []
        for piece_entry, offsets in pieces:
            chunks.append(ChunkStorageMetadata(offsets=torch.Size(offsets),
                                               sizes=torch.Size(entries[n.E_SHAPE][piece_entry])))
            storage[MetadataIndex(key, torch.Size(offsets))] = piece_entry
        state[key] = TensorStorageMetadata(TensorProperties(dtype=codec.dtype_from_name(entries[n.E_DTYPE][e])),
                                           torch.Size(size), chunks)
    return Metadata(state_dict_metadata=state, storage_data=storage), storage


class SavegameReader(StorageReader):
    """Reads the pieces DCP's load plan asks for, each verified against its checksum first."""

    def __init__(self, storage: Storage, name: str, doc: Mapping[str, Any], verify: bool = True) -> None:
        super().__init__()
        self.storage, self.name, self.doc, self.verify = storage, name, doc, verify
        self.metadata, self._entry_of = metadata_of(doc)

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        pass

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return self.metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        pass

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        by_entry: dict[int, list[Any]] = {}
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:
                raise CorruptCheckpointError(f"{item.dest_index.fqn!r} is not a tensor in this checkpoint")
            e = self._entry_of.get(MetadataIndex(item.storage_index.fqn, item.storage_index.offset))
            if e is None:
                raise CorruptCheckpointError(f"no stored chunk for {item.storage_index.fqn!r}")
            by_entry.setdefault(e, []).append(item)
        pieces = EntryReader(self.storage, self.name, self.doc, self.verify)
        try:
            for e in sorted(by_entry, key=pieces.order):
                if len(by_entry[e]) == 1 and _read_in_place(pieces, e, by_entry[e][0], planner):
                    continue
                piece = pieces.read(e)
                for item in by_entry[e]:
                    source = piece
                    for dim, (start, length) in enumerate(zip(item.storage_offsets, item.lengths, strict=True)):
                        source = source.narrow(dim, start, length)
                    target = planner.resolve_tensor(item).detach()
                    if target.shape != source.shape:
                        raise CorruptCheckpointError(
                            f"{item.dest_index.fqn!r}: stored piece {list(source.shape)} does not fit "
                            f"{list(target.shape)}")
                    target.copy_(source)
                    planner.commit_tensor(item, target)
        finally:
            pieces.close()
        done: Future[None] = Future()
        done.set_result(None)
        return done

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False


def _read_in_place(pieces: EntryReader, e: int, item: Any, planner: LoadPlanner) -> bool:
    """Read entry ``e`` straight into its destination when the item is the whole piece and the destination
    a contiguous CPU tensor of its dtype (the usual case: the same world size); False otherwise. The
    destinations are the restore's own fresh tensors, never live state: a piece that fails its checksum
    raises before anything reaches a live object."""
    shape = pieces.entries[n.E_SHAPE][e]
    if any(item.storage_offsets) or list(item.lengths) != list(shape):
        return False
    target = planner.resolve_tensor(item).detach()
    if (target.device.type != "cpu" or not target.is_contiguous() or list(target.shape) != list(shape)
            or target.dtype != codec.stored_dtype(pieces.entries[n.E_DTYPE][e])):
        return False
    pieces.read_into(e, target.reshape(-1).view(torch.uint8))
    planner.commit_tensor(item, target)
    return True


class EntryReader:
    """Reads single entries of a checkpoint's tensor files, checking file headers and entry checksums."""

    def __init__(self, storage: Storage, name: str, doc: Mapping[str, Any], verify: bool) -> None:
        self.storage, self.name, self.doc, self.verify = storage, name, doc, verify
        self.entries, self.algo = doc[n.M_ENTRIES], checksum.Algorithm(doc[n.M_CHECKSUM_ALGO])
        self._open: dict[int, tuple[Any, int, int]] = {}  # per file: handle, data start, size

    def order(self, e: int) -> tuple[int, int]:
        return self.entries[n.E_FILE][e], self.entries[n.E_START][e]

    def read(self, e: int) -> torch.Tensor:
        """Entry ``e`` as a new tensor of its dtype and shape, verified."""
        size = self.entries[n.E_END][e] - self.entries[n.E_START][e]
        self._check_fits(e)  # before allocating: a manifest may claim any size
        raw = torch.empty(size, dtype=torch.uint8)
        self.read_into(e, raw)
        return raw.view(codec.stored_dtype(self.entries[n.E_DTYPE][e])).reshape(self.entries[n.E_SHAPE][e])

    def read_into(self, e: int, out: torch.Tensor) -> None:
        """Entry ``e``'s bytes into ``out`` (contiguous uint8 CPU tensor of its size), verified when ``verify``."""
        handle, start, where = self._check_fits(e)
        begin, end = self.entries[n.E_START][e], self.entries[n.E_END][e]
        if out.numel() != end - begin:
            raise CorruptCheckpointError(f"{where}: entry {e} holds {end - begin} bytes, its destination "
                                         f"{out.numel()}; the checkpoint is damaged")
        view = out.numpy().data if end > begin else memoryview(bytearray())
        try:
            handle.seek(start + begin)
            got = handle.readinto(view) if end > begin else 0
        except (StorageError, OSError) as exc:
            raise CorruptCheckpointError(f"{where}: cannot be read ({exc}); the checkpoint is damaged") from exc
        if got != end - begin:
            raise CorruptCheckpointError(f"{where}: truncated (entry {e} incomplete); the checkpoint is damaged")
        if self.verify and self.algo.of(view) != self.entries[n.E_SUM][e]:
            raise CorruptCheckpointError(f"{where}: checksum mismatch in entry {e}; the checkpoint is damaged")

    def _check_fits(self, e: int) -> tuple[Any, int, str]:
        """(open handle, data start, name for messages) of entry ``e``'s file, which must hold the entry."""
        k = self.entries[n.E_FILE][e]
        file = self.doc[n.M_FILES][k]
        where = f"{self.storage.root}/{n.file_path(self.name, file)}"
        try:
            if k not in self._open:
                handle = self.storage.open_read(n.file_path(self.name, file))
                self._open[k] = (handle, 0, 0)
                size = self.storage.size(n.file_path(self.name, file))
                start, _ = read_header(handle, size, where, self.doc[n.M_FILE_CHECKSUMS][k], algo=self.algo,
                                       parse=False)
                self._open[k] = (handle, start, size)
        except (StorageError, OSError) as exc:
            raise CorruptCheckpointError(f"{where}: cannot be read ({exc}); the checkpoint is damaged") from exc
        handle, start, size = self._open[k]
        if start + self.entries[n.E_END][e] > size:
            raise CorruptCheckpointError(f"{where}: truncated (entry {e} incomplete); the checkpoint is damaged")
        return handle, start, where

    def close(self) -> None:
        for handle, _, _ in self._open.values():
            handle.close()
        self._open.clear()
