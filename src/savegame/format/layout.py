"""Where each tensor's bytes go, and how tensors are rebuilt from them.

Tensors that share storage (tied weights, views) are found by storage. If all
of them are the same view, one entry holds it and every record points to it;
otherwise the spanned bytes of the storage are stored once as a ``uint8`` entry
and every tensor becomes a strided view into it, so sharing survives a round
trip. Everything else is one compact entry per tensor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from savegame.errors import CorruptCheckpointError, UnsupportedValueError
from savegame.format.codec import dtype_from_name, dtype_name

_ALLOWED_CLASSES = (torch.Tensor, torch.nn.Parameter)


@dataclass
class EntrySpec:
    """A byte range to write. ``source`` is the live tensor (compact) or a uint8 storage span."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    source: torch.Tensor
    shard: int = 0


@dataclass
class TensorPlan:
    records: list[dict[str, Any]]
    specs: list[EntrySpec]


def check_supported(tensor: torch.Tensor, path: str) -> None:
    """Raise UnsupportedValueError for tensor kinds that cannot be stored exactly."""
    problem = None
    if type(tensor) not in _ALLOWED_CLASSES:
        problem = f"tensor subclass {type(tensor).__qualname__} (e.g. DTensor) is not supported yet"
    elif tensor.layout != torch.strided:
        problem = f"{tensor.layout} tensors are not supported; call .to_dense() in state_dict()"
    elif tensor.is_quantized:
        problem = "quantized tensors are not supported; dequantize them or store their int_repr() and scale"
    elif tensor.is_nested:
        problem = "nested tensors are not supported"
    elif tensor.device.type == "meta":
        problem = "meta tensors hold no data; materialise the model before saving"
    if problem:
        raise UnsupportedValueError(f"cannot store the tensor at {path or '<root>'!r}: {problem}")


def plan(tensors: Sequence[torch.Tensor], shard_bytes: int) -> TensorPlan:
    """Decide entries and records for ``tensors`` (indexed as the codec numbered them)."""
    groups: dict[tuple[torch.device, int], list[int]] = {}
    records: list[dict[str, Any]] = [{} for _ in tensors]
    specs: list[EntrySpec] = []
    for i, t in enumerate(tensors):
        storage = t.untyped_storage()
        if storage.nbytes() == 0:
            records[i] = _compact(t, _add(specs, t.dtype, tuple(t.shape), t))
        else:
            groups.setdefault((t.device, storage.data_ptr()), []).append(i)
    for members in groups.values():
        _plan_group([tensors[i] for i in members], members, records, specs)
    return TensorPlan(records, _assign_shards(specs, shard_bytes))


def _plan_group(group: list[torch.Tensor], members: list[int], records: list[dict[str, Any]],
                specs: list[EntrySpec]) -> None:
    first = group[0]
    sig = (first.dtype, first.storage_offset(), tuple(first.shape), first.stride())
    if all((t.dtype, t.storage_offset(), tuple(t.shape), t.stride()) == sig for t in group):
        entry = _add(specs, first.dtype, tuple(first.shape), first)
        for i, t in zip(members, group):
            records[i] = _compact(t, entry)
        return
    starts, ends = [], []
    for t in group:
        lo = t.storage_offset() * t.element_size()
        extent = sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1 if t.numel() else 0
        starts.append(lo)
        ends.append(lo + extent * t.element_size())
    base, end = min(starts), max(ends)
    span = torch.empty(0, dtype=torch.uint8, device=first.device)
    span.set_(first.untyped_storage(), base, (end - base,), (1,))
    entry = _add(specs, torch.uint8, (int(end - base),), span)
    for i, t, lo in zip(members, group, starts):
        records[i] = {**_compact(t, entry), "stride": list(t.stride()), "offset": lo - base}


def _add(specs: list[EntrySpec], dtype: torch.dtype, shape: tuple[int, ...], source: torch.Tensor) -> int:
    nbytes = source.numel() * source.element_size()
    specs.append(EntrySpec(f"e{len(specs)}", dtype, shape, nbytes, source))
    return len(specs) - 1


def _compact(t: torch.Tensor, entry: int) -> dict[str, Any]:
    return {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "device": str(t.device), "entry": entry}


def _assign_shards(specs: list[EntrySpec], shard_bytes: int) -> list[EntrySpec]:
    """Largest element size first keeps every entry aligned; spans (uint8) go last."""
    ordered = sorted(specs, key=lambda s: -s.source.element_size() if s.dtype != torch.uint8 else 0)
    shard, filled = 0, 0
    for spec in ordered:
        if filled and filled + spec.nbytes > shard_bytes:
            shard, filled = shard + 1, 0
        spec.shard = shard
        filled += spec.nbytes
    return ordered


def materialize(records: Sequence[Mapping[str, Any]], entry_data: Sequence[torch.Tensor],
                entry_dtypes: Sequence[torch.dtype], map_location: torch.device | None,
                own: bool = True) -> list[torch.Tensor]:
    """Rebuild tensors from entry bytes (``entry_data[i]`` is entry i as uint8), keeping shared storage.

    With ``own`` every entry gets a storage of its own (a copy when ``entry_data``
    are views into a larger buffer); without it tensors may view ``entry_data``.
    """
    cache: dict[int, torch.Tensor] = {}
    out = []
    for record in records:
        entry = record.get("entry")
        if type(entry) is not int or not 0 <= entry < len(entry_data):
            raise CorruptCheckpointError(f"tensor record points at missing entry {entry!r}")
        if entry not in cache:
            cache[entry] = _entry_tensor(entry_data[entry], entry_dtypes[entry], record, map_location, own)
        base = cache[entry]
        out.append(_view(base, record) if "stride" in record else base)
    return out


def _entry_tensor(data: torch.Tensor, dtype: torch.dtype, record: Mapping[str, Any],
                  map_location: torch.device | None, own: bool) -> torch.Tensor:
    if map_location is not None and map_location.type != "cpu":
        own = False  # .to() below makes the new storage
    if "stride" not in record:
        shape = _dims(record.get("shape"), "shape")
        tensor = _typed(data, dtype, shape, own)
    else:
        tensor = data.clone()  # a fresh, aligned storage that all views share
    return tensor if map_location is None else tensor.to(map_location)


def _typed(data: torch.Tensor, dtype: torch.dtype, shape: list[int], own: bool) -> torch.Tensor:
    count = 1
    for dim in shape:
        count *= dim
    if count * dtype.itemsize != data.numel():
        raise CorruptCheckpointError(f"entry holds {data.numel()} bytes, not a {dtype_name(dtype)} tensor of shape {shape}")
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    if own and data.untyped_storage().nbytes() != data.numel():
        return data.clone().view(dtype).reshape(shape)
    try:
        return data.view(dtype).reshape(shape)
    except RuntimeError:  # misaligned for this dtype: copy into an aligned buffer
        return data.clone().view(dtype).reshape(shape)


def _view(base: torch.Tensor, record: Mapping[str, Any]) -> torch.Tensor:
    dtype = dtype_from_name(record.get("dtype"))
    shape, stride = _dims(record.get("shape"), "shape"), _dims(record.get("stride"), "stride")
    offset, itemsize = record.get("offset"), dtype.itemsize
    if type(offset) is not int or offset < 0 or offset % itemsize or len(stride) != len(shape):
        raise CorruptCheckpointError("bad strided view record in checkpoint")
    extent = sum((s - 1) * st for s, st in zip(shape, stride)) + 1 if all(shape) else 0
    if offset + extent * itemsize > base.numel():
        raise CorruptCheckpointError("strided view reaches past its storage in checkpoint")
    out = torch.empty(0, dtype=dtype, device=base.device)
    return out.set_(base.untyped_storage(), offset // itemsize, shape, stride)


def _dims(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or not all(type(v) is int and v >= 0 for v in value):
        raise CorruptCheckpointError(f"bad tensor {what} {value!r} in checkpoint")
    return value
