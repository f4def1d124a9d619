"""From a checkpoint directory back to a state tree, verifying as it reads.

Every problem (missing files, truncation, bad checksums, malformed manifest)
is a :class:`~savegame.errors.CorruptCheckpointError` naming the checkpoint.
Nothing here can execute code: the manifest is JSON and tensor files are raw
bytes behind a safetensors header.
"""

from __future__ import annotations

import mmap as _mmap
import zlib
from collections.abc import Mapping
from typing import Any

import torch

from savegame.errors import ConfigurationError, CorruptCheckpointError, StorageError
from savegame.format import codec, layout, manifest
from savegame.format import names as n
from savegame.format.tensorfile import CHUNK, read_header
from savegame.storage.base import Storage


def read_manifest(storage: Storage, name: str) -> dict[str, Any]:
    where = f"{storage.root}/{name}"
    try:
        raw = storage.read_bytes(f"{name}/{n.MANIFEST}")
    except StorageError as exc:
        raise CorruptCheckpointError(f"{where}: manifest cannot be read ({exc}); the checkpoint is incomplete") from exc
    return manifest.loads(raw, where)


def decode_meta(doc: Mapping[str, Any]) -> dict[str, Any]:
    """Step, epoch, metrics, extra and time of a manifest, decoded."""
    return {
        "step": doc[n.M_STEP],
        "epoch": doc.get(n.M_EPOCH),
        "metrics": codec.decode(doc.get(n.M_METRICS, {}), ()),
        "extra": codec.decode(doc.get(n.M_EXTRA), ()),
        "time": doc.get(n.M_TIME),
    }


def data_bytes(doc: Mapping[str, Any]) -> int:
    """The number of tensor data bytes a checkpoint holds (from its manifest)."""
    return sum(e["end"] - e["start"] for e in doc[n.M_ENTRIES])


def data_files(doc: Mapping[str, Any]) -> list[str]:
    """The names of a checkpoint's tensor files, relative to its directory."""
    return list(doc[n.M_FILES])


def quick_check(storage: Storage, name: str, doc: Mapping[str, Any]) -> list[str]:
    """Problems visible without reading the data: missing or truncated tensor files, bad headers."""
    problems = []
    for file, crc in zip(doc[n.M_FILES], doc[n.M_HEADER_CRCS]):
        where = f"{storage.root}/{name}/{file}"
        try:
            size = storage.size(f"{name}/{file}")
            with storage.open_read(f"{name}/{file}") as f:
                start, _ = read_header(f, size, where, crc)
            end = max((e["end"] for e in doc[n.M_ENTRIES] if e["file"] == file), default=0)
            if start + end > size:
                problems.append(f"{where}: truncated ({size} bytes, needs {start + end})")
        except (CorruptCheckpointError, StorageError) as exc:
            problems.append(str(exc))
    return problems


def device_of(map_location: torch.device | str | None) -> torch.device | None:
    """``map_location`` as a device; a bad one is a ConfigurationError naming it."""
    if map_location is None:
        return None
    try:
        return torch.device(map_location)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ConfigurationError(
            f"map_location must be a device such as 'cpu', 'cuda:0' or torch.device('meta'), got {map_location!r}"
        ) from exc


def read_tree(storage: Storage, name: str, doc: Mapping[str, Any], *, verify: bool = True,
              map_location: torch.device | str | None = None, mmap: bool = False) -> Any:
    """Decode the full state tree of checkpoint ``name`` (its manifest already parsed as ``doc``).

    Every tensor owns its storage (tensors that shared storage when saved share it
    again), so a tensor handed to ``load_state_dict`` never keeps a whole file
    buffer alive. NumPy arrays stay on the CPU whatever ``map_location`` says.
    """
    device = device_of(map_location)
    where = f"{storage.root}/{name}"
    entries = doc[n.M_ENTRIES]
    data = {f: _read_data(storage, f"{name}/{f}", where, mmap, crc if verify else None)
            for f, crc in zip(doc[n.M_FILES], doc[n.M_HEADER_CRCS])}
    blobs, dtypes = [], []
    for i, entry in enumerate(entries):
        buf = data[entry["file"]]
        if entry["end"] > buf.numel():
            raise CorruptCheckpointError(f"{where}: entry {i} lies past the end of {entry['file']}; the file is truncated")
        blob = buf[entry["start"]:entry["end"]]
        if verify and _crc(blob) != entry["crc32"]:
            raise CorruptCheckpointError(f"{where}: checksum mismatch in {entry['file']} (entry {i}); the data is damaged")
        blobs.append(blob)
        dtypes.append(codec.dtype_from_name(entry.get("dtype")))
    records = doc[n.M_TENSORS]
    tensors = layout.materialize(records, blobs, dtypes, device, own=not mmap)
    arrays = tensors if device is None or device.type == "cpu" else _LazyCpu(records, blobs, dtypes, not mmap)
    return codec.decode(doc.get(n.M_TREE), tensors, arrays=arrays)


class _LazyCpu:
    """CPU tensors of chosen records, built on first use (NumPy arrays when tensors go elsewhere)."""

    def __init__(self, records: list[Any], blobs: list[torch.Tensor], dtypes: list[torch.dtype], own: bool) -> None:
        self._records, self._blobs, self._dtypes, self._own = records, blobs, dtypes, own

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> torch.Tensor:
        return layout.materialize([self._records[index]], self._blobs, self._dtypes, None, own=self._own)[0]


def verify_checkpoint(storage: Storage, name: str) -> list[str]:
    """Every problem found in checkpoint ``name`` (empty when intact); reads in bounded chunks."""
    try:
        doc = read_manifest(storage, name)
        for file, crc in zip(doc[n.M_FILES], doc[n.M_HEADER_CRCS]):
            _verify_file(storage, name, file, crc, [e for e in doc[n.M_ENTRIES] if e["file"] == file])
        codec.decode(doc.get(n.M_TREE), [torch.empty(0)] * len(doc[n.M_TENSORS]))
    except CorruptCheckpointError as exc:
        return [str(exc)]
    return []


def _verify_file(storage: Storage, name: str, file: str, header_crc: int, entries: list[dict[str, Any]]) -> None:
    where = f"{storage.root}/{name}/{file}"
    try:
        size = storage.size(f"{name}/{file}")
        with storage.open_read(f"{name}/{file}") as f:
            start, _ = read_header(f, size, where, header_crc)
            for entry in sorted(entries, key=lambda e: e["start"]):
                f.seek(start + entry["start"])
                crc, left = 0, entry["end"] - entry["start"]
                while left:
                    chunk = f.read(min(CHUNK, left))
                    if not chunk:
                        raise CorruptCheckpointError(f"{where}: truncated (entry {entry['key']} incomplete)")
                    crc, left = zlib.crc32(chunk, crc), left - len(chunk)
                if crc != entry["crc32"]:
                    raise CorruptCheckpointError(f"{where}: checksum mismatch in entry {entry['key']}")
    except StorageError as exc:
        raise CorruptCheckpointError(f"{where}: cannot be read ({exc})") from exc


def _read_data(storage: Storage, path: str, where: str, use_mmap: bool, header_crc: int | None) -> torch.Tensor:
    """The data section of one tensor file as a uint8 tensor (read fully, or memory-mapped)."""
    try:
        size = storage.size(path)
        with storage.open_read(path) as f:
            start, _ = read_header(f, size, f"{where}/{path.rsplit('/', 1)[-1]}", header_crc)
            length = size - start
            if use_mmap and length:
                mapped = _mmap.mmap(f.fileno(), 0, access=_mmap.ACCESS_COPY)
                return torch.frombuffer(mapped, dtype=torch.uint8, offset=start, count=length)
            buf = torch.empty(length, dtype=torch.uint8)
            view, got = memoryview(buf.numpy()), 0  # type: ignore[arg-type]
            while got < length:
                read = f.readinto(view[got:])  # type: ignore[attr-defined]
                if not read:
                    raise CorruptCheckpointError(f"{where}: {path} is truncated")
                got += read
            return buf
    except StorageError as exc:
        raise CorruptCheckpointError(f"{where}: {path} cannot be read ({exc}); the checkpoint is incomplete") from exc


def _crc(blob: torch.Tensor) -> int:
    return zlib.crc32(memoryview(blob.numpy())) if blob.numel() else 0  # type: ignore[arg-type]
