"""Reading foreign ``torch.save`` files without ever running code from them.

Every load is ``torch.load(path, map_location="cpu", weights_only=True)`` with
the short allowlist of :mod:`.allowlist` added for that one call; there is no
fallback to full unpickling, whatever the file needs. A file that names any other
global raises :class:`~savegame.errors.UnsafeCheckpointError` naming it.

``trust=True`` is the explicit opt-in for files from an author the user trusts:
the globals the file names are imported and allowed for that one load (a warning
is logged), still under the weights-only unpickler, and never those of the
:data:`~.allowlist.NEVER_TRUSTED` modules (os, subprocess, builtins, ...).
"""

from __future__ import annotations

import logging
import pickle
import re
import threading
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib import import_module
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
from savegame.migrate.allowlist import ALLOWLIST, never_trusted, plain, py3_name

log = logging.getLogger("savegame.migrate")

# torch keeps the extra safe globals in one process-wide set. While savegame reads a
# foreign file that set holds exactly savegame's allowlist (globals other code added
# with add_safe_globals do not count), and one load at a time keeps one thread's
# trusted globals out of another thread's load.
_LOCK = threading.RLock()


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
_GLOBAL_IN_MESSAGE = re.compile(r"GLOBAL (\S+)|unrecognized function (\S+)|but got <class '([^']+)'>")


def safe_torch_load(path: str | Path, *, trust: bool = False) -> Any:
    """Load a ``torch.save`` zip file; tensors land on the CPU; no code from the file runs.

    Raises UnsafeCheckpointError naming each global the file needs beyond the
    allowlist (unless ``trust``), CorruptCheckpointError for truncated, legacy
    (pre-zip) or non-torch files, CheckpointNotFoundError for a missing path and
    ConfigurationError for a directory.
    """
    if not isinstance(trust, bool):
        raise ConfigurationError(f"trust must be True or False, got {trust!r}")
    file = check_torch_file(path)
    extra = _trusted(file) if trust else {}
    return _load(file, {**ALLOWLIST, **extra})


def check_torch_file(path: str | Path) -> Path:
    """``path`` as a Path after checking it is an existing, complete torch zip file."""
    file = Path(path)
    if not file.exists():
        raise CheckpointNotFoundError(f"{file} does not exist")
    if file.is_dir():
        raise ConfigurationError(f"{file} is a directory; safe_torch_load reads one torch.save file "
                                 "(import_checkpoint reads checkpoint directories)")
    try:
        with file.open("rb") as f:
            head = f.read(4)
        is_zip = zipfile.is_zipfile(file)
    except OSError as exc:
        raise StorageError(f"cannot read {file}: {exc}") from exc
    if is_zip:
        return file
    if not head:
        raise CorruptCheckpointError(f"{file} is empty")
    if head.startswith(b"PK"):
        raise CorruptCheckpointError(f"{file} is a truncated or damaged zip file (its central directory is "
                                     "missing); copy it again from its source")
    if head[:1] == b"\x80":
        raise CorruptCheckpointError(
            f"{file} is a plain pickle or a legacy (torch < 1.6) torch.save file, not the zip format "
            "savegame reads safely; re-save it with a current torch where you trust it: "
            "torch.save(obj, new_path)")
    raise CorruptCheckpointError(f"{file} is not a torch.save file (it does not start like a zip archive)")


def refused_globals(file: Path, allowed: Mapping[str, Any] = ALLOWLIST) -> list[str]:
    """The globals ``file``'s pickle names that neither torch nor ``allowed`` permits (read statically)."""
    try:
        with _only({}):
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(file))
    except (ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise CorruptCheckpointError(f"cannot read the pickle inside {file}: {exc}") from exc
    return sorted(set(names) - set(allowed))


def _spellings(name: str) -> set[str]:
    """A global as the pickle spells it and as Python 3 names it (protocol 2 writes some the Python 2 way;
    torch maps back only some of them, pickle all): checks and allowlists must cover both."""
    return {name, py3_name(name)}


def _load(file: Path, allowed: Mapping[str, Any]) -> Any:
    with _only(allowed):
        try:
            loaded = torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise _refusal(file, allowed, exc) from exc
        except UnsafeCheckpointError:
            raise
        except OSError as exc:
            raise StorageError(f"cannot read {file}: {exc}") from exc
        except Exception as exc:  # torch reports damaged archives as RuntimeError, KeyError, EOFError ...
            raise CorruptCheckpointError(f"{file} could not be read as a torch.save file: "
                                         f"{type(exc).__name__}: {exc}") from exc
    return plain(loaded)


def _refusal(file: Path, allowed: Mapping[str, Any], exc: Exception) -> UnsafeCheckpointError:
    names = refused_globals(file, allowed)
    if not names:
        names = [next(g for g in m.groups() if g) for m in _GLOBAL_IN_MESSAGE.finditer(str(exc))]
    if not names:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        return UnsafeCheckpointError(f"{file} was refused by the weights-only unpickler: {first}")
    names = sorted({py3_name(n) for n in names})
    return UnsafeCheckpointError(
        f"{file} needs {', '.join(names)}, which savegame does not load from foreign files: unpickling "
        "it could run code of the file's choosing. If you trust whoever made this file, load it with "
        "trust=True (savegame import --trust); otherwise re-save the file without that object.")


def _trusted(file: Path) -> dict[str, Any]:
    names = refused_globals(file)
    if not names:
        return {}
    banned = sorted({py3_name(n) for n in names if any(never_trusted(s) for s in _spellings(n))})
    if banned:
        raise UnsafeCheckpointError(
            f"{file} needs {', '.join(banned)}: globals that can run arbitrary code are refused even with "
            "trust=True. Do not load this file; if you made it, re-save it without those objects.")
    resolved = {spelling: resolve_global(py3_name(name)) for name in names for spelling in _spellings(name)}
    log.warning("trust=True: allowing %s for this load of %s only (trust the file's author: these "
                "classes/functions are called while loading)", ", ".join(py3_name(n) for n in names), file)
    return resolved


def resolve_global(name: str) -> Any:
    """Import the object a dotted global name refers to (``pkg.mod.Class.Inner``)."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj: Any = import_module(module_name)
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            continue
        return obj
    raise UnsafeCheckpointError(f"trust=True cannot allow {name}: it cannot be imported here; install "
                                "the package that defines it, or re-save the file without that object")


class StandIn:
    """Inert stand-in for a refused global: building, calling or setting its state runs nothing."""

    global_name: ClassVar[str] = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> StandIn:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<not loaded: {self.global_name}>"


def load_with_stand_ins(path: str | Path) -> Any:
    """Load ``path`` with every refused global replaced by an inert :class:`StandIn` subclass.

    For locating and dropping refused objects: nothing the file names beyond the
    allowlist is imported or called. Globals of modules torch blocks outright
    (os, sys, posix, nt) still raise UnsafeCheckpointError.
    """
    file = check_torch_file(path)
    stand_ins = {spelling: type("NotLoaded", (StandIn,), {"global_name": py3_name(name)})
                 for name in refused_globals(file) for spelling in _spellings(name)}
    return _load(file, {**ALLOWLIST, **stand_ins})


def stand_ins_in(value: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """(key path, global name) of every StandIn inside ``value``."""
    if isinstance(value, StandIn):
        yield where or "<top level>", value.global_name
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from stand_ins_in(key, f"{where}[{key!r}] (key)")
            yield from stand_ins_in(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple, set, frozenset)):
        for index, item in enumerate(value):
            yield from stand_ins_in(item, f"{where}[{index}]")
