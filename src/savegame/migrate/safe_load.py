"""Reading foreign ``torch.save`` files without ever running code from them.

Every load is ``torch.load(file, map_location="cpu", weights_only=True)`` with
the short allowlist of :mod:`.allowlist` added for that one call; there is no
fallback to full unpickling, whatever the file needs. Before torch sees the file,
:mod:`.preflight` dry-runs its pickle under a byte budget, so a small file cannot
make torch's own allowed constructors allocate gigabytes. Both the zip format
(torch >= 1.6) and the legacy format go this way. A file that names any other
global raises :class:`~savegame.errors.UnsafeCheckpointError` naming it.

``trust=True`` is the explicit opt-in for files from an author the user trusts:
the *classes* the file names are imported and allowed for that one load (a
warning is logged), still under the weights-only unpickler; see :mod:`.trust`.
"""

from __future__ import annotations

import io
import pickle
import re
import threading
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
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
from savegame.migrate import budget
from savegame.migrate.allowlist import ALLOWLIST, py3_name
from savegame.migrate.plain import plain
from savegame.migrate.preflight import Preflight, preflight
from savegame.migrate.restricted_unpickler import _named
from savegame.migrate.stand_ins import stand_ins_for
from savegame.migrate.trust import trusted_globals

Progress = Callable[[int], None]  # called with the number of bytes just read

# torch keeps the extra safe globals in one process-wide set. While savegame reads a
# foreign file that set holds exactly savegame's allowlist (globals other code added
# with add_safe_globals do not count), and one load at a time keeps one thread's
# trusted globals out of another thread's load.
_LOCK = threading.RLock()
_GLOBAL_IN_MESSAGE = re.compile(r"GLOBAL (\S+)|unrecognized function (\S+)|but got <class '([^']+)'>")
_UNSUPPORTED_OPCODE = re.compile(r"Unsupported operand (\d+)")
# What torch.save (legacy format, protocol 2) writes first: the pickled magic number 0x1950a86a20f9469cfc6c.
_LEGACY_HEAD = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


@contextmanager
def _only(allowed: Mapping[str, Any]) -> Iterator[None]:
    """Make ``allowed`` (dotted name -> object) torch's whole set of extra safe globals, for the block."""
    with _LOCK:
        saved = torch.serialization.get_safe_globals()
        torch.serialization.clear_safe_globals()
        try:
            torch.serialization.add_safe_globals([(obj, name) for name, obj in allowed.items()])
            yield
        finally:
            torch.serialization.clear_safe_globals()
            torch.serialization.add_safe_globals(saved)


def safe_torch_load(path: str | Path, *, trust: bool = False, max_bytes: int | None = None,
                    progress: Progress | None = None) -> Any:
    """Load a ``torch.save`` file (zip or legacy format); tensors land on the CPU; no code from the file runs.

    Raises UnsafeCheckpointError naming each global the file needs beyond the
    allowlist (unless ``trust``), or when loading would allocate more than
    ``max_bytes`` (default: a small multiple of the file's size, see :mod:`.budget`);
    CorruptCheckpointError for truncated, damaged or non-torch files;
    CheckpointNotFoundError for a missing path and ConfigurationError for a directory.
    ``progress`` is called with byte counts as the file is read.
    """
    if not isinstance(trust, bool):
        raise ConfigurationError(f"trust must be True or False, got {trust!r}")
    budget.check_max_bytes(max_bytes)
    file = check_torch_file(path)
    found = _preflight(file, max_bytes)
    extra = trusted_globals(file, found.unknown) if trust else {}
    return _load(file, found, {**ALLOWLIST, **extra}, max_bytes, progress)


def load_with_stand_ins(path: str | Path, *, max_bytes: int | None = None, progress: Progress | None = None) -> Any:
    """Load ``path`` with every refused global replaced by an inert :class:`~.stand_ins.StandIn` subclass.

    For locating and dropping refused objects: nothing the file names beyond the
    allowlist is imported or called. Globals of modules torch blocks outright
    (os, sys, posix, nt) still raise UnsafeCheckpointError.
    """
    file = check_torch_file(path)
    found = _preflight(file, max_bytes)
    return _load(file, found, {**ALLOWLIST, **stand_ins_for(found.unknown)}, max_bytes, progress)


def check_torch_file(path: str | Path) -> Path:
    """``path`` as a Path after checking it is an existing torch.save file (zip, or legacy pickle format)."""
    file = Path(path)
    if not file.exists():
        raise CheckpointNotFoundError(f"{file} does not exist")
    if file.is_dir():
        raise ConfigurationError(f"{file} is a directory; safe_torch_load reads one torch.save file "
                                 "(import_checkpoint reads checkpoint directories)")
    try:
        with file.open("rb") as f:
            head = f.read(len(_LEGACY_HEAD))
        is_zip = zipfile.is_zipfile(file)
    except OSError as exc:
        raise StorageError(f"cannot read {file}: {exc}") from exc
    if is_zip or head == _LEGACY_HEAD:
        return file
    if not head:
        raise CorruptCheckpointError(f"{file} is empty")
    if head.startswith(b"PK"):
        raise CorruptCheckpointError(f"{file} is a truncated or damaged zip file (its central directory is "
                                     "missing); copy it again from its source")
    if head[:1] == b"\x80":
        raise CorruptCheckpointError(f"{file} is a plain pickle, not a torch.save file; read it with "
                                     "restricted_unpickle")
    raise CorruptCheckpointError(f"{file} is not a torch.save file (it starts like neither a zip archive nor a "
                                 "legacy torch.save pickle)")


def _preflight(file: Path, max_bytes: int | None) -> Preflight:
    try:
        size = file.stat().st_size
        with budget.charged_to(budget.Budget(str(file), size, max_bytes)):
            return preflight(file)
    except UnsafeCheckpointError as exc:
        raise UnsafeCheckpointError(_named(file, exc)) from exc
    except CorruptCheckpointError as exc:
        raise CorruptCheckpointError(_named(file, exc)) from exc
    except OSError as exc:
        raise StorageError(f"cannot read {file}: {exc}") from exc


def _load(file: Path, found: Preflight, allowed: Mapping[str, Any], max_bytes: int | None,
          progress: Progress | None) -> Any:
    size = file.stat().st_size
    with _only(allowed), budget.charged_to(budget.Budget(str(file), size, max_bytes)):
        try:
            with file.open("rb") as raw, warnings.catch_warnings():
                # torch warns of protocols other than 2 before failing on them; our error says more
                warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
                source: Any = _Counting(raw, progress) if progress is not None else file
                loaded = torch.load(source, map_location="cpu", weights_only=True)
            return plain(loaded)
        except pickle.UnpicklingError as exc:
            raise _refusal(file, found, exc) from exc
        except (UnsafeCheckpointError, CorruptCheckpointError):
            raise
        except OSError as exc:
            raise StorageError(f"cannot read {file}: {exc}") from exc
        except Exception as exc:  # torch reports damaged archives as RuntimeError, KeyError, EOFError ...
            raise CorruptCheckpointError(f"{file} could not be read as a torch.save file: "
                                         f"{type(exc).__name__}: {exc!s:.300}") from exc


def _refusal(file: Path, found: Preflight, exc: Exception) -> SavegameLoadError:
    opcode = _UNSUPPORTED_OPCODE.search(str(exc))
    if opcode:
        return CorruptCheckpointError(
            f"{file} uses pickle opcode {opcode.group(1)}, which torch's safe (weights-only) loader does not read: "
            "it reads pickle protocol 2 only, what torch.save writes by default, and this file was saved with "
            "another protocol (torch.save(..., pickle_protocol=N)). savegame will not unpickle it any other way. "
            "If you trust the file, load it where you trust it and re-save it with torch.save(obj, path) (protocol "
            "2), then migrate that copy.")
    names = list(found.unknown) or [next(g for g in m.groups() if g) for m in _GLOBAL_IN_MESSAGE.finditer(str(exc))]
    if not names:
        lines = str(exc).strip().splitlines()
        first = lines[-1] if lines else type(exc).__name__
        return UnsafeCheckpointError(f"{file} was refused by the weights-only unpickler: {first:.300}")
    names = sorted({py3_name(n) for n in names})
    return UnsafeCheckpointError(
        f"{file} needs {', '.join(names)}, which savegame does not load from foreign files: unpickling "
        "it could run code of the file's choosing. If you trust whoever made this file, allow the classes it "
        "names with trust=True (savegame migrate --trust); otherwise re-save the file without that object.")


SavegameLoadError = CorruptCheckpointError | UnsafeCheckpointError


class _Counting(io.RawIOBase):
    """The file torch.load reads, reporting each read's size to ``progress``."""

    def __init__(self, raw: io.BufferedReader, progress: Progress) -> None:
        super().__init__()
        self.raw, self.progress = raw, progress

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def readinto(self, buffer: Any) -> int:
        count = self.raw.readinto(buffer)
        self.progress(count or 0)
        return count or 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.progress(len(data))
        return data

    def readline(self, limit: int | None = -1) -> bytes:
        data = self.raw.readline(-1 if limit is None else limit)
        self.progress(len(data))
        return data
