"""``trust=True``: the classes a trusted file names, imported for one load.

Only classes are ever allowed, never functions, builtins or modules: a pickle that
may call ``torch.load`` with ``pickle_module=torch._utils.pickle`` turns
weights-only loading off, and functions like ``eval`` run code directly. Classes
from the :data:`~.allowlist.NEVER_TRUSTED` modules (os, subprocess, builtins,
torch.serialization, ...) are refused too, by the name the pickle uses and by the
module the class really lives in. That is a second line of defence, not a
guarantee: a trusted class's constructor and ``__setstate__`` run while loading,
so trust means you trust whoever made the file.
"""

from __future__ import annotations

import logging
from importlib import import_module
from pathlib import Path
from typing import Any

from savegame.errors import UnsafeCheckpointError
from savegame.migrate.allowlist import never_trusted, py3_name
from savegame.migrate.stand_ins import spellings

log = logging.getLogger("savegame.migrate")


def trusted_globals(file: Path, names: list[str]) -> dict[str, type]:
    """The classes ``names`` (globals the file needs) resolve to, by each spelling; refuses anything else."""
    if not names:
        return {}
    banned = sorted({py3_name(n) for n in names if any(never_trusted(s) for s in spellings(n))})
    if banned:
        raise UnsafeCheckpointError(
            f"{file} needs {', '.join(banned)}: globals that can run arbitrary code are refused even with "
            "trust=True. Do not load this file; if you made it, re-save it without those objects.")
    resolved: dict[str, type] = {}
    for name in names:
        cls = _class(file, py3_name(name))
        resolved.update((spelling, cls) for spelling in spellings(name))
    log.warning("trust=True: allowing the classes %s for this load of %s only (their constructors and "
                "__setstate__ run while loading: trust the file's author)", ", ".join(py3_name(n) for n in names), file)
    return resolved


def _class(file: Path, name: str) -> type:
    obj = resolve_global(name)
    if not isinstance(obj, type):
        raise UnsafeCheckpointError(
            f"{file} needs {name}, a {type(obj).__name__} rather than a class: trust=True allows classes only, "
            "never functions, builtins or modules (calling those is how a pickle runs code). Do not load this file.")
    real = f"{obj.__module__}.{obj.__qualname__}"
    if never_trusted(real) or never_trusted(obj.__module__):
        raise UnsafeCheckpointError(f"{file} needs {name}, which is {real}: refused even with trust=True")
    return obj


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
