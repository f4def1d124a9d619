"""A restore in a distributed job: every rank loads the same checkpoint, or every rank falls back.

Rank 0 lists the candidates ("latest": newest first) and hands the list to all.
For each candidate every rank checks the manifest, then DCP's load planner reads
(and reshards) the pieces into fresh tensors (DTensors where the live state has
them, so FSDP2 shards load straight into their place); then the tree is decoded
and checked. Only when every rank got that far do the live objects change. A
candidate damaged for any rank is skipped by all of them, with a warning.

Per-rank states (RNG, data loaders, ``per_rank=``) come back to the same rank
when the world size is unchanged. When it changed, RNG streams are not restored
(each rank keeps the generators the script seeded) and data positions are re-split
exactly where savegame's data objects allow it (:mod:`savegame.data.resplit`);
otherwise IncompatibleStateError names ``resplit="approximate"``, under which new
rank r takes old rank r % N's state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

from savegame.distributed import split
from savegame.distributed.dcp_storage import SavegameReader
from savegame.distributed.job import Job, is_dtensor, raise_failed
from savegame.engine import reader, rng
from savegame.errors import CorruptCheckpointError, IncompatibleStateError, RankDamagedError, RankFailedError
from savegame.format import codec, layout
from savegame.format import names as n
from savegame.storage.base import Storage

log = logging.getLogger("savegame.distributed")
RESPLIT = ("exact", "approximate")


@dataclass
class Loaded:
    """A checkpoint read for this rank: its manifest, its meta and this rank's whole tree."""

    doc: dict[str, Any]
    meta: dict[str, Any]
    tree: dict[str, Any]
    others: list[dict[str, Any]] | None  # every old rank's own states, when the world size changed


def step(job: Job, action: Callable[[], Any], what: str) -> tuple[bool, Any]:
    """Run ``action`` on every rank: (True, result) if all succeeded, (False, None) if the checkpoint is
    damaged for some rank (every rank skips it), and every rank raises for any other failure."""
    result, error = None, None
    try:
        result = action()
    except Exception as exc:
        error = exc
    reports = job.exchange(error, None, job.fg)
    if any(r.error is not None and not r.damaged for r in reports):
        raise_failed(reports, error if error is not None and not isinstance(error, CorruptCheckpointError)
                     else None, what)
    damaged = [(rank, r.error) for rank, r in enumerate(reports) if r.error is not None]
    if damaged:
        log.warning("skipping damaged checkpoint (%s): %s", what,
                    "; ".join(f"rank {rank}: {msg}" for rank, msg in damaged))
        return False, None
    return True, result


@dataclass
class Plan:
    """What this rank will read of a checkpoint: destinations by key (empty for a v2 checkpoint)."""

    doc: dict[str, Any]
    meta: dict[str, Any]
    dest: dict[str, torch.Tensor]
    tensors: list[Any]
    wanted: list[int]
    tree: dict[str, Any] | None = None  # already read (a v2 checkpoint)


def plan(job: Job, storage: Storage, name: str, doc: dict[str, Any], objects: Mapping[str, Any], *,
         verify: bool) -> Plan:
    """Check the manifest and make this rank's destinations; local (no collective)."""
    meta = reader.decode_meta(doc)
    if n.M_WORLD not in doc:  # a single process's checkpoint (v1, v2, or v4 without ranks): every rank reads it
        return Plan(doc, meta, {}, [], [], reader.read_tree(storage, name, doc, verify=verify))
    reader.check(doc)
    reader.check_sizes(storage, name, doc)  # before allocating what the manifest declares
    keys, specs = doc[n.M_TENSORS][n.T_KEY], reader.tensor_specs(doc)
    same = doc[n.M_WORLD] == job.world_size
    wanted = [j for j, key in enumerate(keys) if _wanted(key, job.rank, same)]
    likes = _likes(objects, doc, specs)
    return Plan(doc, meta, {keys[j]: _destination(likes.get(j), specs[j]) for j in wanted}, list(specs), wanted)


def load(job: Job, storage: Storage, name: str, planned: Plan, *, verify: bool) -> None:
    """Read the planned pieces through DCP's load planner (collective on ``job.fg``; every rank calls it)."""
    if planned.tree is None and planned.dest is not None:
        _load(planned.dest, SavegameReader(storage, name, planned.doc, verify=verify), job)


def finish(job: Job, planned: Plan) -> Loaded:
    """This rank's whole tree, decoded and checked; local."""
    doc = planned.doc
    if planned.tree is not None:
        return Loaded(doc, planned.meta, planned.tree, None)
    keys, tensors = doc[n.M_TENSORS][n.T_KEY], planned.tensors
    for j in planned.wanted:
        tensors[j] = planned.dest[keys[j]]
    ranks = doc[n.M_RANKS]
    same = doc[n.M_WORLD] == job.world_size
    tree = reader.decode_tree({**doc, n.M_TREE: _own_tree(doc[n.M_TREE], ranks, job.rank if same else None)},
                              tensors)
    rng.check_values(tree.get(n.TREE_RNG))  # bytes torch would reject refuse the checkpoint before any change
    return Loaded(doc, planned.meta, tree, None if same else [codec.decode(r, tensors) for r in ranks])


def _wanted(key: str, rank: int, same_world: bool) -> bool:
    if not key.startswith("rank"):
        return True  # shared
    if same_world:
        return key.startswith(split.rank_prefix(rank))
    return not key.split("/", 1)[-1].startswith(n.TREE_RNG + ".")  # RNG streams stay the job's own


def _own_tree(tree: dict[str, Any], ranks: Sequence[dict[str, Any]], rank: int | None) -> dict[str, Any]:
    """Rank ``rank``'s whole (encoded) tree; with None (world size changed) the shared part without RNG."""
    per_rank = set(ranks[0].get(n.TREE_STATE, {})) if ranks else set()
    shared = {**tree, n.TREE_STATE: {k: v for k, v in tree.get(n.TREE_STATE, {}).items() if k not in per_rank}}
    shared.pop(n.TREE_RNG, None)
    if rank is None:
        return shared
    return split.merged(shared, ranks[rank])


def _load(dest: dict[str, torch.Tensor], storage_reader: SavegameReader, job: Job) -> None:
    try:
        dcp_load(dest, storage_reader=storage_reader, planner=DefaultLoadPlanner(), process_group=job.fg)
    except CheckpointException as exc:  # a BaseException: translated here, never let past
        failures = {r: e[0] if isinstance(e, tuple) else e for r, e in (exc.failures or {}).items()}
        own = failures.get(job.rank)
        if isinstance(own, CorruptCheckpointError):
            raise own from None
        text = "; ".join(f"rank {r}: {type(e).__name__}: {e}" for r, e in sorted(failures.items()))
        if all(isinstance(e, CorruptCheckpointError) for e in failures.values()):
            raise RankDamagedError(f"reading the checkpoint failed: {text}") from None
        raise IncompatibleStateError(f"reading the checkpoint failed: {text}") from None
    except RuntimeError as exc:  # gloo: a rank died or timed out inside DCP's collectives
        raise RankFailedError(f"reading the checkpoint failed: another rank stopped answering ({exc})") from exc


class _Ref(layout.Spec):
    """A tensor stand-in that knows its number in the tree."""

    __slots__ = ("index",)

    def __init__(self, index: int, spec: layout.Spec) -> None:
        super().__init__(spec.dtype, spec.shape)
        self.index = index


def _likes(objects: Mapping[str, Any], doc: Mapping[str, Any], specs: list[layout.Spec]) -> dict[int, torch.Tensor]:
    """Live DTensors to shape each tensor's destination like: the module's own state, and each optimizer
    state tensor like its parameter (an optimizer that has not stepped has no state to copy)."""
    refs = [_Ref(j, s) for j, s in enumerate(specs)]
    states = codec.decode(doc[n.M_TREE], refs).get(n.TREE_STATE, {})
    likes: dict[int, torch.Tensor] = {}
    for name, obj in objects.items():
        saved = states.get(name)
        if isinstance(obj, torch.nn.Module) and isinstance(saved, dict):
            own = obj.state_dict()
            for key, ref in saved.items():
                if isinstance(ref, _Ref) and is_dtensor(own.get(key)) and tuple(own[key].shape) == ref.shape:
                    likes[ref.index] = own[key]
        elif isinstance(obj, torch.optim.Optimizer) and isinstance(saved, dict):
            params = [p for group in obj.param_groups for p in group["params"]]
            for pid, fields in (saved.get("state") or {}).items():
                if not (type(pid) is int and 0 <= pid < len(params) and is_dtensor(params[pid])
                        and isinstance(fields, dict)):
                    continue
                for ref in fields.values():
                    if isinstance(ref, _Ref) and ref.shape == tuple(params[pid].shape):
                        likes[ref.index] = params[pid].detach()
    return likes


def _destination(like: torch.Tensor | None, spec: layout.Spec) -> torch.Tensor:
    if like is not None:
        return torch.empty_like(like, dtype=spec.dtype)
    return torch.empty(spec.shape, dtype=spec.dtype)


def resplit(objects: Mapping[str, Any], others: list[dict[str, Any]], job: Job, mode: str) -> None:
    """Load per-rank states saved by another number of ranks (see the module docstring)."""
    saved_world = len(others)
    log.warning("the checkpoint was written by %d ranks and this job has %d: RNG states are not restored "
                "(each rank keeps its own generators); data positions are re-split", saved_world, job.world_size)
    for name in others[0].get(n.TREE_STATE, {}):
        obj = objects.get(name)
        if obj is None:
            continue
        states = [o[n.TREE_STATE][name] for o in others]
        from savegame.data.resplit import resplit as data_resplit
        try:
            if data_resplit(obj, states, job.rank, job.world_size):
                continue
            reason = f"{type(obj).__name__} has no rule to re-split a per-rank state"
        except IncompatibleStateError as exc:
            if mode != "approximate":
                raise
            reason = str(exc)
        if mode != "approximate":
            raise IncompatibleStateError(
                f"per-rank state {name!r} was saved by {saved_world} ranks and cannot be split among "
                f"{job.world_size}: {reason}. Pass restore(resplit='approximate') to give rank r the state of "
                f"old rank r % {saved_world}, or resume with {saved_world} ranks")
        obj.load_state_dict(states[job.rank % saved_world])
        log.warning("%r: rank %d took old rank %d's state (resplit='approximate')", name, job.rank,
                    job.rank % saved_world)
