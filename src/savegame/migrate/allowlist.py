"""The globals a foreign pickle may name, and the guards that keep them inert and bounded.

Both foreign loaders (``torch.load(weights_only=True)`` in :mod:`.safe_load` and
the restricted plain unpickler in :mod:`.restricted_unpickler`) resolve a pickle's
GLOBALs through :data:`ALLOWLIST` only. Everything else is refused.

NumPy needs care. Allowlisting ``numpy.dtype`` and the dtype classes as-is (what
PyTorch's error message suggests) lets a pickle call ``dtype.__setstate__`` with
forged flags and fields, turning a ``uint32`` dtype into one that "holds objects";
an array built on it would read attacker bytes as object pointers. So the names
below map to guards: ``numpy.dtype`` makes a fresh copy (never the shared
singleton) of a numeric dtype only, arrays are built as :class:`SafeArray` only
through numpy's ``_reconstruct`` + BUILD path, whose ``__setstate__`` rebuilds a
clean numeric dtype before numpy sees the data, and scalars accept clean numeric
dtypes only. :func:`~.plain.plain` turns what was loaded back into ordinary
``numpy.ndarray`` values and re-checks every dtype.

Every guard that allocates charges the load's byte budget (:mod:`.budget`) first,
so ``bytearray(2**30)`` or ``numpy.ndarray((2**30,), "u1")`` in a 30-byte pickle is
refused, not allocated.

``argparse.Namespace`` is deliberately absent although constructing one runs no
foreign code: it carries command-line arguments, never training state, so there
is nothing to import from it; leaving it out keeps the list to what resuming needs.
"""

from __future__ import annotations

from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from codecs import encode as _codecs_encode
from collections import OrderedDict
from typing import Any, Self, cast

import numpy as np

from savegame.errors import UnsafeCheckpointError
from savegame.migrate import budget

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


class SafeArray(np.ndarray):
    """What a pickle's ``numpy.ndarray`` becomes while loading: validates its state first.

    Only numpy's own pickle path builds one: ``_reconstruct`` makes an empty array
    and BUILD calls :meth:`__setstate__` with the raw bytes the file holds. Calling
    ``numpy.ndarray(shape, dtype)`` directly (REDUCE or NEWOBJ) is refused: it
    would allocate whatever shape the file names.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        raise UnsafeCheckpointError("refused a pickle that calls numpy.ndarray(...) directly (it could allocate any "
                                    "amount of memory); NumPy itself pickles arrays through _reconstruct")

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[4], bytes)):
            raise UnsafeCheckpointError("refused a NumPy array whose pickled state is not (version, shape, "
                                        "dtype, fortran, raw bytes): only numeric arrays are loaded")
        version, shape, dtype, fortran, data = state
        budget.spend(len(data), "a NumPy array")
        clean: Any = (version, shape, clean_dtype(dtype), bool(fortran), data)
        super().__setstate__(clean)


def _reconstruct(cls: Any, shape: Any, dtype: Any) -> SafeArray:
    """Stands for ``numpy.core.multiarray._reconstruct``: an empty SafeArray, filled by BUILD."""
    if cls is not SafeArray:
        raise UnsafeCheckpointError(f"refused numpy _reconstruct of {cls!r}: only numpy.ndarray is loaded")
    result: Any = _multiarray._reconstruct(SafeArray, (0,), b"b")
    return cast(SafeArray, result)


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
    budget.spend(len(buf), "a NumPy array")
    return np.frombuffer(bytes(buf), dtype=fresh).reshape(shape, order=order).copy(order="K")


def _bytearray(*args: Any) -> bytearray:
    """Stands for ``builtins.bytearray``: only the forms pickle writes (``bytearray(text, "latin-1")``)."""
    if args and not (isinstance(args[0], (bytes, str)) and all(isinstance(a, str) for a in args[1:3])):
        raise UnsafeCheckpointError(f"refused bytearray({type(args[0]).__name__}, ...) in a pickle: only "
                                    "bytearray(bytes or text, encoding) is loaded (bytearray(N) allocates N bytes)")
    budget.spend(len(args[0]) if args else 0, "a bytearray")
    return bytearray(*args)


def _encode(obj: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    """Stands for ``_codecs.encode`` (how protocol 2 writes bytes): text to bytes, charged to the budget."""
    if not (isinstance(obj, str) and isinstance(encoding, str) and isinstance(errors, str)):
        raise UnsafeCheckpointError("refused _codecs.encode of anything but text in a pickle")
    result = _codecs_encode(obj, encoding, errors)
    if not isinstance(result, bytes):
        raise UnsafeCheckpointError(f"refused _codecs.encode with the {encoding!r} codec: it does not make bytes")
    budget.spend(len(result), "a bytes value")
    return result


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
    "_codecs.encode": _encode,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.bytearray": _bytearray,
    "builtins.complex": complex,
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
