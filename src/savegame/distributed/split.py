"""What every rank shares and what each rank keeps for itself, encoded with job-wide tensor keys.

A rank's state tree (:func:`savegame.engine.capture.capture`) splits in two:

* shared: the states equal on every rank (a DDP model, its optimizer, a scheduler)
  or sharded across ranks (FSDP2's DTensors), the run bookkeeping and the types.
  Their tensors are keyed by their path in the tree ("state.model.fc.weight"),
  the same on every rank, so torch.distributed.checkpoint writes a replicated
  tensor once and stitches a DTensor's shards together;
* per rank: the RNG states and the objects saved per rank (data loaders,
  samplers, anything named in ``per_rank=``), keyed ``rank<r>/<path>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from savegame.distributed.job import is_dtensor
from savegame.format import codec, layout
from savegame.format import names as n

SHARED_PARTS = (n.TREE_RUN, n.TREE_TYPES)


@dataclass
class Encoded:
    """A JSON tree whose tensor references index ``tensors``, each with its key in the job."""

    tree: Any
    tensors: list[torch.Tensor] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)


def encode(value: Any, prefix: str = "") -> Encoded:
    """Encode ``value``, collecting its tensors (DTensors included) under ``prefix`` + their path."""
    out = Encoded(None)
    seen: set[str] = set()

    def sink(tensor: torch.Tensor, path: str) -> int:
        if not is_dtensor(tensor):
            layout.check_supported(tensor, path)
        key = prefix + (path or "<root>")
        while key in seen:  # {"a.b": t} and {"a": {"b": t}} have one path: never one key
            key += "'"
        seen.add(key)
        out.tensors.append(tensor)
        out.keys.append(key)
        return len(out.tensors) - 1

    out.tree = codec.encode(value, sink)
    return out


def split(tree: Mapping[str, Any], per_rank: frozenset[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(shared, mine) parts of a captured tree; ``per_rank`` names the states saved per rank."""
    states = tree[n.TREE_STATE]
    shared = {n.TREE_STATE: {k: v for k, v in states.items() if k not in per_rank},
              **{part: tree[part] for part in SHARED_PARTS if part in tree}}
    mine = {n.TREE_RNG: tree[n.TREE_RNG], n.TREE_STATE: {k: v for k, v in states.items() if k in per_rank}}
    return shared, mine


def rank_prefix(rank: int) -> str:
    return f"rank{rank}/"


def renumber(tree: Any, base: int) -> Any:
    """``tree`` with every tensor reference moved up by ``base`` (into a table that holds others first)."""
    if isinstance(tree, list):
        return [renumber(v, base) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if len(tree) == 1:
        ((key, value),) = tree.items()
        if key in ("$t", "$nd") and type(value) is int:
            return {key: value + base}
    return {k: renumber(v, base) for k, v in tree.items()}


def merged(shared: Mapping[str, Any], mine: Mapping[str, Any]) -> dict[str, Any]:
    """A whole v2-shaped tree from shared parts and one rank's own: what that rank alone would have saved."""
    return {**shared, n.TREE_STATE: {**shared[n.TREE_STATE], **mine[n.TREE_STATE]}, n.TREE_RNG: mine[n.TREE_RNG]}
