"""A dry run of a ``torch.save`` file's pickle before ``torch.load`` sees it.

``torch.load(weights_only=True)`` never runs foreign code, but the constructors
it allows can be told to allocate: ``bytearray(2**30)``, ``torch.UntypedStorage(N)``,
``torch.FloatTensor(N)``, a storage record that claims 2**40 elements (legacy
files allocate it before reading it), a 1-element tensor expanded to 2**28
elements. torch gives no hook to bound that, so the same pickle is first run
through savegame's pure-Python restricted unpickler with *models* of torch's
allowed globals: tensors, storages and views are sized, not built; direct calls
of tensor and storage classes are refused; everything is charged to the load's
:class:`~.budget.Budget`. Globals neither torch nor savegame allows become inert
stand-ins (nothing is imported) and are reported, so the caller can refuse them
with torch's verdict.

Works on both the zip format (torch >= 1.6) and the legacy format (a sequence of
pickles followed by raw storage bytes).
"""

from __future__ import annotations

import io
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

from savegame.errors import CorruptCheckpointError, UnsafeCheckpointError
from savegame.migrate import budget, torch_models
from savegame.migrate.allowlist import ALLOWLIST, py3_name
from savegame.migrate.restricted_unpickler import LEGACY_MAGIC, RestrictedUnpickler

_LEGACY_PROTOCOL = 1001


@dataclass
class Preflight:
    """What the dry run found: the globals the file names that neither torch nor savegame allows.

    Names are spelled as in the pickle (``commands.call``); :func:`~.allowlist.py3_name`
    gives the Python 3 name (``subprocess.call``).
    """

    unknown: list[str] = field(default_factory=list)
    legacy: bool = False


class _DryUnpickler(RestrictedUnpickler):
    """Resolves torch's allowed globals to models and unknown globals to inert, recorded stand-ins."""

    allowed: ClassVar[dict[str, Any]] = {**torch_models.MODELS, **ALLOWLIST}

    def __init__(self, file: Any, found: Preflight, storages: _Storages) -> None:
        super().__init__(file)
        self.found, self.storages = found, storages

    def find_class(self, module: str, name: str) -> Any:
        spelled = f"{module}.{name}"  # as the pickle spells it: torch looks some Python 2 names up unmapped
        full = py3_name(spelled)
        if full in self.allowed:
            return self.allowed[full]
        if spelled not in self.found.unknown:
            self.found.unknown.append(spelled)
        return torch_models.stand_in(full)

    def persistent_load(self, pid: Any) -> Any:
        return self.storages.load(pid)


class _Storages:
    """The storages a file's persistent ids name, sized and charged once each, never allocated."""

    def __init__(self, file: Path, sizes: dict[str, int] | None) -> None:
        self.file, self.sizes = file, sizes  # sizes: zip record sizes by key; None for legacy files
        self.seen: dict[str, int] = {}

    def load(self, pid: Any) -> torch_models.DryStorage:
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and _ascii(pid[0]) == "storage"):
            if isinstance(pid, tuple) and pid and _ascii(pid[0]) == "module":
                raise UnsafeCheckpointError(f"{self.file} holds a whole pickled nn.Module (torch.save(model)); "
                                            "savegame imports state dicts only: re-save model.state_dict()")
            raise CorruptCheckpointError(f"{self.file}: unexpected persistent id {pid!r:.100}")
        storage_type, key, _location, numel = pid[1:5]
        itemsize = torch_models.storage_itemsize(storage_type)
        if type(numel) is not int or numel < 0 or not isinstance(key, (str, int)):
            raise CorruptCheckpointError(f"{self.file}: a storage record has a malformed size or key")
        nbytes, key = numel * itemsize, str(key)
        if key not in self.seen:
            self._check_size(key, nbytes)
            budget.spend(nbytes, f"storage {key}")
            self.seen[key] = nbytes
        view = pid[5] if len(pid) == 6 else None
        if view is not None:  # legacy views: (view key, offset, size) in elements of the root storage
            if not (isinstance(view, tuple) and len(view) == 3 and all(type(v) is int and v >= 0 for v in view[1:])
                    and view[1] + view[2] <= numel):
                raise CorruptCheckpointError(f"{self.file}: a storage view lies outside its storage")
            return torch_models.DryStorage(view[2] * itemsize, itemsize)
        return torch_models.DryStorage(nbytes, itemsize)

    def _check_size(self, key: str, nbytes: int) -> None:
        if self.sizes is None:
            return
        held = self.sizes.get(key)
        if held is None:
            raise CorruptCheckpointError(f"{self.file}: the pickle names storage {key}, which the archive lacks")
        if held != nbytes:
            raise CorruptCheckpointError(f"{self.file}: storage {key} holds {held} bytes but the pickle says "
                                         f"{nbytes}; the file is damaged or forged")


def _ascii(value: Any) -> Any:
    return value.decode("ascii", "replace") if isinstance(value, bytes) else value


def preflight(file: Path) -> Preflight:
    """Dry-run ``file``'s pickle(s) under the active budget; raise before anything big is allocated."""
    if zipfile.is_zipfile(file):
        return _zip(file)
    if tarfile.is_tarfile(file):
        raise CorruptCheckpointError(f"{file} is a tar archive: the torch < 0.4 checkpoint format, which savegame "
                                     "does not read; re-save it with a current torch where you trust it")
    return _legacy(file)


def _zip(file: Path) -> Preflight:
    try:
        with zipfile.ZipFile(file) as archive:
            infos = archive.infolist()
            pickles = [i for i in infos if i.filename.endswith("data.pkl") and i.filename.count("/") == 1]
            if len(pickles) != 1:
                raise CorruptCheckpointError(f"{file} is a zip archive but not a torch.save file (no single data.pkl)")
            prefix = pickles[0].filename[: -len("data.pkl")]
            sizes = {i.filename[len(prefix) + 5:]: i.file_size for i in infos
                     if i.filename.startswith(prefix + "data/")}
            budget.spend(pickles[0].file_size, "the pickle (data.pkl)")
            data = archive.read(pickles[0])
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, NotImplementedError, zlib.error) as exc:
        raise CorruptCheckpointError(f"{file} is a damaged zip archive: {type(exc).__name__}: {exc!s:.200}") from exc
    found = Preflight()
    _run(io.BytesIO(data), found, _Storages(file, sizes))
    return found


def _legacy(file: Path) -> Preflight:
    found = Preflight(legacy=True)
    storages = _Storages(file, None)
    size = file.stat().st_size
    with file.open("rb") as raw:
        f = _Clamped(raw, size)
        header = [_run(f, found, storages) for _ in range(3)]
        if header[0] != LEGACY_MAGIC or header[1] != _LEGACY_PROTOCOL:
            raise CorruptCheckpointError(f"{file} is not a torch.save file (no torch magic number)")
        _run(f, found, storages)
        keys = _run(f, found, storages)
        data_bytes = size - raw.tell()
    declared = sum(storages.seen.values())
    if not isinstance(keys, list) or declared > data_bytes:
        raise CorruptCheckpointError(f"{file}: its pickle declares {declared} bytes of tensor storage but only "
                                     f"{data_bytes} bytes follow; the file is truncated or forged")
    return found


def _run(f: Any, found: Preflight, storages: _Storages) -> Any:
    try:
        return _DryUnpickler(f, found, storages).load()
    except (UnsafeCheckpointError, CorruptCheckpointError):
        raise
    except Exception as exc:  # damage shows as UnpicklingError, EOFError, ValueError, TypeError, ...
        raise CorruptCheckpointError(f"{storages.file}: the pickle inside cannot be read: "
                                     f"{type(exc).__name__}: {exc!s:.200}") from exc


class _Clamped(io.RawIOBase):
    """A read-only view of a file that never asks the OS for more bytes than the file has left.

    A pickle opcode may declare a length of 2**60; a buffered ``read(2**60)`` could try
    to allocate that much before finding the end of the file.
    """

    def __init__(self, raw: BinaryIO, size: int) -> None:
        super().__init__()
        self.raw, self.size = raw, size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), max(0, self.size - self.raw.tell()))
        data = self.raw.read(want)
        view[: len(data)] = data
        return len(data)

    def read(self, n: int = -1) -> bytes:
        left = max(0, self.size - self.raw.tell())
        return self.raw.read(left if n is None or n < 0 else min(n, left))

    def readline(self, size: int | None = -1) -> bytes:
        return self.raw.readline(min(size, 1 << 16) if size and size > 0 else 1 << 16)

