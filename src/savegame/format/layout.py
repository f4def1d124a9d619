"""Where each tensor's bytes go, and how tensors are rebuilt from them.

Tensors that share storage (tied weights, views) are found by the address of
their storage. If all of them are the same view, one entry holds it and every
record points to it; otherwise the spanned bytes of the storage are stored
once as a ``uint8`` entry and every tensor becomes a strided view into it, so
sharing survives a round trip. Everything else is one compact entry per tensor.

The plan is kept by column (one list per field) rather than as an object per
tensor: a state of 50,000 small tensors must cost microseconds per tensor.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from savegame.errors import CorruptCheckpointError, UnsupportedValueError
from savegame.format import chunks
from savegame.format import names as n
from savegame.format.codec import dtype_from_name, dtype_name

_ALLOWED_CLASSES = (torch.Tensor, torch.nn.Parameter)


@dataclass
class TensorPlan:
    """Entries (byte ranges to write) and, per tensor of the tree, the entry it is."""

    sources: list[torch.Tensor] = field(default_factory=list)  # per entry: live tensor or uint8 storage span
    dtypes: list[torch.dtype] = field(default_factory=list)
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)  # bytes
    shard: list[int] = field(default_factory=list)  # per entry: which tensor file
    start: list[int] = field(default_factory=list)  # per entry: offset in its file's data section
    files: list[list[int]] = field(default_factory=list)  # per file: its entries in file order
    tensor_entry: list[int] = field(default_factory=list)
    tensor_device: list[str] = field(default_factory=list)
    views: list[dict[str, Any]] = field(default_factory=list)
    apart: set[int] = field(default_factory=set)  # entries laid out in a small file of their own (see plan)

    @property
    def nbytes(self) -> int:
        return sum(self.sizes)

    def file_sizes(self) -> list[int]:
        return [sum(self.sizes[e] for e in entries) for entries in self.files]

    def add(self, source: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> int:
        self.sources.append(source)
        self.dtypes.append(dtype)
        self.shapes.append(shape)
        self.sizes.append(source.nbytes)
        return len(self.sources) - 1

    def table(self) -> dict[str, Any]:
        """The manifest's ``tensors`` table."""
        return {n.T_ENTRY: self.tensor_entry, n.T_DEVICE: self.tensor_device, n.T_VIEWS: self.views}


class Spec:
    """Stands for a tensor (or NumPy array) of this dtype and shape when a checkpoint is checked before
    its data is read."""

    __slots__ = ("dtype", "shape")

    def __init__(self, dtype: torch.dtype, shape: Sequence[int]) -> None:
        self.dtype, self.shape = dtype, tuple(shape)

    def numpy(self) -> Spec:  # where the tree holds a NumPy array ({"$nd": i})
        return self

    def __repr__(self) -> str:
        return f"Spec({self.dtype}, {list(self.shape)})"


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
    elif tensor.is_meta:
        problem = "meta tensors hold no data; materialise the model before saving"
    if problem:
        raise UnsupportedValueError(f"cannot store the tensor at {path or '<root>'!r}: {problem}")


def plan(tensors: Sequence[torch.Tensor], shard_bytes: int, apart: Collection[int] = ()) -> TensorPlan:
    """Decide entries and records for ``tensors`` (indexed as the codec numbered them).

    The entries of the tensors in ``apart`` (the RNG states) go into a last file of their own,
    unless another tensor shares them: a restore checks those bytes before any byte reaches
    the model, and on an object store reading a few KB of a small object is one cheap request,
    where a range of a large one is not.
    """
    out = TensorPlan(tensor_entry=[0] * len(tensors), tensor_device=["cpu"] * len(tensors))
    groups: dict[Any, list[int]] = {}
    for i, t in enumerate(tensors):
        if not t.numel():
            groups[("empty", i)] = [i]  # no storage to share
            continue
        base = t.data_ptr() - t.storage_offset() * t.element_size()
        if t.is_cpu:
            key: Any = base
        else:
            out.tensor_device[i] = str(t.device)
            key = (out.tensor_device[i], base)
        members = groups.get(key)
        if members is None:
            groups[key] = [i]
        else:
            members.append(i)
    sources, dtypes, shapes, sizes, entry_of = out.sources, out.dtypes, out.shapes, out.sizes, out.tensor_entry
    for members in groups.values():
        if len(members) > 1:
            _plan_group(out, [tensors[i] for i in members], members)
            continue
        t = tensors[members[0]]
        if not t.is_contiguous() and _overlaps(t):  # an expand(): store its storage, not every element
            _plan_span(out, [t], members)
            continue
        entry_of[members[0]] = len(sources)
        sources.append(t)
        dtypes.append(t.dtype)
        shapes.append(tuple(t.shape))
        sizes.append(t.nbytes)
    if apart:
        wanted = {entry_of[i] for i in apart} - {entry_of[v["tensor"]] for v in out.views}
        users = Counter(e for e in entry_of if e in wanted)
        out.apart = {e for e in wanted if users[e] == 1}
    _assign_files(out, shard_bytes)
    return out


def _plan_group(out: TensorPlan, group: list[torch.Tensor], members: list[int]) -> None:
    first = group[0]
    sig = (first.dtype, first.storage_offset(), tuple(first.shape), first.stride())
    if all((t.dtype, t.storage_offset(), tuple(t.shape), t.stride()) == sig for t in group):
        entry = out.add(first, first.dtype, tuple(first.shape))
        for i in members:
            out.tensor_entry[i] = entry
        return
    _plan_span(out, group, members)


def _overlaps(t: torch.Tensor) -> bool:
    """Whether some elements of ``t`` share memory (a stride 0 over a dimension longer than 1)."""
    extent = sum((s - 1) * st for s, st in zip(t.shape, t.stride(), strict=True)) + 1
    return extent < t.numel()


def _plan_span(out: TensorPlan, group: list[torch.Tensor], members: list[int]) -> None:
    """Store the bytes of the storage the tensors span once; every tensor becomes a view into it."""
    first = group[0]
    starts, ends = [], []
    for t in group:
        lo = t.storage_offset() * t.element_size()
        extent = sum((s - 1) * st for s, st in zip(t.shape, t.stride(), strict=True)) + 1
        starts.append(lo)
        ends.append(lo + extent * t.element_size())
    base, end = min(starts), max(ends)
    span = torch.empty(0, dtype=torch.uint8, device=first.device)
    span.set_(first.untyped_storage(), base, (end - base,), (1,))
    entry = out.add(span, torch.uint8, (int(end - base),))
    for i, t, lo in zip(members, group, starts, strict=True):
        out.tensor_entry[i] = entry
        out.views.append({"tensor": i, "dtype": dtype_name(t.dtype), "shape": list(t.shape),
                          "stride": list(t.stride()), "offset": lo - base})


def _assign_files(out: TensorPlan, shard_bytes: int, skip: Collection[int] = ()) -> None:
    """Largest element size first keeps every entry aligned; storage spans (uint8) go last, and the plan's
    ``apart`` entries in a last file of their own. Entries in ``skip`` go in no file (their shard is -1)."""
    span_entries = {out.tensor_entry[v["tensor"]] for v in out.views}
    sizes = {d: -d.itemsize for d in set(out.dtypes)}
    rank = [0 if e in span_entries else sizes[d] for e, d in enumerate(out.dtypes)]
    order = sorted(range(len(rank)), key=rank.__getitem__)
    out.shard, out.start = [0] * len(order), [0] * len(order)
    if skip:
        for e in skip:
            out.shard[e] = -1
        order = [e for e in order if out.shard[e] == 0]
    out.files, filled, entry_sizes = ([[]] if order else []), 0, out.sizes
    current = out.files[-1] if order else []
    apart = [e for e in order if e in out.apart] if out.apart else []
    if apart and len(apart) < len(order):
        order = [e for e in order if e not in out.apart] + [-1] + apart  # -1: start the file of its own
    for e in order:
        if e < 0:
            current, filled = [], 0
            out.files.append(current)
            continue
        size = entry_sizes[e]
        if filled and filled + size > shard_bytes:
            current, filled = [], 0
            out.files.append(current)
        out.shard[e], out.start[e] = len(out.files) - 1, filled
        current.append(e)
        filled += size


def leave_out(plan: TensorPlan, entries: Collection[int], shard_bytes: int) -> None:
    """Lay the files of ``plan`` out again without ``entries`` (stored elsewhere: an incremental save)."""
    _assign_files(plan, shard_bytes, entries)


def tensors_from_entries(table: Mapping[str, Any], entries: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The tree's tensors from each entry's tensor (typed as its entry), keeping shared storage.

    A compact record is its entry's tensor itself (records sharing an entry are the
    same tensor); a view record is a strided view into its entry's storage, which
    must start at offset 0 of that storage.
    """
    out = [entries[e] for e in table[n.T_ENTRY]]
    for view in table[n.T_VIEWS]:
        j = view["tensor"]
        out[j] = _view(entries[table[n.T_ENTRY][j]], view)
    for record in chunks.chunked(table):  # v3: a tensor a distributed job stored in pieces, made whole
        out[record["tensor"]] = chunks.assemble(record, entries)
    return out


def _view(base: torch.Tensor, record: Mapping[str, Any]) -> torch.Tensor:
    """The view a record describes; :func:`savegame.format.manifest.loads` checked that it fits its span."""
    dtype = dtype_from_name(record["dtype"])
    if base.storage_offset():
        raise CorruptCheckpointError("a strided view's storage does not start at its span in checkpoint")
    out = torch.empty(0, dtype=dtype, device=base.device)
    return out.set_(base.untyped_storage(), record["offset"] // dtype.itemsize, record["shape"], record["stride"])


def numel(shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count
