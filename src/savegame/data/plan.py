"""The order of a map-style epoch: tickets from the user's sampler, resumable at any batch.

A ticket ``(position, seed, unit)`` names one batch: its position in the epoch,
the seed its fetch runs under and its indices. Tickets are produced in the main
process, ahead of consumption when workers prefetch; this module keeps what is
needed to describe the sampler *as of the last consumed batch*:

* a sampler (or batch sampler) with ``state_dict()``/``load_state_dict()`` is
  snapshotted after every unit it yields, so a resume loads the snapshot and asks
  it for the rest: no index before the position is produced again;
* any other sampler is re-run from the start of the epoch and the consumed units
  are skipped at the index level (no data is read). Its randomness is made
  reproducible by running it in an :class:`~savegame.data.seeding.RngScope` seeded
  from ``(seed, epoch)`` and by restoring its ``generator``, if it has one.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch.utils.data import BatchSampler, SequentialSampler

from savegame.data import seeding
from savegame.data.sampler import ResumableSampler

log = logging.getLogger("savegame.data")

Ticket = tuple[int, int, Any]
_END = object()


def is_stateful(obj: object) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


class IndexSource:
    """What a loader's units come from, decided once at construction.

    ``units`` is what torch would iterate (the batch sampler with auto-collation,
    else the sampler). ``target`` is the object whose state describes the
    position, if any; ``generators`` are private torch generators found on the
    samplers, restored for samplers without state.
    """

    def __init__(self, sampler: Any, batch_sampler: Any, auto_collation: bool) -> None:
        plain_batches = type(batch_sampler) is BatchSampler
        if plain_batches:
            sampler = batch_sampler.sampler
        self.units = batch_sampler if auto_collation else sampler
        owners = [batch_sampler] if auto_collation and not plain_batches else [sampler]
        self.target = next((o for o in owners if is_stateful(o)), None)
        self.epoch_setters = [o for o in owners if callable(getattr(o, "set_epoch", None))]
        self.generators = [g for o in owners if isinstance(g := getattr(o, "generator", None), torch.Generator)]
        # Samplers known not to draw from the global generators need no RngScope (it costs ~30 us a batch).
        self.isolate = not (owners[0] is sampler and (isinstance(sampler, (ResumableSampler, SequentialSampler))
                                                      or bool(self.generators)))
        self.copy_snapshots = not isinstance(self.target, ResumableSampler)

    def snapshot(self) -> Any:
        assert self.target is not None
        state = self.target.state_dict()
        return copy.deepcopy(state) if self.copy_snapshots else state

    def generator_states(self) -> list[torch.Tensor]:
        return [g.get_state() for g in self.generators]

    def set_generator_states(self, states: list[Any]) -> None:
        for gen, state in zip(self.generators, states):
            gen.set_state(torch.as_tensor(state, dtype=torch.uint8).clone())


class MapEpoch:
    """One epoch's tickets, starting after ``start`` consumed units and skipping positions in ``done``.

    ``resume=False`` starts the epoch: ``set_epoch(epoch)`` is called on the
    samplers that have it, here, at construction. ``resume=True`` continues a
    restored position: with ``restored`` the target sampler already holds its
    restored state; otherwise the epoch is re-run and ``start`` units are skipped.
    """

    def __init__(self, source: IndexSource, seed: int, epoch: int, start: int = 0,
                 done: frozenset[int] = frozenset(), resume: bool = False, restored: bool = False) -> None:
        self.source, self.seed, self.epoch, self.done = source, seed, epoch, done
        self._guard: AbstractContextManager[Any] = nullcontext()
        if source.isolate:
            self._guard = seeding.RngScope(seeding.derive(seed, seeding.SAMPLER, epoch), continues=True)
        self._snapshots: dict[int, Any] = {}
        self.epoch_start_generators: list[torch.Tensor] = []
        restoring = resume and restored and source.target is not None
        with self._guard:
            if not restoring:
                for obj in source.epoch_setters:
                    obj.set_epoch(epoch)
                self.epoch_start_generators = source.generator_states()
            self._units = iter(source.units)
            self._position = start if restoring else self._skip(start if resume else 0)
        if source.target is not None:
            self._snapshots[self._position] = source.snapshot()

    def tickets(self) -> Iterator[Ticket]:
        """Yield the remaining tickets; the snapshot after each unit is taken before its ticket is yielded."""
        source, guard = self.source, self._guard
        while True:
            with guard:
                unit = next(self._units, _END)
            if unit is _END:
                if source.target is not None:
                    self._snapshots[self._position] = source.snapshot()
                return
            here = self._position
            self._position += 1
            if source.target is not None:
                self._snapshots[self._position] = source.snapshot()
            if here not in self.done:
                yield here, seeding.derive(self.seed, seeding.BATCH, self.epoch, here), unit

    def _skip(self, count: int) -> int:
        """Advance past ``count`` units of a re-run epoch (indices only, no data is read)."""
        if count:
            log.debug("re-running the sampler of epoch %d to skip %d consumed batches", self.epoch, count)
        for skipped in range(count):
            if next(self._units, _END) is _END:
                return skipped
        return count

    def snapshot_at(self, position: int) -> Any:
        """The target's state after ``position`` units, the oldest one kept."""
        return self._snapshots.get(position)

    def forget_before(self, position: int) -> None:
        for key in [k for k in self._snapshots if k < position]:
            del self._snapshots[key]



class TicketSource:
    """The inner torch loader's sampler: iterating it yields the current epoch's tickets."""

    def __init__(self) -> None:
        self.plan: MapEpoch | None = None

    def __iter__(self) -> Iterator[Ticket]:
        assert self.plan is not None, "the DataLoader sets a plan before iterating"
        return self.plan.tickets()
