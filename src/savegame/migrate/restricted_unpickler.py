"""A restricted plain unpickler for foreign ``.pkl`` files (Accelerate's ``random_states_0.pkl``).

:class:`RestrictedUnpickler` resolves every GLOBAL through ``find_class``, and
``find_class`` answers only from the allowlist of :mod:`.allowlist` plus the
tensor rebuilders; anything else raises
:class:`~savegame.errors.UnsafeCheckpointError` naming the global before it is
imported. Tensors in a plain pickle carry their storage as a small legacy
``torch.save`` blob whose stock loader unpickles without restriction; here it is
parsed by :func:`_storage_from_bytes` with the same restricted unpickler.

It is built on the pure-Python ``pickle._Unpickler``, whose memo is a dict: the C
unpickler sizes its memo array by the largest index a file names, so a 9-byte
pickle with ``LONG_BINPUT 0x0f0f6161`` would make it allocate gigabytes. Whatever
the allowed globals allocate is charged to the load's :class:`~.budget.Budget`.
"""

from __future__ import annotations

import io
import pickle
import struct
import sys
from pathlib import Path
from typing import Any, ClassVar

import torch

from savegame.errors import (
    CheckpointNotFoundError,
    ConfigurationError,
    CorruptCheckpointError,
    StorageError,
    UnsafeCheckpointError,
)
from savegame.migrate import budget
from savegame.migrate.allowlist import ALLOWLIST, PLAIN_PYTHON, py3_name
from savegame.migrate.plain import plain

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # what a legacy torch.save file (and a pickled storage) starts with
_TORCH_UTILS: Any = torch._utils  # untyped modules: called through Any
_STORAGE: Any = torch.storage


class RestrictedUnpickler(pickle._Unpickler):
    """The pure-Python unpickler, whose globals come from a fixed allowlist only."""

    allowed: ClassVar[dict[str, Any]] = {}  # set below, once the storage loader exists

    def find_class(self, module: str, name: str) -> Any:
        full = py3_name(f"{module}.{name}")  # an overridden find_class sees Python 2 spellings unmapped
        try:
            return self.allowed[full]
        except KeyError:
            raise UnsafeCheckpointError(
                f"the pickle needs {full}, which savegame does not load from foreign files: unpickling it "
                "could run code of the file's choosing. If it is not needed, re-save the file without it") from None

    def persistent_load(self, pid: Any) -> Any:
        raise CorruptCheckpointError("the pickle refers to external storage (a persistent id): it is not a "
                                     "plain pickle; torch.save files are read with safe_torch_load")


def restricted_unpickle(path: str | Path, *, max_bytes: int | None = None) -> Any:
    """Unpickle a plain pickle file with the restricted unpickler; no code from the file runs.

    Raises UnsafeCheckpointError naming the first global outside the allowlist, or
    when loading would allocate more than ``max_bytes`` (default: a small multiple of
    the file's size, see :mod:`.budget`); CorruptCheckpointError for truncated or
    non-pickle files (a torch zip file included: read those with safe_torch_load),
    CheckpointNotFoundError for a missing path and ConfigurationError for a directory.
    """
    budget.check_max_bytes(max_bytes)
    file = Path(path)
    if not file.exists():
        raise CheckpointNotFoundError(f"{file} does not exist")
    if file.is_dir():
        raise ConfigurationError(f"{file} is a directory; restricted_unpickle reads one pickle file")
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise StorageError(f"cannot read {file}: {exc}") from exc
    if data.startswith(b"PK"):
        raise CorruptCheckpointError(f"{file} is a zip archive (torch.save format), not a plain pickle; "
                                     "read it with safe_torch_load")
    try:
        with budget.charged_to(budget.Budget(str(file), len(data), max_bytes)):
            return plain(_unpickle(data))
    except UnsafeCheckpointError as exc:
        raise UnsafeCheckpointError(_named(file, exc)) from exc
    except CorruptCheckpointError as exc:
        raise CorruptCheckpointError(_named(file, exc)) from exc
    except Exception as exc:  # pickle reports damage as UnpicklingError, EOFError, ValueError, ...
        raise CorruptCheckpointError(f"{file} is not a readable pickle: {type(exc).__name__}: {exc!s:.300}") from exc


def _named(file: Path, exc: Exception) -> str:
    """The message of ``exc``, starting with the file it is about."""
    return str(exc) if str(exc).startswith(str(file)) else f"{file}: {exc}"


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
    if header[0] != LEGACY_MAGIC or not isinstance(header[2], dict):
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
    if not 0 <= nbytes <= len(blob) - f.tell():
        raise CorruptCheckpointError(f"a pickled tensor storage claims {nbytes} bytes but holds {len(blob) - f.tell()}")
    budget.spend(nbytes, "a tensor storage")
    raw = f.read(nbytes)
    if len(raw) != nbytes:
        raise CorruptCheckpointError("a pickled tensor storage is truncated")
    untyped = torch.frombuffer(bytearray(raw), dtype=torch.uint8).untyped_storage() if raw else _STORAGE.UntypedStorage()
    if record.dtype is None:
        return untyped
    return _STORAGE.TypedStorage(wrap_storage=untyped, dtype=record.dtype, _internal=True)


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
        self.element_size = 1 if dtype is None else dtype.itemsize


class _LegacyHeader(RestrictedUnpickler):
    """Reads the legacy blob's pickles: plain values, and one persistent id naming the storage."""

    allowed: ClassVar[dict[str, Any]] = {**PLAIN_PYTHON, **{f"torch.{n}": t for n, t in _STORAGE_TYPES.items()}}

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"
                and any(pid[1] is t for t in _STORAGE_TYPES.values()) and isinstance(pid[2], str)
                and type(pid[4]) is int and pid[5] is None):
            raise CorruptCheckpointError(f"a pickled tensor storage has an unexpected record {pid!r:.200}")
        name = next(n for n, t in _STORAGE_TYPES.items() if pid[1] is t)
        return _StorageRef(pid[2], _STORAGE_DTYPES[name])


def _storage_bytes(storage: Any) -> int:
    if isinstance(storage, torch.storage.TypedStorage):
        return int(storage._untyped_storage.nbytes())
    if isinstance(storage, torch.UntypedStorage):
        return int(storage.nbytes())
    raise CorruptCheckpointError(f"a pickled tensor is built on a {type(storage).__name__}, not a storage")


def _element_size(storage: Any) -> int:
    return int(storage.dtype.itemsize) if isinstance(storage, torch.storage.TypedStorage) else 1


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> torch.Tensor:
    """Stands for torch's ``_rebuild_tensor`` / ``_rebuild_tensor_v2``: the view is charged before it exists."""
    budget.charge_tensor(size, _element_size(storage), _storage_bytes(storage))
    rebuilt: torch.Tensor = (_TORCH_UTILS._rebuild_tensor(storage, offset, size, stride) if not rest
                             else _TORCH_UTILS._rebuild_tensor_v2(storage, offset, size, stride, *rest))
    return rebuilt


#: Tensor rebuilders for plain pickles of tensors (torch.load allows torch's own, in a dry run first).
PLAIN_TORCH: dict[str, Any] = {
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
    "torch.storage._load_from_bytes": _storage_from_bytes,
}

RestrictedUnpickler.allowed = {**ALLOWLIST, **PLAIN_PYTHON, **PLAIN_TORCH}
