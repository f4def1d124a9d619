"""The globals a foreign pickle may name, and the guards that keep NumPy's inert.

Both foreign loaders (``torch.load(weights_only=True)`` in :mod:`.safe_load` and
the restricted plain unpickler in :mod:`.restricted_unpickler`) resolve a pickle's
GLOBALs through :data:`ALLOWLIST` only. Everything else is refused.

NumPy needs care. Allowlisting ``numpy.dtype`` and the dtype classes as-is (what
PyTorch's error message suggests) lets a pickle call ``dtype.__setstate__`` with
forged flags and fields, turning a ``uint32`` dtype into one that "holds objects";
an array built on it would read attacker bytes as object pointers. So the names
below map to guards: ``numpy.dtype`` makes a fresh copy (never the shared
singleton) of a numeric dtype only, arrays are built as :class:`SafeArray` whose
``__setstate__`` rebuilds a clean numeric dtype before numpy sees the data, and
scalars accept clean numeric dtypes only. :func:`plain` turns what was loaded back
into ordinary ``numpy.ndarray`` values and re-checks every dtype.

``argparse.Namespace`` is deliberately absent although constructing one runs no
foreign code: it carries command-line arguments, never training state, so there
is nothing to import from it; leaving it out keeps the list to what resuming needs.
"""

from __future__ import annotations

from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections import OrderedDict
from codecs import encode as _codecs_encode
from typing import Any

import numpy as np
import torch

from savegame.errors import UnsafeCheckpointError

try:  # NumPy 2 moved the pickle helpers to numpy._core; NumPy 1 files name numpy.core.
    from numpy._core import multiarray as _multiarray
except ImportError:  # pragma: no cover - NumPy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]

NUMERIC_KINDS = "biufc"  # bool, signed, unsigned, float, complex
_NUMERIC_CODES = "?bBhHiIlLqQefdgFDG"
DTYPE_CLASSES: tuple[type, ...] = tuple(dict.fromkeys(type(np.dtype(c)) for c in _NUMERIC_CODES))


def clean_dtype(value: Any) -> np.dtype[Any]:
    """A fresh numeric dtype equal to ``value``; UnsafeCheckpointError for anything else."""
    if not isinstance(value, np.dtype):
        raise UnsafeCheckpointError(f"expected a NumPy dtype in the pickle, got {type(value).__name__}")
    if (value.kind not in NUMERIC_KINDS or value.hasobject or value.fields is not None
            or value.subdtype is not None or value.flags != 0):
        raise UnsafeCheckpointError(
            f"refused NumPy dtype {value!r} (kind {value.kind!r}, flags {value.flags}): only plain numeric "
            "dtypes are loaded from foreign pickles")
    return np.dtype(value.str)


def _dtype(obj: Any, align: Any = False, copy: Any = True) -> np.dtype[Any]:
    """Stands for ``numpy.dtype`` in pickles: numeric type codes only, always a private copy.

    The copy matters: the pickle's BUILD step calls ``__setstate__`` on the result,
    which must never reach NumPy's shared ``np.dtype("u4")`` singleton.
    """
    if not isinstance(obj, str):
        raise UnsafeCheckpointError(f"refused numpy.dtype({obj!r}): only type-code strings are loaded")
    try:
        probe = np.dtype(obj)
    except TypeError as exc:
        raise UnsafeCheckpointError(f"refused numpy.dtype({obj!r}): not a NumPy type code") from exc
    clean_dtype(probe)
    return np.dtype(obj, bool(align), True)


class SafeArray(np.ndarray):  # type: ignore[type-arg]
    """What a pickle's ``numpy.ndarray`` becomes while loading: validates its state first."""

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[4], bytes)):
            raise UnsafeCheckpointError("refused a NumPy array whose pickled state is not (version, shape, "
                                        "dtype, fortran, raw bytes): only numeric arrays are loaded")
        version, shape, dtype, fortran, data = state
        super().__setstate__((version, shape, clean_dtype(dtype), bool(fortran), data))


def _reconstruct(cls: Any, shape: Any, dtype: Any) -> SafeArray:
    """Stands for ``numpy.core.multiarray._reconstruct``: an empty SafeArray, filled by BUILD."""
    if cls is not SafeArray:
        raise UnsafeCheckpointError(f"refused numpy _reconstruct of {cls!r}: only numpy.ndarray is loaded")
    result: SafeArray = _multiarray._reconstruct(SafeArray, (0,), b"b")
    return result


def _scalar(dtype: Any, data: Any = None) -> Any:
    """Stands for ``numpy.core.multiarray.scalar``: numeric scalars from their raw bytes."""
    fresh = clean_dtype(dtype)
    if not isinstance(data, bytes) or len(data) != fresh.itemsize:
        raise UnsafeCheckpointError(f"refused a NumPy {fresh} scalar whose data is not {fresh.itemsize} bytes")
    return _multiarray.scalar(fresh, data)


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any = "C", axis_order: Any = None) -> Any:
    """Stands for ``numpy.core.numeric._frombuffer`` (arrays in pickle protocol 5): a numeric copy."""
    fresh = clean_dtype(dtype)
    if not isinstance(buf, (bytes, bytearray)) or order not in ("C", "F") or axis_order is not None:
        raise UnsafeCheckpointError("refused a protocol-5 NumPy array that is not plain in-band C/F data")
    if not (isinstance(shape, tuple) and all(type(d) is int and d >= 0 for d in shape)):
        raise UnsafeCheckpointError(f"refused a NumPy array of shape {shape!r}")
    return np.frombuffer(bytes(buf), dtype=fresh).reshape(shape, order=order).copy(order="K")


def _numpy_entries() -> dict[str, Any]:
    entries: dict[str, Any] = {"numpy.ndarray": SafeArray, "numpy.dtype": _dtype}
    for package in ("numpy.core", "numpy._core"):
        entries[f"{package}.multiarray._reconstruct"] = _reconstruct
        entries[f"{package}.multiarray.scalar"] = _scalar
        entries[f"{package}.numeric._frombuffer"] = _frombuffer
    for cls in DTYPE_CLASSES:  # needed so BUILD may set the (re-checked) state of a dtype
        entries[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return entries


#: Every global a foreign pickle may name, by the dotted name the pickle uses.
#: torch.load(weights_only=True) adds torch's own tensor/storage rebuilders and
#: plain containers (OrderedDict, set, bytes) on top of these.
ALLOWLIST: dict[str, Any] = _numpy_entries()

#: Python builtins and containers for the plain unpickler (torch.load allows them itself).
PLAIN_PYTHON: dict[str, Any] = {
    "collections.OrderedDict": OrderedDict,
    "_codecs.encode": _codecs_encode,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.bytearray": bytearray,
    "builtins.complex": complex,
}

#: Tensor rebuilders for plain pickles of tensors (torch.load allows them itself).
PLAIN_TORCH: dict[str, Any] = {
    "torch._utils._rebuild_tensor": torch._utils._rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
}

#: Modules whose globals are refused even with trust=True: each one is a known way
#: from "call this global" to running arbitrary code or reading arbitrary files.
NEVER_TRUSTED = (
    "builtins", "__builtin__", "os", "posix", "nt", "sys", "subprocess", "importlib", "runpy", "shutil",
    "socket", "pickle", "_pickle", "marshal", "types", "ctypes", "code", "codeop", "pty", "webbrowser",
    "multiprocessing", "asyncio", "pdb", "timeit", "functools", "operator", "io", "_io", "tempfile",
    "zipimport", "site", "signal", "copyreg", "inspect", "pydoc", "threading", "_thread",
    "torch.serialization", "torch.storage", "torch.hub", "torch.jit", "torch.package", "torch._dynamo",
    "torch.utils.cpp_extension", "torch._C", "torch.ops", "numpy.ctypeslib", "numpy.lib.format",
    "antigravity", "this", "idlelib", "turtle", "tkinter",  # importing them alone has effects
)


def py3_name(name: str) -> str:
    """The Python 3 name of a global: protocol-2 pickles spell some the Python 2 way.

    ``subprocess.call`` is written ``commands.call``. pickle maps every such name
    back, torch's weights-only unpickler only some, so checks look at both spellings.
    """
    for (module, attr), (module3, attr3) in NAME_MAPPING.items():
        if name == f"{module}.{attr}":
            return f"{module3}.{attr3}"
    prefixes = [m for m in IMPORT_MAPPING if name.startswith(m + ".")]
    if prefixes:
        longest = max(prefixes, key=len)
        return IMPORT_MAPPING[longest] + name[len(longest):]
    return name


def never_trusted(name: str) -> bool:
    """Whether the dotted global ``name`` lives in (a submodule of) a NEVER_TRUSTED module."""
    return any(name == m or name.startswith(m + ".") for m in NEVER_TRUSTED)


MAX_DEPTH = 100


def plain(value: Any, depth: int = 0) -> Any:
    """``value`` with every SafeArray turned into a plain ndarray and every dtype re-checked.

    Containers are rebuilt only where something inside changed, so tensors and large
    dicts pass through untouched.
    """
    if depth > MAX_DEPTH:  # the unpicklers are iterative; walking deeper would exhaust Python's stack
        raise UnsafeCheckpointError(f"refused a pickle nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, SafeArray):
        clean_dtype(value.dtype)
        return np.array(value, dtype=value.dtype, copy=True, subok=False)
    if isinstance(value, np.dtype):
        return clean_dtype(value)
    if isinstance(value, np.generic):
        clean_dtype(value.dtype)
        return value
    if isinstance(value, dict):
        items = [(plain(k, depth + 1), plain(v, depth + 1)) for k, v in value.items()]
        if all(a is k and b is v for (a, b), (k, v) in zip(items, value.items())):
            return value
        rebuilt = type(value)() if type(value) in (dict, OrderedDict) else {}
        rebuilt.update(items)
        return rebuilt
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [plain(v, depth + 1) for v in value]
        if all(a is b for a, b in zip(items, value)):
            return value
        return type(value)(items) if type(value) in (list, tuple, set, frozenset) else list(items)
    return value
