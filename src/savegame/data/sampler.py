"""ResumableSampler: a seeded, distributed-aware index sampler that remembers its position."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sized
from dataclasses import dataclass
from typing import Any

import torch

from savegame.data.seeding import derive
from savegame.errors import ConfigurationError, IncompatibleStateError

log = logging.getLogger("savegame.data")

_KEYS = ("seed", "epoch", "position", "length", "world_size", "shuffle", "drop_last")
Split = tuple[int, int]


@dataclass(frozen=True)
class SavedSampler:
    """A parsed ResumableSampler state.

    ``split`` is None for an ordinary epoch. A sampler restored by
    :func:`savegame.data.resplit.resplit` holds ``(start, stop)``: the rest of
    epoch ``epoch`` is ``order[start:stop]`` of that epoch's permutation, split
    ``world_size`` ways like a whole epoch (padded or truncated by ``drop_last``),
    and ``position`` counts this rank's indices of that rest.
    """

    seed: int
    epoch: int
    position: int
    length: int
    world_size: int
    shuffle: bool
    drop_last: bool
    split: Split | None = None

    @property
    def span(self) -> Split:
        """The part of the epoch's permutation this epoch's pass is split from."""
        return self.split if self.split is not None else (0, self.length)

    @property
    def pass_length(self) -> int:
        """The number of indices each rank yields in this pass (the rest of the epoch, for a split)."""
        start, stop = self.span
        return per_rank(stop - start, self.world_size, self.drop_last)


class ResumableSampler(torch.utils.data.Sampler[int]):
    """Yields this rank's indices for one epoch, shuffled (or in order), and can resume mid-epoch.

    Guarantees:

    * The order of epoch ``e`` is a pure function of ``(seed, e, length,
      world_size, rank, shuffle, drop_last)``; no global generator is read or
      changed, so two processes built alike yield the same indices.
    * ``rank`` and ``world_size`` default to ``torch.distributed``'s when a process
      group is initialised (like ``DistributedSampler``), else to 0 and 1.
    * With ``world_size`` ranks, every rank yields ``len(self)`` indices and the
      ranks partition one permutation like ``DistributedSampler``: disjoint when
      ``drop_last=True`` (the last ``length % world_size`` indices of the
      permutation are left out) or the length divides evenly; otherwise the first
      indices of the permutation are repeated to pad every rank to the same length.
    * After ``load_state_dict(s)``, the next ``iter()`` yields exactly the indices
      the saved sampler had not yielded yet in its epoch; the cost does not depend on
      the position. ``set_epoch(e)`` with the restored epoch keeps that position (the
      ``DistributedSampler`` habit of calling it every epoch is safe); ``set_epoch``
      with another epoch, and every later ``iter()``, start an epoch from its beginning.
    * A state saved with another world size is loaded by
      :func:`savegame.data.resplit.resplit`, which re-splits the rest of the epoch
      (docs/data.md, "When the number of ranks changes"); that pass yields fewer than
      ``len(self)`` indices, and its state resumes like any other.

    ``seed`` defaults to 0 (like ``DistributedSampler``) so that every rank agrees
    without communication; pass a different one per experiment.
    """

    def __init__(self, data_source_or_len: Sized | int, *, shuffle: bool = True, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None, drop_last: bool = False) -> None:
        length = data_source_or_len if isinstance(data_source_or_len, int) else _length(data_source_or_len)
        if isinstance(length, bool) or length < 0:
            raise ConfigurationError(f"data_source_or_len must be a sized dataset or a length >= 0, got {length!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigurationError(f"seed must be an int, got {seed!r}")
        self._rank, self._world_size = _placement(rank, world_size)
        self._length, self._shuffle, self._seed, self._drop_last = length, bool(shuffle), seed, bool(drop_last)
        self._epoch, self._position = 0, 0
        self._split: Split | None = None                # the pass in progress is this part of the epoch re-split
        self._resume: tuple[int, int, Split | None] | None = None   # (epoch, position, split) the next iter() resumes

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def __len__(self) -> int:
        """The number of indices of a whole epoch on this rank (a re-split rest of an epoch yields fewer)."""
        return per_rank(self._length, self._world_size, self._drop_last)

    def set_epoch(self, epoch: int) -> None:
        """Select epoch ``epoch``'s order.

        The next ``iter()`` starts at the beginning of that epoch, except when
        ``epoch`` is the epoch restored by ``load_state_dict`` and not iterated yet:
        then it continues at the restored position.
        """
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ConfigurationError(f"epoch must be an int >= 0, got {epoch!r}")
        self._epoch = epoch
        self._take_resume(keep=True)

    def _take_resume(self, keep: bool) -> None:
        """Set position and split for a pass of the current epoch: the restored ones if they are for it."""
        resume = self._resume
        if not keep:
            self._resume = None
        if resume is not None and resume[0] == self._epoch:
            self._position, self._split = resume[1], resume[2]
        else:
            self._position, self._split = 0, None

    def indices(self, epoch: int | None = None) -> list[int]:
        """This rank's whole index list for ``epoch`` (the current one by default), as a fresh pass yields it."""
        return self._sequence(self._epoch if epoch is None else epoch, None)

    def _sequence(self, epoch: int, split: Split | None) -> list[int]:
        """This rank's indices of ``order[start:stop]`` (the whole epoch without a split), split like an epoch."""
        if self._shuffle:
            gen = torch.Generator().manual_seed(derive(self._seed, epoch))
            order = torch.randperm(self._length, generator=gen)
        else:
            order = torch.arange(self._length)
        if split is not None:
            order = order[split[0]:split[1]]
        count = len(order)
        total = per_rank(count, self._world_size, self._drop_last) * self._world_size
        if total > count:
            order = order.repeat(math.ceil(total / max(count, 1)))
        return order[:total][self._rank:total:self._world_size].tolist()

    def __iter__(self) -> Iterator[int]:
        self._take_resume(keep=False)
        return self._run(self._epoch, self._position, self._split)

    def _run(self, epoch: int, start: int, split: Split | None) -> Iterator[int]:
        order = self._sequence(epoch, split)
        for position in range(start, len(order)):
            self._position = position + 1
            yield order[position]

    def state_dict(self) -> dict[str, Any]:
        """Seed, epoch and how many of this epoch's indices were yielded, plus the settings they depend on.

        A pass re-split from another world size also holds ``split``: ``[start, stop]``
        of the epoch's permutation (see :class:`SavedSampler`). States without it are
        the ones every earlier version wrote, and load as before.
        """
        state: dict[str, Any] = {
            "seed": self._seed, "epoch": self._epoch, "position": self._position, "length": self._length,
            "world_size": self._world_size, "shuffle": self._shuffle, "drop_last": self._drop_last}
        if self._split is not None:
            state["split"] = list(self._split)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue where ``state`` left off; nothing changes if the state is refused.

        Raises IncompatibleStateError when a value is missing or malformed, or when
        the saved position lies inside an epoch and the length, world size, shuffle
        or drop_last differ: the rest of that epoch cannot be told (a change of world
        size is re-split by :func:`savegame.data.resplit.resplit`, given every old
        rank's state). At an epoch boundary such changes are accepted with a warning.
        """
        saved = parse_state(state)
        position, split = saved.position, saved.split
        changed = [f"{k} {state[k]!r} -> {getattr(self, '_' + k)!r}" for k in _KEYS[3:]
                   if state[k] != getattr(self, "_" + k)]
        at_end = position >= saved.pass_length
        if changed and not at_end and (position > 0 or split is not None):
            raise IncompatibleStateError(
                f"ResumableSampler: the checkpoint stopped at index {position} of {saved.pass_length} in epoch "
                f"{saved.epoch}, but {', '.join(changed)} since then, so the rest of that epoch is undefined. Build "
                "the sampler with the saved settings to resume exactly, or resume from a checkpoint taken at an "
                "epoch boundary."
            )
        if changed:
            log.warning("ResumableSampler: %s since the checkpoint; accepted at an epoch boundary", ", ".join(changed))
            ended = at_end and (saved.pass_length > 0 or split is not None)
            position, split = (len(self) if ended else 0), None
        if saved.seed != self._seed:
            log.info("ResumableSampler: using the checkpoint's seed %d instead of %d", saved.seed, self._seed)
        self._seed, self._epoch, self._position, self._split = saved.seed, saved.epoch, position, split
        self._resume = (saved.epoch, position, split)


def parse_state(state: Any) -> SavedSampler:
    """The typed content of a ResumableSampler state, or IncompatibleStateError naming the bad field."""
    if not isinstance(state, Mapping) or any(k not in state for k in _KEYS):
        missing = [k for k in _KEYS if k not in state] if isinstance(state, Mapping) else list(_KEYS)
        raise IncompatibleStateError(
            f"ResumableSampler state lacks {missing}; it was not saved by a ResumableSampler")
    damaged = "the checkpoint is damaged or was not written by a ResumableSampler"
    for key, least in (("seed", None), ("epoch", 0), ("position", 0), ("length", 0), ("world_size", 1)):
        value = state[key]
        if isinstance(value, bool) or not isinstance(value, int) or (least is not None and value < least):
            raise IncompatibleStateError(
                f"ResumableSampler state field {key!r} must be an int{'' if least is None else f' >= {least}'}, "
                f"got {value!r}; {damaged}")
    for key in ("shuffle", "drop_last"):
        if not isinstance(state[key], bool):
            raise IncompatibleStateError(
                f"ResumableSampler state field {key!r} must be a bool, got {state[key]!r}; {damaged}")
    split = state.get("split")
    if split is not None:
        if not (isinstance(split, (list, tuple)) and len(split) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in split)
                and 0 <= split[0] <= split[1] <= state["length"]):
            raise IncompatibleStateError(
                f"ResumableSampler state field 'split' must be [start, stop] with 0 <= start <= stop <= length "
                f"{state['length']}, got {split!r}; {damaged}")
        split = (split[0], split[1])
    return SavedSampler(state["seed"], state["epoch"], state["position"], state["length"], state["world_size"],
                        state["shuffle"], state["drop_last"], split)


def _placement(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world_size): the given ones, else torch.distributed's when initialised, else 0 and 1."""
    dist = torch.distributed
    initialised = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigurationError(f"world_size must be an int >= 1 (or None: from torch.distributed), got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ConfigurationError(f"rank must be an int in [0, world_size={world_size}) (or None: from "
                                 f"torch.distributed), got {rank!r}")
    return rank, world_size


def per_rank(length: int, world_size: int, drop_last: bool) -> int:
    """Indices per rank when ``length`` of them are split ``world_size`` ways, truncated or padded."""
    if drop_last:
        return length // world_size
    return math.ceil(length / world_size)


def _length(data_source: Sized) -> int:
    try:
        return len(data_source)
    except TypeError as exc:
        raise ConfigurationError(
            f"ResumableSampler needs a sized data source or a length, got {type(data_source).__name__}"
        ) from exc
