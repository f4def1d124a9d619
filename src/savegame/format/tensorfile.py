"""safetensors-compatible tensor files: header building and strict header parsing.

A file is ``u64 little-endian header length | JSON header | data``. Entries are
laid out back to back (safetensors forbids gaps) in the order given, which the
writer sorts by element size so every entry is naturally aligned. The header
is padded with spaces so the data starts on a 64-byte boundary. Dtypes that
safetensors cannot name are stored as ``U8`` bytes; the savegame manifest keeps
the real dtype, so any safetensors reader can still open the file.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from typing import Any, BinaryIO

import torch

from savegame.errors import CorruptCheckpointError
from savegame.format import checksum

ALIGN = 64
CHUNK = 64 * 2**20
MAX_HEADER = 100 * 2**20
METADATA = {"format": "savegame"}

_ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint64: "U64", torch.uint32: "U32", torch.uint16: "U16", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.complex64: "C64",
}
_ST_ITEMSIZE = {"U8": 1, "I8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F16": 2, "BF16": 2,
                "I16": 2, "U16": 2, "F32": 4, "I32": 4, "U32": 4, "F64": 8, "I64": 8, "U64": 8, "C64": 8}


def safetensors_view(dtype: torch.dtype, shape: Sequence[int], nbytes: int) -> tuple[str, list[int]]:
    """The dtype and shape under which an entry appears to plain safetensors readers."""
    name = _ST_DTYPES.get(dtype)
    if name is None:
        return "U8", [nbytes]
    return name, list(shape)


def build_header(keys: Sequence[str], dtypes: Sequence[torch.dtype], shapes: Sequence[Sequence[int]],
                 sizes: Sequence[int]) -> bytes:
    """The length prefix and padded JSON header of a file holding these entries, in this order.

    Built as text rather than through ``json.dumps`` of nested dicts: with tens of
    thousands of entries this is the difference between microseconds and a
    noticeable share of a save.
    """
    parts, offset = [], 0
    heads = {d: f'":{{"dtype":"{_ST_DTYPES.get(d, "U8")}","shape":[' for d in set(dtypes)}
    dims: dict[tuple[int, ...], str] = {}
    for key, dtype, shape, size in zip(keys, dtypes, shapes, sizes, strict=True):
        if dtype in _ST_DTYPES:
            text = dims.get(shape)  # type: ignore[call-overload]
            if text is None:
                text = dims[shape] = ",".join(map(str, shape))  # type: ignore[index]
        else:
            text = str(size)
        end = offset + size
        parts.append(f',"{key}{heads[dtype]}{text}],"data_offsets":[{offset},{end}]}}')
        offset = end
    raw = ('{"__metadata__":' + json.dumps(METADATA, separators=(",", ":"))
           + "".join(parts) + "}").encode()
    raw += b" " * ((-(8 + len(raw))) % ALIGN)
    return struct.pack("<Q", len(raw)) + raw


def read_header(f: BinaryIO, file_size: int, name: str, expected: checksum.Value | None = None, *,
                algo: checksum.Algorithm = checksum.CURRENT, parse: bool = True) -> tuple[int, dict[str, Any] | None]:
    """Check a tensor file's header; return (offset where data starts, the parsed header or None).

    ``expected`` is the header's checksum from the manifest. When it matches, the
    JSON need not be parsed to be trusted (``parse=False`` skips it; the manifest
    says where every entry is).
    """
    head = f.read(8)
    if len(head) != 8:
        raise CorruptCheckpointError(f"{name}: truncated tensor file (no header); the checkpoint is damaged")
    (length,) = struct.unpack("<Q", head)
    if length > min(MAX_HEADER, file_size - 8):
        raise CorruptCheckpointError(f"{name}: header length {length} exceeds the file; the checkpoint is damaged")
    raw = f.read(length)
    if expected is not None and algo.of(head + raw) != expected:
        raise CorruptCheckpointError(f"{name}: header checksum mismatch; the checkpoint is damaged")
    if not parse:
        return 8 + length, None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CorruptCheckpointError(f"{name}: unreadable tensor file header ({exc})") from exc
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{name}: tensor file header is not an object")
    data_len = file_size - 8 - length
    for key, spec in header.items():
        if key != "__metadata__":
            _check_spec(name, key, spec, data_len)
    return 8 + length, header


def _check_spec(name: str, key: str, spec: Any, data_len: int) -> None:
    ok = isinstance(spec, dict) and spec.get("dtype") in _ST_ITEMSIZE
    offsets = spec.get("data_offsets") if ok else None
    shape = spec.get("shape") if ok else None
    ok = ok and isinstance(offsets, list) and len(offsets) == 2 and isinstance(shape, list)
    ok = ok and all(type(v) is int and v >= 0 for v in [*offsets, *shape])  # type: ignore[misc]
    if not ok or not offsets[0] <= offsets[1] <= data_len:  # type: ignore[index]
        raise CorruptCheckpointError(f"{name}: bad header entry {key!r}; the checkpoint is damaged")
    count = 1
    for dim in shape:  # type: ignore[union-attr]
        count *= dim
    if count * _ST_ITEMSIZE[spec["dtype"]] != offsets[1] - offsets[0]:  # type: ignore[index]
        raise CorruptCheckpointError(f"{name}: entry {key!r} size does not match its shape")
