"""Format v3: tensors stored in chunks by the ranks of a distributed job, and per-rank trees.

A distributed checkpoint is a v2 checkpoint seen from rank 0 (its ``tree`` holds the
shared states, rank 0's per-rank states and rank 0's RNG, so any single-process
reader restores it as it would a v2 one), plus:

* ``world_size`` and ``ranks``: per rank, ``{"rng": ..., "state": {name: ...}}`` of
  the states saved per rank, with tensor references into the same table;
* in the ``tensors`` table, ``key`` (each tensor's name in the job, which is what
  torch.distributed.checkpoint's planners match across world sizes) and
  ``chunks``: for each tensor stored in pieces (a sharded DTensor), its global shape
  and ``[entry, offsets]`` per piece. The pieces tile the tensor exactly: no gap,
  no overlap, every piece inside it and of its dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from savegame.errors import CorruptCheckpointError
from savegame.format import names as n
from savegame.format.codec import stored_dtype

MAX_WORLD = 1 << 20
MAX_CHUNKS = 4096  # per tensor; the pairwise part of the disjointness check is quadratic in it
_LIMIT = 2**63
_BLOCK = 256  # boxes compared with all others at once (a 256 x 4,096 table)


def check(doc: Mapping[str, Any]) -> None:
    """Validate the v3 members of an expanded manifest (see :mod:`savegame.format.manifest`)."""
    world, ranks = doc.get(n.M_WORLD), doc.get(n.M_RANKS)
    if type(world) is not int or not 1 <= world <= MAX_WORLD:
        raise CorruptCheckpointError(f"manifest field {n.M_WORLD!r} is missing or malformed")
    if type(ranks) is not list or len(ranks) != world or not all(_rank_tree(r) for r in ranks):
        raise CorruptCheckpointError(f"manifest field {n.M_RANKS!r} does not hold one state mapping per rank")
    table, entries = doc[n.M_TENSORS], doc[n.M_ENTRIES]
    keys, records = table.get(n.T_KEY), table.get(n.T_CHUNKS)
    if type(keys) is not list or len(keys) != len(table[n.T_ENTRY]) or not all(type(k) is str for k in keys) \
            or len(set(keys)) != len(keys):
        raise CorruptCheckpointError("the tensor table's keys are missing, malformed or repeated")
    if type(records) is not list:
        raise CorruptCheckpointError("the tensor table's chunk records are malformed")
    _check_owners(doc[n.M_TREE], ranks, keys)
    seen: set[int] = set()
    used = 0
    for record in records:
        j = _check_record(record, table, entries)
        if j in seen:
            raise CorruptCheckpointError(f"tensor {j} has two chunk records")
        seen.add(j)
        used += len(record["chunks"])
    # each piece is an entry of its own, as the writer stores them: an entry reused as many pieces
    # would make a tensor of gigabytes from a file of megabytes
    if len({e for record in records for e, _ in record["chunks"]}) != used:
        raise CorruptCheckpointError("an entry is used as more than one chunk")
    if any(v["tensor"] in seen for v in table[n.T_VIEWS]):
        raise CorruptCheckpointError("a tensor stored in chunks is also described as a view")


def _rank_tree(value: Any) -> bool:
    """``{"rng": ..., "state": {...}}``, both always written (a restore merges the rank's RNG into its tree)."""
    return type(value) is dict and set(value) == {n.TREE_RNG, n.TREE_STATE} and type(value[n.TREE_STATE]) is dict


def _check_owners(tree: Any, ranks: list[dict[str, Any]], keys: list[str]) -> None:
    """Every tensor a rank's part of the checkpoint refers to is one that rank reads in a distributed restore
    (:mod:`savegame.distributed.restore`): shared tensors (every rank reads them), and its own, keyed
    ``rank<r>/``: ``rank<r>/rng.*`` for its RNG (read only when the world size is unchanged), the others for
    its per-rank states. A tensor claimed by another rank's key would be left unread: a stand-in in the tree."""
    shared: Any = tree  # a malformed tree is decode_tree's to refuse
    if type(tree) is dict and type(tree.get(n.TREE_STATE)) is dict:  # rank 0's own parts are in ranks[0]
        per_rank = set(ranks[0][n.TREE_STATE]) if ranks else set()
        shared = [v for k, v in tree.items() if k not in (n.TREE_STATE, n.TREE_RNG)]
        shared += [v for k, v in tree[n.TREE_STATE].items() if k not in per_rank]
    parts = [(shared, "", False)]  # (encoded part, its owner's key prefix, whether it is an RNG state)
    for r, own in enumerate(ranks):
        parts += [(own[n.TREE_STATE], f"rank{r}/", False), (own[n.TREE_RNG], f"rank{r}/", True)]
    for part, prefix, is_rng in parts:
        for j in _refs(part):
            key = keys[j] if 0 <= j < len(keys) else ""  # (a number out of range is the decoder's to refuse)
            if key.startswith("rank") and not (prefix and key.startswith(prefix)
                                               and key[len(prefix):].startswith(n.TREE_RNG + ".") == is_rng):
                where = f"rank {prefix[4:-1]}'s {'RNG' if is_rng else 'states'}" if prefix else "the shared states"
                raise CorruptCheckpointError(f"{where} hold tensor {j}, keyed {key!r} as another rank's or part's")


def _refs(tree: Any) -> set[int]:
    """The tensor numbers an encoded tree refers to (``{"$t": i}``, ``{"$nd": i}``), walked without recursion."""
    out, stack = set(), [tree]
    while stack:
        node = stack.pop()
        if type(node) is list:
            stack.extend(node)
        elif type(node) is dict:
            value = node.get("$t", node.get("$nd")) if len(node) == 1 else None
            if type(value) is int:
                out.add(value)
            else:
                stack.extend(node.values())
    return out


def _check_record(record: Any, table: Mapping[str, Any], entries: Mapping[str, Any]) -> int:
    j = record.get("tensor") if type(record) is dict else None
    shape, pieces = (record.get("shape"), record.get("chunks")) if type(record) is dict else (None, None)
    if type(j) is not int or not 0 <= j < len(table[n.T_ENTRY]) or type(shape) is not list \
            or not _dims_ok(shape) or type(pieces) is not list or not 1 <= len(pieces) <= MAX_CHUNKS:
        raise CorruptCheckpointError("malformed chunk record in manifest")
    count = len(entries[n.E_FILE])
    boxes = []
    for piece in pieces:
        if type(piece) is not list or len(piece) != 2 or type(piece[0]) is not int or not 0 <= piece[0] < count \
                or type(piece[1]) is not list or len(piece[1]) != len(shape) or not _dims_ok(piece[1]):
            raise CorruptCheckpointError(f"malformed chunk of tensor {j} in manifest")
        e, offsets = piece
        size = entries[n.E_SHAPE][e]
        if entries[n.E_DTYPE][e] != entries[n.E_DTYPE][table[n.T_ENTRY][j]] or len(size) != len(shape) \
                or any(o + s > d for o, s, d in zip(offsets, size, shape, strict=True)):
            raise CorruptCheckpointError(f"a chunk of tensor {j} lies outside it or has another dtype")
        boxes.append((offsets, size))
    if table[n.T_ENTRY][j] != pieces[0][0]:
        raise CorruptCheckpointError(f"tensor {j}'s entry is not its first chunk")
    itemsize = stored_dtype(entries[n.E_DTYPE][pieces[0][0]]).itemsize
    if math.prod(d or 1 for d in shape) * itemsize >= _LIMIT:  # zero dimensions do not excuse huge others
        raise CorruptCheckpointError(f"tensor {j} has an impossible shape")
    if sum(math.prod(s) for _, s in boxes) != math.prod(shape) or _overlap(boxes):
        raise CorruptCheckpointError(f"the chunks of tensor {j} do not tile it exactly (gap or overlap)")
    return j


def _dims_ok(values: list[Any]) -> bool:
    return all(type(v) is int and 0 <= v < _LIMIT for v in values) and len(values) <= 64


def _overlap(boxes: Sequence[tuple[list[int], list[int]]]) -> bool:
    """Whether two non-empty boxes share an element (boxes with a zero size hold none).

    Boxes whose spans along some dimension are disjoint (a DTensor sharded along it, as
    FSDP does) are told apart by sorting, O(k log k); others pair by pair, vectorised.
    Pure-Python pairs took 19 s for the 4,096 shards of one tensor of a 4,096-rank job.
    """
    full = [b for b in boxes if all(b[1])]
    if len(full) < 2:
        return False
    if not full[0][0]:
        return True  # two pieces of a 0-d tensor: both its element
    # int64 holds every bound: offset + size <= the tensor's dimension < 2**63 (checked first)
    lo = np.array([o for o, _ in full], dtype=np.int64)
    hi = lo + np.array([z for _, z in full], dtype=np.int64)
    for dim in range(lo.shape[1]):
        order = np.argsort(lo[:, dim], kind="stable")
        if bool(np.all(hi[order[:-1], dim] <= lo[order[1:], dim])):
            return False
    dims = sorted(range(lo.shape[1]), key=lambda d: -len(np.unique(lo[:, d])))  # the most telling first
    count, later = len(full), np.arange(len(full))
    for first in range(0, count, _BLOCK):
        rows = later[first:first + _BLOCK]
        d = dims[0]
        near = (lo[rows, d, None] < hi[None, :, d]) & (lo[None, :, d] < hi[rows, d, None]) & (later > rows[:, None])
        a, b = np.nonzero(near)
        a = rows[a]
        for d in dims[1:]:
            keep = (lo[a, d] < hi[b, d]) & (lo[b, d] < hi[a, d])
            a, b = a[keep], b[keep]
        if len(a):
            return True
    return False


def chunked(table: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The chunk records of a tensor table (none before v3)."""
    records = table.get(n.T_CHUNKS)
    return records if isinstance(records, list) else []


def assemble(record: Mapping[str, Any], entries: Sequence[torch.Tensor]) -> torch.Tensor:
    """The whole tensor a chunk record describes, from its entries' tensors (checked by :func:`check`)."""
    first = entries[record["chunks"][0][0]]
    return fill(torch.empty(record["shape"], dtype=first.dtype, device=first.device), record, entries)


def fill(out: torch.Tensor, record: Mapping[str, Any], entries: Sequence[torch.Tensor]) -> torch.Tensor:
    """Copy the pieces of a chunk record from its entries' tensors into ``out``, the whole tensor."""
    for e, offsets in record["chunks"]:
        piece = entries[e]
        target = out
        for dim, (start, length) in enumerate(zip(offsets, piece.shape, strict=True)):
            target = target.narrow(dim, start, length)
        target.copy_(piece)
    return out
