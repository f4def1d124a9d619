"""Exact JSON encoding of a state tree's non-tensor values.

Plain JSON loses types: tuples become lists, int dict keys become strings,
inf/nan are not JSON at all. This codec keeps every value exactly by tagging
what JSON cannot say with a one-key object whose key starts with ``$``.
Tensors and NumPy arrays are not inlined: the caller's sink stores them and
returns an index, which the tree keeps as ``{"$t": i}`` / ``{"$nd": i}``.

Decoding validates everything: a malformed tree raises
:class:`~savegame.errors.CorruptCheckpointError`, never another exception.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from savegame.errors import CorruptCheckpointError, UnsupportedValueError

TensorSink = Callable[[torch.Tensor, str], int]
MAX_DEPTH = 200
MAX_ENCODE_DEPTH = MAX_DEPTH - 20
"""Deepest nesting encode() accepts; the margin covers the levels the checkpoint's tree adds above a state."""

BIG_INT_BITS = 8192
"""Ints of more bits than this are written as ``{"$int": "<hex>"}``: JSON as text would pass Python's
limit on int/str conversion (4,300 digits), and hex text has no such limit."""

_FLOAT_SPECIAL = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_TAGS = frozenset(
    {"$t", "$nd", "$tuple", "$dict", "$float", "$bytes", "$set", "$frozenset",
     "$dtype", "$device", "$size", "$np", "$complex", "$int"}
)
_QUANTIZED = frozenset({torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4})
NUMPY_DTYPES = frozenset({torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16,
                          torch.uint32, torch.uint64, torch.float16, torch.float32, torch.float64, torch.complex64,
                          torch.complex128})
"""The torch dtypes of NumPy arrays ({"$nd": i}): those ``torch.from_numpy`` makes, and ``.numpy()`` undoes."""


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: object) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise CorruptCheckpointError(f"unknown torch dtype {brief(name)} in checkpoint")
    return dtype


def stored_dtype(name: object) -> torch.dtype:
    """The dtype of stored tensor data: any torch dtype but the quantized ones, which savegame never writes."""
    dtype = dtype_from_name(name)
    if dtype in _QUANTIZED:
        raise CorruptCheckpointError(f"tensor data of quantized dtype {name!r} in checkpoint (never written)")
    return dtype


def encode(value: Any, sink: TensorSink, path: str = "", depth: int = 0) -> Any:
    """Return a JSON-able form of ``value``; tensors and arrays go to ``sink``.

    Raises UnsupportedValueError naming the key path of the first value that
    cannot be stored exactly. Subclasses of dict, str, int and float (an
    OrderedDict, a str enum...) are stored as their base type, with the same
    items in the same order; subclasses of tuple and list (namedtuples) are
    refused, since their fields would silently become positions. Nesting deeper
    than :data:`MAX_ENCODE_DEPTH` (a value that contains itself, say) is refused
    too: the decoder would refuse to read it back.
    """
    if depth > MAX_ENCODE_DEPTH:
        _too_deep(path)
    cls = type(value)  # exact types first: this runs once per value of the state
    if cls is dict:
        return _encode_dict(value, sink, path, depth + 1)
    if cls is torch.Tensor or cls is torch.nn.Parameter:
        return {"$t": sink(value, path)}
    if cls is str or cls is bool or value is None:
        return value
    if cls is int:
        return value if value.bit_length() <= BIG_INT_BITS else _encode_big_int(value)
    if cls is float:
        return value if math.isfinite(value) else _encode_float(value)
    if cls is list:
        return [encode(v, sink, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
    if cls is tuple:
        return {"$tuple": [encode(v, sink, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]}
    return _encode_other(value, sink, path, depth + 1)


def _too_deep(path: str) -> None:
    where = path if len(path) <= 160 else f"{path[:80]}...{path[-60:]}"
    raise UnsupportedValueError(
        f"cannot store the value at {where!r}: it is nested more than {MAX_ENCODE_DEPTH} levels deep "
        "(does a container hold itself?). Flatten it, or break the cycle, in state_dict()."
    )


def _encode_other(value: Any, sink: TensorSink, path: str, depth: int) -> Any:
    if isinstance(value, np.generic):
        return _encode_numpy_scalar(value, path)
    if isinstance(value, (bool, str)):
        return str(value) if isinstance(value, str) else value
    if isinstance(value, int):
        return encode(int(value), sink, path, depth)
    if isinstance(value, float):
        return _encode_float(float(value))
    if isinstance(value, torch.Tensor):
        return {"$t": sink(value, path)}
    if isinstance(value, np.ndarray):
        return {"$nd": sink(_array_as_tensor(value, path), path)}
    if isinstance(value, torch.Size):
        return {"$size": [int(v) for v in value]}
    if isinstance(value, (tuple, list)):
        raise UnsupportedValueError(
            f"cannot store the value at {path or '<root>'!r}: {type(value).__qualname__} is a subclass of "
            f"{'tuple' if isinstance(value, tuple) else 'list'} (a namedtuple?) whose type would be lost; "
            "convert it in state_dict() to a plain tuple, list or dict"
        )
    if isinstance(value, dict):
        return _encode_dict(value, sink, path, depth)
    return _encode_scalar_object(value, sink, path, depth)


def _encode_scalar_object(value: Any, sink: TensorSink, path: str, depth: int) -> Any:
    if isinstance(value, (set, frozenset)):
        tag = "$set" if isinstance(value, set) else "$frozenset"
        items = [encode(v, sink, f"{path}{{}}", depth) for v in value]
        return {tag: sorted(items, key=repr)}
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    if isinstance(value, complex):
        return {"$complex": [_encode_float(value.real), _encode_float(value.imag)]}
    if isinstance(value, torch.dtype):
        return {"$dtype": dtype_name(value)}
    if isinstance(value, torch.device):
        return {"$device": str(value)}
    where = path or "<root>"
    raise UnsupportedValueError(
        f"cannot store the value at {where!r}: type {type(value).__module__}.{type(value).__qualname__} "
        "has no exact, code-free encoding. Convert it in state_dict() to plain values "
        "(None, bool, int, float, str, bytes, tuple, list, dict, set, tensors, NumPy arrays)."
    )


def brief(value: Any) -> str:
    """``repr(value)`` cut to 60 characters, for messages (an int past the str limit has no repr)."""
    try:
        text = repr(value)
    except ValueError:
        return f"<{type(value).__name__} too large to show>"
    return text if len(text) <= 60 else text[:57] + "..."


def _encode_big_int(value: int) -> Any:
    return {"$int": ("-" if value < 0 else "") + format(abs(value), "x")}


def _encode_float(value: float) -> Any:
    if math.isfinite(value):  # finite floats are plain JSON
        return value
    return {"$float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}


def _encode_dict(value: dict[Any, Any], sink: TensorSink, path: str, depth: int) -> Any:
    plain = all(isinstance(k, str) and not k.startswith("$") for k in value)
    if plain:
        return {k: encode(v, sink, f"{path}.{k}" if path else k, depth) for k, v in value.items()}
    pairs = []
    for k, v in value.items():
        sub = f"{path}[{brief(k)}]"
        pairs.append([encode(k, sink, sub, depth), encode(v, sink, sub, depth)])
    return {"$dict": pairs}


def _encode_numpy_scalar(value: np.generic, path: str) -> Any:
    item = value.item()
    kind, size = value.dtype.kind, value.dtype.itemsize
    if not isinstance(item, (bool, int, float, complex)) or kind not in "biufc" \
            or (kind == "f" and size > 8) or (kind == "c" and size > 16):  # long double: .item() would round it
        raise UnsupportedValueError(
            f"cannot store NumPy scalar of dtype {value.dtype} at {path!r} exactly; convert it in state_dict() "
            "(e.g. to float64 or to a str)")
    return {"$np": [value.dtype.str, encode(item, _no_tensors, path)]}


def _no_tensors(tensor: torch.Tensor, path: str) -> int:
    raise UnsupportedValueError(f"unexpected tensor inside a scalar at {path!r}")


def _array_as_tensor(array: np.ndarray, path: str) -> torch.Tensor:
    if array.dtype.kind not in "biufc":
        raise UnsupportedValueError(
            f"cannot store NumPy array of dtype {array.dtype} at {path!r}: only numeric and bool arrays are supported"
        )
    native = array.astype(array.dtype.newbyteorder("="), copy=False)
    try:
        return torch.from_numpy(np.ascontiguousarray(native))
    except TypeError as exc:  # float128, complex256 (long double): torch has no such dtype
        raise UnsupportedValueError(
            f"cannot store NumPy array of dtype {array.dtype} at {path!r}: torch has no such dtype; "
            "convert it in state_dict() (e.g. .astype(np.float64))"
        ) from exc


def tensor_refs(encoded: Mapping[str, Any], count: int) -> dict[str, int]:
    """The plain keys of an encoded mapping whose values are tensors, with their tensor numbers."""
    out = {}
    for key, value in encoded.items():
        if type(value) is dict and len(value) == 1:
            index = value.get("$t")
            if type(index) is int and 0 <= index < count:
                out[key] = index
    return out


def decode(obj: Any, tensors: Sequence[Any], depth: int = 0, *, arrays: Sequence[Any] | None = None) -> Any:
    """Invert :func:`encode`; ``tensors[i]`` replaces ``{"$t": i}`` (tensors, or stand-ins with a
    ``dtype`` and a ``numpy()`` method, such as :class:`savegame.format.layout.Spec`).

    ``{"$nd": i}`` becomes ``arrays[i].numpy()`` (``arrays`` defaults to ``tensors``;
    pass CPU tensors there when ``tensors`` were mapped to another device).
    """
    return _decode(obj, tensors, tensors if arrays is None else arrays, depth)


def _decode(obj: Any, tensors: Sequence[torch.Tensor], arrays: Sequence[torch.Tensor], depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise CorruptCheckpointError(f"value tree nested deeper than {MAX_DEPTH} levels")
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, list):
        return [_decode(v, tensors, arrays, depth + 1) for v in obj]
    if not isinstance(obj, dict):
        raise CorruptCheckpointError(f"unexpected JSON value of type {type(obj).__name__} in value tree")
    if len(obj) == 1:
        (key,) = obj
        if key == "$t":  # the most common node of a state tree, decoded inline
            index = obj[key]
            if type(index) is int and 0 <= index < len(tensors):
                return tensors[index]
        if key in _TAGS:
            return _decode_tagged(key, obj[key], tensors, arrays, depth + 1)
    if any(k.startswith("$") for k in obj):
        raise CorruptCheckpointError(f"unknown tag in value tree: {sorted(obj)[:3]}")
    return {k: _decode(v, tensors, arrays, depth + 1) for k, v in obj.items()}


def _decode_tagged(tag: str, body: Any, tensors: Sequence[torch.Tensor], arrays: Sequence[torch.Tensor],
                   depth: int) -> Any:
    if tag in ("$t", "$nd"):
        index = _expect(body, int, tag)
        if isinstance(body, bool) or not 0 <= index < len(tensors):
            raise CorruptCheckpointError(f"tensor reference {brief(body)} out of range (have {len(tensors)})")
        if tag == "$t":
            return tensors[index]
        if arrays[index].dtype not in NUMPY_DTYPES:
            raise CorruptCheckpointError(f"NumPy array {index} has dtype {arrays[index].dtype}, which NumPy lacks")
        item = arrays[index]  # a model's own parameter when the array shared its bytes: detached, not copied
        return item.detach().numpy() if isinstance(item, torch.Tensor) else item.numpy()
    if tag == "$tuple":
        return tuple(_decode(v, tensors, arrays, depth) for v in _expect(body, list, tag))
    if tag == "$dict":
        return _decode_pairs(_expect(body, list, tag), tensors, arrays, depth)
    if tag in ("$set", "$frozenset"):
        items = [_decode(v, tensors, arrays, depth) for v in _expect(body, list, tag)]
        try:
            return set(items) if tag == "$set" else frozenset(items)
        except TypeError as exc:
            raise CorruptCheckpointError(f"unhashable item in {tag}") from exc
    return _decode_scalar(tag, body)


def _decode_pairs(pairs: list[Any], tensors: Sequence[torch.Tensor], arrays: Sequence[torch.Tensor],
                  depth: int) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for pair in pairs:
        if not isinstance(pair, list) or len(pair) != 2:
            raise CorruptCheckpointError("malformed $dict entry: expected [key, value]")
        key = _decode(pair[0], tensors, arrays, depth)
        try:
            out[key] = _decode(pair[1], tensors, arrays, depth)
        except TypeError as exc:
            raise CorruptCheckpointError(f"unhashable dict key {brief(key)}") from exc
    return out


def _decode_scalar(tag: str, body: Any) -> Any:
    if tag == "$float":
        if type(body) is not str or body not in _FLOAT_SPECIAL:
            raise CorruptCheckpointError(f"bad $float value {brief(body)}")
        return _FLOAT_SPECIAL[body]
    if tag == "$bytes":
        try:
            return base64.b64decode(_expect(body, str, tag), validate=True)
        except ValueError as exc:
            raise CorruptCheckpointError("bad base64 in $bytes") from exc
    if tag == "$complex":
        parts = _expect(body, list, tag)
        if len(parts) != 2:
            raise CorruptCheckpointError("bad $complex value")
        return complex(_float(parts[0]), _float(parts[1]))
    if tag == "$int":
        return _decode_big_int(body)
    if tag == "$dtype":
        return dtype_from_name(body)
    if tag == "$device":
        try:
            return torch.device(_expect(body, str, tag))
        except (RuntimeError, ValueError, OverflowError) as exc:
            raise CorruptCheckpointError(f"bad device {brief(body)}") from exc
    if tag == "$size":
        dims = _expect(body, list, tag)
        if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**63 for d in dims):
            raise CorruptCheckpointError("bad $size value")
        return torch.Size(dims)
    return _decode_numpy_scalar(_expect(body, list, tag))


def _decode_numpy_scalar(body: list[Any]) -> Any:
    if len(body) != 2 or not isinstance(body[0], str):
        raise CorruptCheckpointError("bad $np value")
    try:
        dtype = np.dtype(body[0])
    except (TypeError, ValueError, SyntaxError) as exc:
        raise CorruptCheckpointError(f"bad NumPy dtype {body[0]!r}") from exc
    if dtype.kind not in "biufc":
        raise CorruptCheckpointError(f"NumPy dtype {body[0]!r} not allowed")
    value = decode(body[1], ())
    if not isinstance(value, (bool, int, float, complex)):
        raise CorruptCheckpointError("bad $np value")
    try:
        return dtype.type(value)
    except (OverflowError, ValueError, TypeError) as exc:
        raise CorruptCheckpointError(f"bad $np value {brief(value)} for {dtype}") from exc


def _decode_big_int(body: Any) -> int:
    text = _expect(body, str, "$int")
    digits = text.removeprefix("-")
    if not (digits.isascii() and digits.isalnum() and digits == digits.lower()):
        raise CorruptCheckpointError(f"bad $int value {text[:40]!r}")
    try:
        return int(text, 16)
    except ValueError as exc:
        raise CorruptCheckpointError(f"bad $int value {text[:40]!r}") from exc


def _float(value: Any) -> float:
    decoded = decode(value, ())
    if isinstance(decoded, bool) or not isinstance(decoded, (int, float)):
        raise CorruptCheckpointError("expected a number")
    try:
        return float(decoded)
    except OverflowError as exc:
        raise CorruptCheckpointError(f"number too large for a float: {brief(decoded)}") from exc


def _expect(body: Any, kind: type, tag: str) -> Any:
    if not isinstance(body, kind):
        raise CorruptCheckpointError(f"malformed {tag}: expected {kind.__name__}, got {type(body).__name__}")
    return body
