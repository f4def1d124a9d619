"""Loading data positions saved by another number of ranks: savegame's world-size-change policy.

Each rank saves its own data-loader state. When a run resumes on ``M`` ranks
from a checkpoint written by ``N``, :func:`resplit` gives the live object of new
rank ``r`` the position that the ``N`` saved states reached together, when that
position is known exactly (docs/data.md, "When the number of ranks changes"):

* old ranks of a ResumableSampler partition one permutation (rank ``k`` takes
  entries ``k, k + N, ...``), so in lockstep at position ``p`` they consumed
  exactly its first ``N * p`` entries. The entries not consumed yet are split
  ``M`` ways for the rest of that epoch (a sampler state with ``split``); the
  next epoch is a fresh ``M``-rank epoch;
* a savegame.DataLoader's position is counted in samples: consumed batches times
  the batch size, in the sampler's order; prefetched batches are not consumed;
* a MultiLoader re-splits each of its loaders.

Anything else (ranks at different positions, iterable datasets, samplers
savegame does not know, batches consumed out of order) raises
IncompatibleStateError naming the cause and the approximate alternative.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler

from savegame.data import compat
from savegame.data.loader import DataLoader
from savegame.data.multi import MultiLoader
from savegame.data.multi import _check_state as _check_multi_state
from savegame.data.sampler import ResumableSampler, SavedSampler, parse_state, per_rank
from savegame.errors import ConfigurationError, IncompatibleStateError

APPROXIMATE = 'restore(..., resplit="approximate")'


def resplit(obj: object, states: Sequence[Mapping[str, Any]], rank: int, world_size: int) -> bool:
    """Load into ``obj`` (this rank's live data object, built for ``rank`` of ``world_size``) the
    position that the old ranks' saved ``states`` (index = old rank, len = old world size) reached.
    Returns False if ``obj`` is not a savegame data object (the caller applies its own policy);
    raises IncompatibleStateError (savegame.errors) with a clear message when the position cannot be
    re-split exactly; returns True after loading."""
    if not isinstance(obj, (ResumableSampler, DataLoader, MultiLoader)):
        return False
    states = _check_arguments(states, rank, world_size)
    if len(states) == world_size:
        obj.load_state_dict(states[rank])
    else:
        obj.load_state_dict(_state_for(obj, states, rank, world_size, type(obj).__name__))
    return True


def split_state(saved: SavedSampler, consumed: int, world_size: int) -> dict[str, Any]:
    """The sampler state that every rank of ``world_size`` loads to continue ``saved``'s epoch.

    ``consumed`` is how many indices of its pass each of the ``saved.world_size``
    ranks consumed (all the same). Nothing consumed: a fresh epoch; otherwise the
    rest ``[start, stop)`` of the permutation, empty when the epoch was over (an
    empty split, not a position at the end: that would read as the start of an
    epoch of no indices).
    """
    start, stop = rest_of_epoch(saved, consumed)
    state: dict[str, Any] = {"seed": saved.seed, "epoch": saved.epoch, "position": 0, "length": saved.length,
                             "world_size": world_size, "shuffle": saved.shuffle, "drop_last": saved.drop_last}
    if start > 0:
        state["split"] = [start, stop]
    return state


def rest_of_epoch(saved: SavedSampler, consumed: int) -> tuple[int, int]:
    """``(start, stop)``: the entries of the epoch's permutation that ``saved.world_size`` ranks had not
    consumed after ``consumed`` indices each of their pass.

    The ranks' pass is ``order[span]`` padded (``drop_last=False``) or truncated
    (``drop_last=True``) to a multiple of the world size; its first ``world_size *
    consumed`` entries were consumed. Padding repeats entries of the pass, so it
    is never part of the rest; a truncated tail never was part of the pass.
    """
    start, stop = saved.span
    real = min(stop - start, saved.pass_length * saved.world_size)
    return start + min(consumed * saved.world_size, real), start + real


def _state_for(obj: object, states: list[Mapping[str, Any]], rank: int, world_size: int, name: str) -> Any:
    if isinstance(obj, ResumableSampler):
        return _sampler_state(obj, states, world_size, name)
    if isinstance(obj, DataLoader):
        return _loader_state(obj, states, rank, world_size, name)
    if isinstance(obj, MultiLoader):
        return _multi_state(obj, states, rank, world_size, name)
    raise _refusal(name, len(states), world_size, f"it is a {type(obj).__name__}, whose position savegame "
                                                  "cannot divide between ranks")


def _sampler_state(sampler: ResumableSampler, states: list[Mapping[str, Any]], world_size: int,
                   name: str) -> dict[str, Any]:
    saved = _lockstep([parse_state(s) for s in states], name, world_size)
    if saved.world_size == sampler.world_size:
        return dict(states[0])      # the sampler does not follow the ranks: every rank continues the same pass
    _check_follows(saved.world_size, sampler.world_size, len(states), world_size, name)
    return split_state(saved, saved.position, world_size)


def _loader_state(loader: DataLoader, states: list[Mapping[str, Any]], rank: int, world_size: int,
                  name: str) -> dict[str, Any]:
    old = len(states)
    for state in states:
        loader._check_state(state)          # each saved state fits this loader, as for a same-size restore
    saved = [compat.parse(s) for s in states]
    if saved[0].kind == "iterable":
        raise _refusal(name, old, world_size, "its dataset is an IterableDataset, whose position is the "
                                              "dataset's own state in each worker slot, which cannot be divided")
    sampler, size, batch_drop = _layout(loader, name, old, world_size)
    positions = {(s.epoch, s.in_progress, s.position) for s in saved}
    if len(positions) > 1:
        where = ", ".join(f"rank {k}: batch {s.position} of epoch {s.epoch}" for k, s in enumerate(saved))
        raise _refusal(name, old, world_size, f"the old ranks stopped at different positions ({where})")
    if any(s.done for s in saved):
        raise _refusal(name, old, world_size, "with in_order=False its batches were consumed out of order, so "
                                              "the consumed samples are not a prefix of the sampler's order")
    samplers = [parse_state(s.sampler) if s.sampler is not None else None for s in saved]
    if None in samplers:
        raise _refusal(name, old, world_size, "its state holds no sampler state")
    dataset = _common([s.dataset for s in saved], "the dataset's own states differ between the old ranks",
                      name, old, world_size)
    first = saved[0]
    kept = [s for s in samplers if s is not None]
    if kept[0].world_size == sampler.world_size:
        _common(list(states), f"its sampler keeps world_size={sampler.world_size} (it does not follow the ranks) "
                              "and the old ranks' states differ", name, old, world_size)
        return dict(states[0])
    _check_follows(kept[0].world_size, sampler.world_size, old, world_size, name)
    seed = _pick([s.seed for s in saved], rank, loader.seed)
    new = {**states[0], "seed": seed, "pending": [], "done": [], "generators": [], "dataset": dataset}
    if not first.in_progress:
        new["sampler"] = split_state(_lockstep(kept, name, world_size), kept[0].position, world_size)
        return new
    consumed = _consumed_samples(first.position, kept, [s.pending for s in saved], size, batch_drop, name,
                                 world_size)
    common = _lockstep([_at(s, consumed) for s in kept], name, world_size)
    new["sampler"] = split_state(common, consumed, world_size)
    rest = parse_state(new["sampler"])
    left = max(rest.pass_length - rest.position, 0)
    whole = per_rank(rest.length, world_size, rest.drop_last)
    new.update(in_progress=True, sampler_ended=False,
               position=_batches(whole, size, batch_drop) - _batches(left, size, batch_drop))
    return new


def _consumed_samples(position: int, samplers: list[SavedSampler], pending: list[dict[int, Any]], size: int,
                      batch_drop: bool, name: str, world_size: int) -> int:
    """Indices of its sampler's pass each old rank consumed: ``position`` batches after the batches that
    the pass's re-split left out (none for a whole epoch); checked against each sampler's own position."""
    old = len(samplers)
    sampler = samplers[0]
    whole = per_rank(sampler.length, sampler.world_size, sampler.drop_last)
    skipped = _batches(whole, size, batch_drop) - _batches(sampler.pass_length, size, batch_drop)
    consumed = min((position - skipped) * size, sampler.pass_length)
    for k, (saved, units) in enumerate(zip(samplers, pending)):
        ahead = sum(len(unit) if isinstance(unit, (list, tuple)) else 1 for unit in units.values())
        drawn = saved.position - ahead
        tail = batch_drop and saved.position == saved.pass_length and 0 <= drawn - consumed < size
        if saved.epoch != sampler.epoch or position < skipped or (drawn != consumed and not tail):
            raise _refusal(name, old, world_size, f"old rank {k}'s sampler (epoch {saved.epoch}, {saved.position} "
                                                  f"indices drawn, {ahead} of them in prefetched batches) does not "
                                                  f"match {position} consumed batches of {size}")
    return consumed


def _multi_state(multi: MultiLoader, states: list[Mapping[str, Any]], rank: int, world_size: int,
                 name: str) -> dict[str, Any]:
    old = len(states)
    names = list(multi.loaders)
    for state in states:
        _check_multi_state(state, names, str(state.get("mode")), str(state.get("exhaustion")))
    chooses = states[0]["mode"] == "weighted"
    unused = () if chooses else ("seed", "rng")        # the other modes draw nothing from the generator
    own = [{k: v for k, v in s.items() if k != "loaders" and k not in unused} for s in states]
    _common(own, "the MultiLoader's own positions or choice generators differ between the old ranks",
            name, old, world_size)
    loaders = {key: _state_for(loader, [s["loaders"][key] for s in states], rank, world_size, f"{name}[{key!r}]")
               for key, loader in multi.loaders.items()}
    source = states[0] if chooses else states[rank % old]
    return {**states[0], "seed": source["seed"], "rng": source["rng"], "loaders": loaders}


def _layout(loader: DataLoader, name: str, old: int, world_size: int) -> tuple[ResumableSampler, int, bool]:
    """The loader's ResumableSampler, the batch size its units have and whether the last short batch is dropped."""
    batches = loader.batch_sampler
    if batches is not None and type(batches) is not BatchSampler:
        raise _refusal(name, old, world_size, f"its batch sampler is a {type(batches).__name__}, whose batches "
                                              "savegame cannot count in samples")
    sampler = batches.sampler if batches is not None else loader.sampler
    if not isinstance(sampler, ResumableSampler):
        raise _refusal(name, old, world_size, f"its sampler is a {type(sampler).__name__}; only a "
                                              "ResumableSampler's order is known across ranks")
    if batches is None:
        return sampler, 1, False
    return sampler, batches.batch_size, batches.drop_last


def _lockstep(saved: list[SavedSampler], name: str, world_size: int) -> SavedSampler:
    """The old ranks' common sampler state; refused when they differ (not in lockstep, or other settings)."""
    if any(s != saved[0] for s in saved):
        where = ", ".join(f"rank {k}: index {s.position} of epoch {s.epoch}" for k, s in enumerate(saved))
        raise _refusal(name, len(saved), world_size, f"the old ranks' samplers are not in lockstep ({where}), or "
                                                     "their seeds or settings differ")
    return saved[0]


def _check_follows(saved_world: int, live_world: int, old: int, world_size: int, name: str) -> None:
    if saved_world != old or live_world != world_size:
        raise _refusal(name, old, world_size, f"its sampler was saved with world_size={saved_world} and is built "
                                              f"with world_size={live_world}; a re-split needs the ranks' numbers")


def _at(saved: SavedSampler, position: int) -> SavedSampler:
    return SavedSampler(saved.seed, saved.epoch, position, saved.length, saved.world_size, saved.shuffle,
                        saved.drop_last, saved.split)


def _batches(samples: int, size: int, drop_last: bool) -> int:
    return samples // size if drop_last else math.ceil(samples / size)


def _pick(values: list[int], rank: int, own: int) -> int:
    """One value for new ``rank``: the old ranks' common one, else old rank ``rank``'s, else ``own``."""
    if all(v == values[0] for v in values):
        return values[0]
    return values[rank] if rank < len(values) else own


def _common(values: list[Any], why: str, name: str, old: int, world_size: int) -> Any:
    if any(not _equal(v, values[0]) for v in values):
        raise _refusal(name, old, world_size, why)
    return values[0]


def _equal(a: Any, b: Any) -> bool:
    """Exact equality of nested state values, tensors and arrays included."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and bool(torch.equal(a, b)))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype \
            and bool(np.array_equal(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and bool(a == b)


def _refusal(name: str, old: int, world_size: int, why: str) -> IncompatibleStateError:
    return IncompatibleStateError(
        f"{name}: the data position saved by {old} ranks cannot be re-split exactly for {world_size} ranks: "
        f"{why}. Resume with {old} ranks, or use {APPROXIMATE}, under which new rank r takes old rank "
        f"r % {old}'s state unchanged (samples may be repeated or skipped in that epoch)."
    )


def _check_arguments(states: Sequence[Mapping[str, Any]], rank: int, world_size: int) -> list[Mapping[str, Any]]:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigurationError(f"world_size must be an int >= 1, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ConfigurationError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
    if isinstance(states, (str, bytes, Mapping)) or not isinstance(states, Sequence) or not states:
        raise ConfigurationError("states must be a non-empty sequence of the old ranks' states, indexed by old rank")
    for k, state in enumerate(states):
        if not isinstance(state, Mapping):
            raise IncompatibleStateError(f"old rank {k}'s data state is a {type(state).__name__}, not a mapping; "
                                         "the checkpoint is damaged or was not written by savegame")
    return list(states)
