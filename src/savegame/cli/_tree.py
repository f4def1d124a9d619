"""Walking and comparing loaded state trees (what ``inspect`` and ``diff`` show).

Key paths join mapping keys with "." and sequence indices with "[i]":
``state.optimizer.state.0.exp_avg``, ``rng.cuda[0]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from savegame.cli._output import dtype_name, key_text, nbytes, short, tensor_text

Tensorish = torch.Tensor | np.ndarray
_CHUNK = 1 << 22  # elements compared at a time: bounds the float64 copies diff makes


def is_tensor(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, np.ndarray))


def child(path: str, key: Any) -> str:
    return f"{path}.{key_text(key)}" if path else key_text(key)


def walk_tensors(value: Any, path: str = "") -> Iterator[tuple[str, Tensorish]]:
    """Every tensor or array in ``value`` with its key path, in tree order."""
    if is_tensor(value):
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from walk_tensors(item, child(path, key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from walk_tensors(item, f"{path}[{i}]")


def structural(value: Any) -> bool:
    """True when ``value`` holds a mapping or a tensor somewhere (then it is compared part by part)."""
    if is_tensor(value) or isinstance(value, Mapping):
        return True
    return isinstance(value, (list, tuple)) and any(structural(v) for v in value)


def describe(value: Any) -> str:
    if isinstance(value, Mapping):
        count = sum(1 for _ in walk_tensors(value))
        return f"dict of {len(value)} key(s)" + (f", {count} tensor(s)" if count else "")
    return short(value)


# -- diff ----------------------------------------------------------------------------------

@dataclass
class TensorChange:
    key: str
    a: str  # "float32 [8, 4]"
    b: str
    max_abs: float | None = None  # None when the shapes differ (nothing to compare element-wise)
    max_rel: float | None = None


@dataclass
class Diff:
    changed: list[TensorChange] = field(default_factory=list)
    added: list[tuple[str, str]] = field(default_factory=list)  # (key path, description)
    removed: list[tuple[str, str]] = field(default_factory=list)
    values: list[tuple[str, Any, Any]] = field(default_factory=list)  # (key path, value in A, value in B)
    same_tensors: int = 0
    tick: Callable[[int], None] = lambda nbytes: None  # called after each tensor compared (progress)

    @property
    def same(self) -> bool:
        return not (self.changed or self.added or self.removed or self.values)


def diff_trees(a: Any, b: Any, path: str = "", out: Diff | None = None) -> Diff:
    """Everything that differs between two loaded trees; tensors are compared bit for bit."""
    out = Diff() if out is None else out
    if is_tensor(a) and is_tensor(b):
        change = compare_tensors(path, a, b)
        out.tick(nbytes(a))
        if change is None:
            out.same_tensors += 1
        else:
            out.changed.append(change)
    elif isinstance(a, Mapping) and isinstance(b, Mapping):
        for key, value in a.items():
            if key in b:
                diff_trees(value, b[key], child(path, key), out)
            else:
                out.removed.append((child(path, key), describe(value)))
        out.added += [(child(path, key), describe(value)) for key, value in b.items() if key not in a]
    elif (type(a) is type(b) and isinstance(a, (list, tuple)) and len(a) == len(b)
          and (structural(a) or structural(b))):
        for i, (x, y) in enumerate(zip(a, b)):
            diff_trees(x, y, f"{path}[{i}]", out)
    elif not same_value(a, b):
        out.values.append((path, a, b))
    return out


def same_value(a: Any, b: Any) -> bool:
    """Exact equality of plain values: same types, NaN equal to NaN, containers element by element."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if is_tensor(a) or isinstance(a, Mapping):
        return diff_trees(a, b).same
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):  # == is not a bool (arrays, exotic scalars): compare the text
        return repr(a) == repr(b)


def compare_tensors(key: str, a: Tensorish, b: Tensorish) -> TensorChange | None:
    """None when bit-identical (same dtype, shape and bytes); else how much they differ."""
    ta, tb = _torch(a), _torch(b)
    if ta.dtype == tb.dtype and ta.shape == tb.shape and _bits(ta).equal(_bits(tb)):
        return None
    change = TensorChange(key, tensor_text(a), tensor_text(b))
    if ta.shape == tb.shape and _numeric(ta) and _numeric(tb):
        change.max_abs, change.max_rel = max_differences(ta, tb)
    return change


def _numeric(t: torch.Tensor) -> bool:
    """Whether ``t`` converts to float64 or complex128 (bits and sub-byte dtypes do not: no differences shown)."""
    return t.dtype in _NUMERIC


_NUMERIC = frozenset({
    torch.bool, torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.int8, torch.int16, torch.int32,
    torch.int64, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex32, torch.complex64,
    torch.complex128, torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2, torch.float8_e5m2fnuz,
    torch.float8_e8m0fnu})


def max_differences(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Largest |a-b| and |a-b| / max(|a|, |b|) over the elements (NaN when one side is NaN)."""
    wide = torch.complex128 if a.is_complex() or b.is_complex() else torch.float64
    fa, fb = a.reshape(-1), b.reshape(-1)
    worst_abs = worst_rel = 0.0
    for start in range(0, fa.numel(), _CHUNK):
        x, y = fa[start:start + _CHUNK].to(wide), fb[start:start + _CHUNK].to(wide)
        equal = (x == y) | (torch.isnan(x) & torch.isnan(y))  # inf == inf, NaN == NaN: no difference
        diff = torch.where(equal, 0.0, (x - y).abs())
        scale = torch.maximum(x.abs(), y.abs())
        rel = torch.where(equal | (scale == 0), 0.0, diff / torch.where(scale == 0, 1.0, scale))
        worst_abs, worst_rel = _max(worst_abs, diff), _max(worst_rel, rel)
    return worst_abs, worst_rel


def _max(current: float, values: torch.Tensor) -> float:
    if math.isnan(current) or not values.numel():
        return current
    top = float(values.max())
    return top if math.isnan(top) or top > current else current


def _torch(value: Tensorish) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value).copy())
    return value.detach().cpu()


def _bits(t: torch.Tensor) -> torch.Tensor:
    flat = t.contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.element_size() and flat.numel() else flat.to(torch.uint8)


def tensor_row(key: str, t: Tensorish) -> dict[str, Any]:
    return {"key": key, "dtype": dtype_name(t), "shape": list(t.shape), "bytes": nbytes(t)}
