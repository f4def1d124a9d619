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
from dataclasses import dataclass
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
        obj.load_state_dict(_state_for(obj, states, rank, _Move(type(obj).__name__, len(states), world_size)))
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


@dataclass(frozen=True)
class _Move:
    """What moves (``name``) from ``old`` ranks to ``new``: the subject of every refusal."""

    name: str
    old: int
    new: int

    def refuse(self, why: str) -> IncompatibleStateError:
        return IncompatibleStateError(
            f"{self.name}: the data position saved by {self.old} ranks cannot be re-split exactly for {self.new} "
            f"ranks: {why}. Resume with {self.old} ranks, or use {APPROXIMATE}, under which new rank r takes old "
            f"rank r % {self.old}'s state unchanged (samples may be repeated or skipped in that epoch)."
        )

    def member(self, key: str) -> _Move:
        return _Move(f"{self.name}[{key!r}]", self.old, self.new)


def _state_for(obj: object, states: list[Mapping[str, Any]], rank: int, move: _Move) -> Any:
    if isinstance(obj, ResumableSampler):
        return _sampler_state(obj, states, move)
    if isinstance(obj, DataLoader):
        return _loader_state(obj, states, rank, move)
    if isinstance(obj, MultiLoader):
        return _multi_state(obj, states, rank, move)
    raise move.refuse(f"it is a {type(obj).__name__}, whose position savegame cannot divide between ranks")


def _sampler_state(sampler: ResumableSampler, states: list[Mapping[str, Any]], move: _Move) -> dict[str, Any]:
    saved = _lockstep([parse_state(s) for s in states], move)
    if saved.world_size == sampler.world_size:
        return dict(states[0])      # the sampler does not follow the ranks: every rank continues the same pass
    _check_follows(saved.world_size, sampler.world_size, move)
    return split_state(saved, saved.position, move.new)


def _loader_state(loader: DataLoader, states: list[Mapping[str, Any]], rank: int, move: _Move) -> dict[str, Any]:
    saved = _map_states(loader, states, move)
    sampler, size, batch_drop = _layout(loader, move)
    if any(s.sampler is None for s in saved):
        raise move.refuse("its state holds no sampler state")
    samplers = [parse_state(s.sampler) for s in saved]
    if samplers[0].world_size == sampler.world_size:
        return dict(_common(states, f"its sampler keeps world_size={sampler.world_size} (it does not follow the "
                                    "ranks) and the old ranks' states differ", move))
    _check_follows(samplers[0].world_size, sampler.world_size, move)
    dataset = _common([s.dataset for s in saved], "the dataset's own states differ between the old ranks", move)
    seed = _pick([s.seed for s in saved], rank, loader.seed)
    new = {**states[0], "seed": seed, "pending": [], "done": [], "generators": [], "dataset": dataset}
    if not saved[0].in_progress:
        new["sampler"] = split_state(_lockstep(samplers, move), samplers[0].position, move.new)
        return new
    consumed = _consumed_samples(saved, samplers, size, batch_drop, move)
    new["sampler"] = split_state(_lockstep([_at(s, consumed) for s in samplers], move), consumed, move.new)
    rest = parse_state(new["sampler"])
    left = max(rest.pass_length - rest.position, 0)
    whole = per_rank(rest.length, move.new, rest.drop_last)
    # The rest's batches are the epoch's last ones: len(iter(loader)) counts them, as after any resume.
    new.update(in_progress=True, sampler_ended=False,
               position=_batches(whole, size, batch_drop) - _batches(left, size, batch_drop))
    return new


def _map_states(loader: DataLoader, states: list[Mapping[str, Any]], move: _Move) -> list[compat.Saved]:
    """The parsed loader states, if they fit this loader, are map-style and stopped at one position in order."""
    for state in states:
        loader._check_state(state)          # each saved state fits this loader, as for a same-size restore
    saved = [compat.parse(s) for s in states]
    if saved[0].kind == "iterable":
        raise move.refuse("its dataset is an IterableDataset, whose position is the dataset's own state in each "
                          "worker slot, which cannot be divided")
    if len({(s.epoch, s.in_progress, s.position) for s in saved}) > 1:
        where = ", ".join(f"rank {k}: batch {s.position} of epoch {s.epoch}" for k, s in enumerate(saved))
        raise move.refuse(f"the old ranks stopped at different positions ({where})")
    if any(s.done for s in saved):
        raise move.refuse("with in_order=False its batches were consumed out of order, so the consumed samples "
                          "are not a prefix of the sampler's order")
    return saved


def _consumed_samples(saved: list[compat.Saved], samplers: list[SavedSampler], size: int, batch_drop: bool,
                      move: _Move) -> int:
    """Indices of its sampler's pass each old rank consumed: its consumed batches after those that the
    pass's re-split left out (none for a whole epoch); checked against each sampler's own position."""
    position, sampler = saved[0].position, samplers[0]
    whole = per_rank(sampler.length, sampler.world_size, sampler.drop_last)
    skipped = _batches(whole, size, batch_drop) - _batches(sampler.pass_length, size, batch_drop)
    consumed = min((position - skipped) * size, sampler.pass_length)
    for k, (loader, own) in enumerate(zip(saved, samplers)):
        ahead = sum(len(unit) if isinstance(unit, (list, tuple)) else 1 for unit in loader.pending.values())
        drawn = own.position - ahead
        tail = batch_drop and own.position == own.pass_length and 0 <= drawn - consumed < size
        if own.epoch != loader.epoch or position < skipped or (drawn != consumed and not tail):
            raise move.refuse(f"old rank {k}'s sampler (epoch {own.epoch}, {own.position} indices drawn, {ahead} "
                              f"of them in prefetched batches) does not match {position} consumed batches of {size}")
    return consumed


def _multi_state(multi: MultiLoader, states: list[Mapping[str, Any]], rank: int, move: _Move) -> dict[str, Any]:
    names = list(multi.loaders)
    for state in states:
        _check_multi_state(state, names, str(state.get("mode")), str(state.get("exhaustion")))
    chooses = states[0]["mode"] == "weighted"
    unused = () if chooses else ("seed", "rng")        # the other modes draw nothing from the generator
    _common([{k: v for k, v in s.items() if k != "loaders" and k not in unused} for s in states],
            "the MultiLoader's own positions or choice generators differ between the old ranks", move)
    loaders = {key: _state_for(loader, [s["loaders"][key] for s in states], rank, move.member(key))
               for key, loader in multi.loaders.items()}
    source = states[0] if chooses else states[rank % move.old]
    return {**states[0], "seed": source["seed"], "rng": source["rng"], "loaders": loaders}


def _layout(loader: DataLoader, move: _Move) -> tuple[ResumableSampler, int, bool]:
    """The loader's ResumableSampler, the batch size its units have and whether the last short batch is dropped."""
    batches = loader.batch_sampler
    if batches is not None and type(batches) is not BatchSampler:
        raise move.refuse(f"its batch sampler is a {type(batches).__name__}, whose batches savegame cannot "
                          "count in samples")
    sampler = batches.sampler if batches is not None else loader.sampler
    if not isinstance(sampler, ResumableSampler):
        raise move.refuse(f"its sampler is a {type(sampler).__name__}; only a ResumableSampler's order is "
                          "known across ranks")
    if batches is None:
        return sampler, 1, False
    return sampler, batches.batch_size, batches.drop_last


def _lockstep(saved: list[SavedSampler], move: _Move) -> SavedSampler:
    """The old ranks' common sampler state; refused when they differ (not in lockstep, or other settings)."""
    if any(s != saved[0] for s in saved):
        where = ", ".join(f"rank {k}: index {s.position} of epoch {s.epoch}" for k, s in enumerate(saved))
        raise move.refuse(f"the old ranks' samplers are not in lockstep ({where}), or their seeds or settings "
                          "differ")
    return saved[0]


def _check_follows(saved_world: int, live_world: int, move: _Move) -> None:
    if saved_world != move.old or live_world != move.new:
        raise move.refuse(f"its sampler was saved with world_size={saved_world} and is built with "
                          f"world_size={live_world}; a re-split needs them to be the numbers of ranks")


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


def _common(values: Sequence[Any], why: str, move: _Move) -> Any:
    if any(not _equal(v, values[0]) for v in values):
        raise move.refuse(why)
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
