"""ResumableSampler: a seeded, distributed-aware index sampler that remembers its position."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sized
from typing import Any

import torch

from savegame.data.seeding import derive
from savegame.errors import ConfigurationError, IncompatibleStateError

log = logging.getLogger("savegame.data")

_KEYS = ("seed", "epoch", "position", "length", "world_size", "shuffle", "drop_last")


class ResumableSampler(torch.utils.data.Sampler[int]):
    """Yields this rank's indices for one epoch, shuffled (or in order), and can resume mid-epoch.

    Guarantees:

    * The order of epoch ``e`` is a pure function of ``(seed, e, length,
      world_size, rank, shuffle, drop_last)``; no global generator is read or
      changed, so two processes built alike yield the same indices.
    * With ``world_size`` ranks, every rank yields ``len(self)`` indices and the
      ranks partition one permutation like ``DistributedSampler``: disjoint when
      ``drop_last=True`` or the length divides evenly, otherwise the first
      indices of the permutation are repeated to pad.
    * After ``load_state_dict(s)``, the next ``iter()`` yields exactly the indices
      the saved sampler had not yielded yet in its epoch; the cost does not depend on
      the position. Later ``iter()`` calls, or ``set_epoch(e)``, start from the
      beginning of an epoch.

    ``seed`` defaults to 0 (like ``DistributedSampler``) so that every rank agrees
    without communication; pass a different one per experiment.
    """

    def __init__(self, data_source_or_len: Sized | int, *, shuffle: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = False) -> None:
        length = data_source_or_len if isinstance(data_source_or_len, int) else _length(data_source_or_len)
        if isinstance(length, bool) or length < 0:
            raise ConfigurationError(f"data_source_or_len must be a sized dataset or a length >= 0, got {length!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigurationError(f"seed must be an int, got {seed!r}")
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ConfigurationError(f"world_size must be an int >= 1, got {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ConfigurationError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
        self._length, self._shuffle, self._seed = length, bool(shuffle), seed
        self._rank, self._world_size, self._drop_last = rank, world_size, bool(drop_last)
        self._epoch, self._position = 0, 0
        self._resume_at: int | None = None

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def seed(self) -> int:
        return self._seed

    def __len__(self) -> int:
        return _per_rank(self._length, self._world_size, self._drop_last)

    def set_epoch(self, epoch: int) -> None:
        """Select epoch ``epoch``'s order; the next ``iter()`` starts at its beginning."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ConfigurationError(f"epoch must be an int >= 0, got {epoch!r}")
        self._epoch, self._position, self._resume_at = epoch, 0, None

    def indices(self, epoch: int | None = None) -> list[int]:
        """This rank's whole index list for ``epoch`` (the current one by default)."""
        epoch = self._epoch if epoch is None else epoch
        per_rank = len(self)
        total = per_rank * self._world_size
        if self._shuffle:
            gen = torch.Generator().manual_seed(derive(self._seed, epoch))
            order = torch.randperm(self._length, generator=gen)
        else:
            order = torch.arange(self._length)
        if total > self._length:
            order = order.repeat(math.ceil(total / max(self._length, 1)))
        return order[:total][self._rank:total:self._world_size].tolist()

    def __iter__(self) -> Iterator[int]:
        start = self._resume_at or 0
        self._resume_at = None
        order = self.indices()
        self._position = start
        for position in range(start, len(order)):
            self._position = position + 1
            yield order[position]

    def state_dict(self) -> dict[str, Any]:
        """Seed, epoch and how many of this epoch's indices were yielded, plus the settings they depend on."""
        return {"seed": self._seed, "epoch": self._epoch, "position": self._position, "length": self._length,
                "world_size": self._world_size, "shuffle": self._shuffle, "drop_last": self._drop_last}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue where ``state`` left off.

        Raises IncompatibleStateError when the saved position lies inside an epoch and
        the length, world size, shuffle or drop_last differ: the rest of that epoch
        cannot be told. At an epoch boundary such changes are accepted with a warning.
        """
        missing = [k for k in _KEYS if k not in state]
        if missing:
            raise IncompatibleStateError(
                f"ResumableSampler state lacks {missing}; it was not saved by a ResumableSampler")
        old_len = _per_rank(state["length"], state["world_size"], state["drop_last"])
        position = int(state["position"])
        changed = [f"{k} {state[k]!r} -> {getattr(self, '_' + k)!r}" for k in _KEYS[3:]
                   if state[k] != getattr(self, "_" + k)]
        if changed and 0 < position < old_len:
            raise IncompatibleStateError(
                f"ResumableSampler: the checkpoint stopped at index {position} of {old_len} in epoch {state['epoch']}, "
                f"but {', '.join(changed)} since then, so the rest of that epoch is undefined. Build the sampler with "
                "the saved settings to resume exactly, or resume from a checkpoint taken at an epoch boundary."
            )
        if changed:
            log.warning("ResumableSampler: %s since the checkpoint; accepted at an epoch boundary", ", ".join(changed))
            position = len(self) if position >= old_len > 0 else 0
        if state["seed"] != self._seed:
            log.info("ResumableSampler: using the checkpoint's seed %d instead of %d", state["seed"], self._seed)
        self._seed, self._epoch = int(state["seed"]), int(state["epoch"])
        self._position = self._resume_at = position


def _per_rank(length: int, world_size: int, drop_last: bool) -> int:
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
