"""The order of a map-style epoch: tickets from the user's sampler, resumable at any batch.

A ticket ``(position, seed, unit)`` names one batch: its position in the epoch,
the seed its fetch runs under and its indices (the *unit*: a list of indices with
automatic batching, else one index). Tickets are drawn in the main process,
ahead of consumption when workers prefetch. What a saved state needs:

* a sampler (or batch sampler) with ``state_dict()``/``load_state_dict()`` is
  asked for its state only when the loader's state is taken. It may have run
  ahead of the consumed batches; the units it yielded for batches not consumed
  yet (at most the prefetch depth) are saved next to it, and a resume yields
  them first, then asks the restored sampler for the rest: no index before the
  position is produced again, and the cost does not grow with the epoch;
* any other sampler is re-run from the start of the epoch and the consumed units
  are skipped at the index level (no data is read). Its randomness is made
  reproducible by running it in an :class:`~savegame.data.seeding.RngScope` seeded
  from ``(seed, epoch)`` and by restoring its ``generator``, if it has one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch.utils.data import BatchSampler, SequentialSampler

from savegame.data import seeding
from savegame.data.sampler import ResumableSampler
from savegame.data.userstate import is_stateful

log = logging.getLogger("savegame.data")

Ticket = tuple[int, int, Any]
_END = object()


class IndexSource:
    """What a loader's units come from, decided once at construction.

    ``units`` is what torch would iterate (the batch sampler with auto-collation,
    else the sampler). ``target`` is the object whose state describes the
    position, if any; ``generators`` are the private torch generators of a
    sampler without state, saved at each epoch start and restored for a re-run.
    """

    def __init__(self, sampler: Any, batch_sampler: Any, auto_collation: bool) -> None:
        plain_batches = type(batch_sampler) is BatchSampler
        if plain_batches:
            sampler = batch_sampler.sampler
        self.units = batch_sampler if auto_collation else sampler
        owners = [batch_sampler] if auto_collation and not plain_batches else [sampler]
        self.target = next((o for o in owners if is_stateful(o)), None)
        self.epoch_setters = [o for o in owners if callable(getattr(o, "set_epoch", None))]
        # A target's state holds its randomness; only samplers without state need their generator saved for them.
        self.generators = [] if self.target is not None else [
            g for o in owners if isinstance(g := getattr(o, "generator", None), torch.Generator)]
        # Samplers known not to draw from the global generators need no RngScope (it costs ~30 us a batch).
        self.isolate = not (owners[0] is sampler and (isinstance(sampler, (ResumableSampler, SequentialSampler))
                                                      or bool(self.generators)))

    def generator_states(self) -> list[torch.Tensor]:
        return [g.get_state() for g in self.generators]

    def set_generator_states(self, states: list[torch.Tensor]) -> None:
        for gen, state in zip(self.generators, states):
            gen.set_state(state)

    def resume_epoch(self, epoch: int) -> None:
        """Before continuing a restored epoch: undo a user's ``set_epoch(other)`` on our own sampler.

        The loader decides the epoch, as it does for ``DistributedSampler``;
        ``ResumableSampler.set_epoch`` with the restored epoch keeps its position.
        """
        for obj in self.epoch_setters:
            if isinstance(obj, ResumableSampler):
                if obj.epoch != epoch:
                    log.warning("savegame.DataLoader: the sampler was set to epoch %d after the restore, but the "
                                "loader continues epoch %d (the loader calls set_epoch itself; no need to)",
                                obj.epoch, epoch)
                obj.set_epoch(epoch)


class MapEpoch:
    """One epoch's tickets, starting after ``start`` consumed units and skipping positions in ``done``.

    ``resume=False`` starts the epoch: ``set_epoch(epoch)`` is called on the
    samplers that have it, here, at construction. ``resume=True`` continues a
    restored position: with ``restored`` the target sampler already holds its
    restored state and ``pending`` holds the units it had yielded for batches not
    consumed; otherwise the epoch is re-run and ``start`` units are skipped.
    ``ended`` tells whether the pass over the sampler has run out.
    """

    def __init__(self, source: IndexSource, seed: int, epoch: int, start: int = 0,
                 done: frozenset[int] = frozenset(), resume: bool = False, restored: bool = False,
                 pending: Mapping[int, Any] | None = None, drain: bool = False) -> None:
        self.source, self.seed, self.epoch, self.done = source, seed, epoch, done
        self._guard: AbstractContextManager[Any] = nullcontext()
        if source.isolate:
            self._guard = seeding.RngScope(seeding.derive(seed, seeding.SAMPLER, epoch), continues=True)
        self.epoch_start_generators: list[torch.Tensor] = []
        self.ended = False
        restoring = resume and restored and source.target is not None
        self._replay = dict(sorted((pending or {}).items())) if restoring else {}
        self._outstanding: dict[int, Any] = dict(self._replay)     # drawn, not consumed: saved with the state
        with self._guard:
            if restoring:
                source.resume_epoch(epoch)
                self._units = iter(source.units)
                self._position = max([start, *(p + 1 for p in self._replay), *(p + 1 for p in done)])
            else:
                self._start(start if resume else 0, drain)

    def _start(self, skip: int, drain: bool) -> None:
        """Start the epoch's pass over the sampler, past ``skip`` units (a re-run of a sampler without state).

        ``drain`` first runs out the pass a restored sampler was at the end of, so
        that its next ``iter()`` begins a new pass as in the run that saved it. A
        target sampler yields its first unit here: its state then describes this
        epoch even before a batch is consumed.
        """
        source = self.source
        if drain:
            extra = sum(1 for _ in source.units)
            if extra:
                log.warning("savegame.DataLoader: the sampler restored at the end of epoch %d yielded %d more "
                            "units; its state_dict() does not describe its position", self.epoch - 1, extra)
        for obj in source.epoch_setters:
            obj.set_epoch(self.epoch)
        self.epoch_start_generators = source.generator_states()
        self._units = iter(source.units)
        self._position = self._skip(skip)
        if source.target is not None:
            first = next(self._units, _END)
            if first is not _END:
                self._replay, self._outstanding = {self._position: first}, {self._position: first}
                self._position += 1

    def tickets(self) -> Iterator[Ticket]:
        """Yield the remaining tickets: the restored pending units first, then the sampler's."""
        for here, unit in self._replay.items():
            yield self._ticket(here, unit)
        while True:
            with self._guard:
                unit = next(self._units, _END)
            if unit is _END:
                self.ended = True
                return
            here = self._position
            self._position += 1
            if here not in self.done:
                if self.source.target is not None:
                    self._outstanding[here] = unit
                yield self._ticket(here, unit)

    def _ticket(self, position: int, unit: Any) -> Ticket:
        return position, seeding.derive(self.seed, seeding.BATCH, self.epoch, position), unit

    def _skip(self, count: int) -> int:
        """Advance past ``count`` units of a re-run epoch (indices only, no data is read)."""
        if count:
            log.debug("re-running the sampler of epoch %d to skip %d consumed batches", self.epoch, count)
        for skipped in range(count):
            if next(self._units, _END) is _END:
                return skipped
        return count

    def consumed(self, position: int) -> None:
        self._outstanding.pop(position, None)

    def outstanding(self) -> dict[int, Any]:
        """Units the target sampler yielded for batches not consumed yet, by position."""
        return dict(self._outstanding)


class TicketSource:
    """The inner torch loader's sampler: iterating it yields the current epoch's tickets."""

    def __init__(self) -> None:
        self.plan: MapEpoch | None = None

    def __iter__(self) -> Iterator[Ticket]:
        assert self.plan is not None, "the DataLoader sets a plan before iterating"
        return self.plan.tickets()
