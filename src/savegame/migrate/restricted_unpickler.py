"""A restricted plain unpickler for foreign ``.pkl`` files (Accelerate's ``random_states_0.pkl``).

:class:`RestrictedUnpickler` resolves every GLOBAL through ``find_class``, and
``find_class`` answers only from the allowlist of :mod:`.allowlist` plus the
tensor rebuilders; anything else raises
:class:`~savegame.errors.UnsafeCheckpointError` naming the global before it is
imported. Tensors in a plain pickle carry their storage as a small legacy
``torch.save`` blob whose stock loader unpickles without restriction; here it is
parsed by :func:`_storage_from_bytes` with the same restricted unpickler.
"""

from __future__ import annotations

import io
import pickle
import struct
import sys
from pathlib import Path
from typing import Any

import torch

from savegame.errors import (
    CheckpointNotFoundError,
    ConfigurationError,
    CorruptCheckpointError,
    StorageError,
    UnsafeCheckpointError,
)
from savegame.migrate.allowlist import ALLOWLIST, PLAIN_PYTHON, PLAIN_TORCH, plain, py3_name

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_MAX_STORAGE_BYTES = 1 << 31


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose globals come from a fixed allowlist only."""

    allowed: dict[str, Any] = {}  # set below, once the storage loader exists

    def find_class(self, module: str, name: str) -> Any:
        full = py3_name(f"{module}.{name}")  # an overridden find_class sees Python 2 spellings unmapped
        try:
            return self.allowed[full]
        except KeyError:
            raise UnsafeCheckpointError(
                f"the pickle needs {full}, which savegame does not load from foreign files: unpickling it "
                "could run code of the file's choosing") from None

    def persistent_load(self, pid: Any) -> Any:
        raise CorruptCheckpointError("the pickle refers to external storage (a persistent id): it is not a "
                                     "plain pickle; torch.save files are read with safe_torch_load")


def safe_pickle_load(path: str | Path) -> Any:
    """Unpickle a plain pickle file with the restricted unpickler; no code from the file runs.

    Raises UnsafeCheckpointError naming the first global outside the allowlist,
    CorruptCheckpointError for truncated or non-pickle files (a torch zip file
    included: read those with safe_torch_load), CheckpointNotFoundError for a
    missing path and ConfigurationError for a directory.
    """
    file = Path(path)
    if not file.exists():
        raise CheckpointNotFoundError(f"{file} does not exist")
    if file.is_dir():
        raise ConfigurationError(f"{file} is a directory; safe_pickle_load reads one pickle file")
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise StorageError(f"cannot read {file}: {exc}") from exc
    if data.startswith(b"PK"):
        raise CorruptCheckpointError(f"{file} is a zip archive (torch.save format), not a plain pickle; "
                                     "read it with safe_torch_load")
    try:
        return plain(_unpickle(data))
    except UnsafeCheckpointError as exc:
        raise UnsafeCheckpointError(f"{file}: {exc}. If it is not needed, re-save the file without it") from exc
    except CorruptCheckpointError as exc:
        raise CorruptCheckpointError(f"{file}: {exc}") from exc
    except Exception as exc:  # pickle reports damage as UnpicklingError, EOFError, ValueError, ...
        raise CorruptCheckpointError(f"{file} is not a readable pickle: {type(exc).__name__}: {exc}") from exc


def _unpickle(data: bytes) -> Any:
    return RestrictedUnpickler(io.BytesIO(data)).load()


def _storage_from_bytes(blob: Any) -> Any:
    """Stands for ``torch.storage._load_from_bytes`` (a legacy torch.save of one storage).

    The layout is: magic number, protocol version, system info, the storage's
    persistent id, the list of storage keys, then per key an int64 byte count and
    the raw bytes. Only that shape is accepted.
    """
    if not isinstance(blob, bytes):
        raise CorruptCheckpointError("a pickled tensor storage is not bytes")
    f = io.BytesIO(blob)
    header = [_LegacyHeader(f).load() for _ in range(3)]
    if header[0] != _LEGACY_MAGIC or not isinstance(header[2], dict):
        raise CorruptCheckpointError("a pickled tensor storage has an unknown header")
    if header[2].get("little_endian", True) != (sys.byteorder == "little"):
        raise CorruptCheckpointError("a pickled tensor storage was written on a machine of other byte order")
    record = _LegacyHeader(f).load()
    keys = _LegacyHeader(f).load()
    if not (isinstance(record, _StorageRef) and keys == [record.key]):
        raise CorruptCheckpointError("a pickled tensor storage does not hold exactly one storage")
    size = f.read(8)
    if len(size) != 8:
        raise CorruptCheckpointError("a pickled tensor storage is truncated")
    (count,) = struct.unpack("<q", size)  # torch writes the element count little-endian everywhere
    nbytes = count * record.element_size
    if not 0 <= nbytes <= _MAX_STORAGE_BYTES:
        raise CorruptCheckpointError(f"a pickled tensor storage claims {nbytes} bytes")
    raw = f.read(nbytes)
    if len(raw) != nbytes:
        raise CorruptCheckpointError("a pickled tensor storage is truncated")
    untyped = torch.frombuffer(bytearray(raw), dtype=torch.uint8).untyped_storage() if raw else torch.UntypedStorage()
    if record.dtype is None:
        return untyped
    return torch.storage.TypedStorage(wrap_storage=untyped, dtype=record.dtype, _internal=True)


_STORAGE_DTYPES: dict[str, torch.dtype | None] = {
    "UntypedStorage": None, "ByteStorage": torch.uint8, "CharStorage": torch.int8, "ShortStorage": torch.int16,
    "IntStorage": torch.int32, "LongStorage": torch.int64, "HalfStorage": torch.float16,
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "BFloat16Storage": torch.bfloat16,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
}
_STORAGE_TYPES: dict[str, Any] = {name: getattr(torch, name) for name in _STORAGE_DTYPES}


class _StorageRef:
    def __init__(self, key: str, dtype: torch.dtype | None) -> None:
        self.key, self.dtype = key, dtype
        self.element_size = 1 if dtype is None else torch._utils._element_size(dtype)


class _LegacyHeader(RestrictedUnpickler):
    """Reads the legacy blob's pickles: plain values, and one persistent id naming the storage."""

    allowed = {**PLAIN_PYTHON, **{f"torch.{n}": t for n, t in _STORAGE_TYPES.items()}}

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"
                and any(pid[1] is t for t in _STORAGE_TYPES.values()) and isinstance(pid[2], str)
                and type(pid[4]) is int and pid[5] is None):
            raise CorruptCheckpointError(f"a pickled tensor storage has an unexpected record {pid!r:.200}")
        name = next(n for n, t in _STORAGE_TYPES.items() if pid[1] is t)
        return _StorageRef(pid[2], _STORAGE_DTYPES[name])


RestrictedUnpickler.allowed = {**ALLOWLIST, **PLAIN_PYTHON, **PLAIN_TORCH,
                               "torch.storage._load_from_bytes": _storage_from_bytes}
