"""savegame.DataLoader: torch's DataLoader, resumable mid-epoch, owning its randomness."""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import IterableDataset

from savegame.data import compat, mapstate, seeding, streamstate
from savegame.data.fetch import MapFetch, Produced, identity
from savegame.data.merge import SlotMerge
from savegame.data.plan import IndexSource, MapEpoch, TicketSource
from savegame.data.progress import Progress
from savegame.data.sampler import ResumableSampler
from savegame.data.stream import IterStream, SlotStart, StreamPlan
from savegame.errors import ConfigurationError, SavegameError

log = logging.getLogger("savegame.data")

class DataLoader(torch.utils.data.DataLoader):  # type: ignore[type-arg]
    """A drop-in ``torch.utils.data.DataLoader`` with ``state_dict()`` / ``load_state_dict()``.

    Takes torch's arguments, plus ``seed``; torchdata's ``snapshot_every_n_steps`` is
    accepted and has no effect (the state is exact after every batch). Guarantees:

    * **Exact resume.** After ``load_state_dict(s)``, the next ``iter()`` yields
      the batches the saved loader had not yielded yet in its epoch, then later
      ``iter()`` calls yield the following epochs, all equal to an uninterrupted
      run's. Consumed map-style samples are not read again.
    * **Own randomness.** Starting an iterator, spawning workers, shuffling and
      fetching never read or change the global Python, NumPy or torch generators
      of the main process. All randomness derives from ``seed`` (by default
      ``generator.initial_seed()`` when a generator is given, else one number
      drawn from the global torch generator here, at construction).
    * **Worker randomness.** Each batch is fetched and collated with Python, NumPy
      and torch generators seeded from (seed, epoch, batch position), in whichever
      process fetches it: map-style batches do not depend on ``num_workers``.

    Epochs are counted by ``iter()``: every new iterator starts the next epoch (a
    sampler's or dataset's ``set_epoch(epoch)`` is called), except the first one
    after restoring a mid-epoch state. Calling ``next()`` on an older iterator
    raises SavegameError. ``len(loader)`` is the length of a whole epoch, as in
    torch; ``len(iterator)`` is the number of batches that iterator yields (fewer
    for the rest of a restored epoch).
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int | None = 1,
        shuffle: bool | None = None,
        sampler: Any = None,
        batch_sampler: Any = None,
        num_workers: int = 0,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        pin_memory: bool = False,
        drop_last: bool = False,
        timeout: float = 0,
        worker_init_fn: Callable[[int], None] | None = None,
        multiprocessing_context: Any = None,
        generator: torch.Generator | None = None,
        *,
        prefetch_factor: int | None = None,
        persistent_workers: bool = False,
        pin_memory_device: str = "",
        in_order: bool = True,
        seed: int | None = None,
        snapshot_every_n_steps: int | None = None,
    ) -> None:
        own_seed = _own_seed(seed, generator)
        _check_snapshot_steps(snapshot_every_n_steps)
        if not isinstance(dataset, IterableDataset) and sampler is None and batch_sampler is None:
            sampler, shuffle = _default_sampler(dataset, shuffle, own_seed), None
        try:
            super().__init__(dataset, batch_size, shuffle, sampler, batch_sampler, num_workers, collate_fn, pin_memory,
                             drop_last, timeout, worker_init_fn, multiprocessing_context, generator,
                             prefetch_factor=prefetch_factor, persistent_workers=persistent_workers,
                             pin_memory_device=pin_memory_device, in_order=in_order)
        except ValueError as exc:
            raise ConfigurationError(f"savegame.DataLoader: {exc}") from exc
        self._setup(own_seed)

    def _setup(self, seed: int) -> None:
        """Our own machinery, once torch has checked and stored its arguments."""
        self._seed = seed
        self._iterable = isinstance(self.dataset, IterableDataset)
        self._source = None if self._iterable else IndexSource(self.sampler, self.batch_sampler, self._auto_collation)
        self._progress = Progress(slots=[SlotStart() for _ in range(self._slot_count())])
        self._generation = 0
        self._tickets = TicketSource()
        self._plan: MapEpoch | None = None
        self._merge: SlotMerge | None = None
        self._base_generator = torch.Generator()
        self._inner: torch.utils.data.DataLoader[Any] | None = None

    @property
    def seed(self) -> int:
        """The seed every random stream of this loader derives from (restored by ``load_state_dict``)."""
        return self._seed

    @property
    def epoch(self) -> int:
        """The epoch in progress, or the next one ``iter()`` will start."""
        return self._progress.epoch

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch handed out (not after prefetched ones), and the seed.

        Holds only plain values, tensors and arrays, and the sampler's, batch
        sampler's or dataset's own ``state_dict()`` where they have one. The result
        is a copy: iterating on does not change it.
        """
        progress = self._progress
        state: dict[str, Any] = {
            "version": compat.VERSION, "kind": "iterable" if self._iterable else "map", "seed": self._seed,
            "epoch": progress.epoch, "in_progress": progress.in_progress, "position": progress.position,
            "batch_size": self.batch_size, "drop_last": self.drop_last, "length": _length_or_none(self.dataset),
        }
        if self._iterable:
            state.update(streamstate.capture(progress, self.num_workers))
        else:
            assert self._source is not None
            state.update(mapstate.capture(self._source, self.dataset, self._plan, progress))
        return copy.deepcopy(state)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state``: the next ``iter()`` yields the rest of its epoch (or the next epoch).

        Raises IncompatibleStateError, naming the field or the change and the
        remedy, when a value is malformed or when the batch size, drop_last, the
        dataset's length or (for an iterable dataset) the number of worker slots
        changed since a mid-epoch save. A refused state changes nothing: the
        loader and its current iterator go on as before. An accepted one makes
        any iterator of this loader invalid and restarts persistent workers.
        An iterable dataset (and its iterator) get their states where they are
        read, when the next ``iter()`` sets the epoch up: a refusal there is
        raised by that ``iter()``, which leaves the loaded position in place.
        """
        saved, note = self._check_state(state)
        if note:
            log.warning("%s", note)
        progress = Progress(epoch=saved.epoch, in_progress=saved.in_progress, position=saved.position,
                            resume_pending=saved.in_progress)
        if self._iterable:
            streamstate.restore(saved, progress, self._slot_count(), self.dataset)
        else:
            assert self._source is not None
            mapstate.restore(self._source, self.dataset, saved, progress)
        self._stop_workers()
        self._generation += 1
        self._plan = self._merge = None
        self._seed, self._progress = saved.seed, progress

    def _check_state(self, state: Mapping[str, Any]) -> tuple[compat.Saved, str | None]:
        """The parsed ``state`` if this loader can load it, and what changed at an epoch boundary; changes nothing."""
        saved = compat.parse(state)
        note = compat.check(saved, {"kind": "iterable" if self._iterable else "map",
                                    "batch_size": self.batch_size, "drop_last": self.drop_last,
                                    "length": _length_or_none(self.dataset), "num_workers": self.num_workers})
        return saved, note

    # -- iteration ---------------------------------------------------------------------------
    def __iter__(self) -> _LoaderIterator:  # type: ignore[override]  # ours is not torch's iterator class
        """Start the next epoch (or continue a restored one).

        For an iterable dataset this waits until every worker slot has set its
        epoch up, as torchdata does: an error in ``worker_init_fn``,
        ``set_epoch``, ``load_state_dict`` or the dataset's ``__iter__`` is raised
        here, and leaves the loader's position as it was.
        """
        before = copy.deepcopy(self._progress)
        try:
            return self._begin()
        except BaseException:
            self._stop_workers()
            self._plan = self._merge = None
            self._progress = before
            raise

    def _begin(self) -> _LoaderIterator:
        progress = self._progress
        drain = progress.sampler_restored and progress.sampler_ended
        carry = progress.take_carry() if self._carries_objects() else None
        resume = progress.begin(self._slot_count())
        self._generation += 1
        self._base_generator.manual_seed(seeding.derive(self._seed, seeding.BASE, progress.epoch))
        source = self._start_iterable(resume, carry) if self._iterable else self._start_map(resume, drain)
        return _LoaderIterator(self, source, self._generation, progress.consumed_count())

    def _carries_objects(self) -> bool:
        """Whether the dataset object an epoch ends with is the one the next epoch starts with, as in torch."""
        return self.num_workers == 0 or self.persistent_workers

    def _start_map(self, resume: bool, drain: bool) -> Iterator[Produced]:
        assert self._source is not None
        progress = self._progress
        self._plan = MapEpoch(self._source, self._seed, progress.epoch, progress.position, frozenset(progress.done),
                              resume, progress.sampler_restored, progress.pending, drain)
        self._tickets.plan = self._plan
        return iter(self._inner_loader())

    def _start_iterable(self, resume: bool, carry: list[SlotStart] | None) -> Iterator[Produced]:
        progress = self._progress
        inner = self._inner_loader()
        stream = inner.dataset
        assert isinstance(stream, IterStream)
        if not (self.persistent_workers and getattr(inner, "_iterator", None) is not None):
            slots = copy.deepcopy(progress.slots) if resume else None
            stream.plan = StreamPlan(self._seed, progress.epoch, slots, copy.deepcopy(carry))
        self._merge = SlotMerge(iter(inner), progress.slots, progress.next_slot if resume else 0, self.in_order)
        self._merge.start()
        return self._merge

    def _inner_loader(self) -> torch.utils.data.DataLoader[Any]:
        """The torch loader that does the work over our wrappers; kept for persistent workers."""
        if self._inner is not None:
            return self._inner
        if self._iterable:
            plan = StreamPlan(self._seed, self._progress.epoch)
            data: Any = IterStream(self.dataset, self.batch_size, self.drop_last, self.collate_fn, plan)
            sampler = None
        else:
            data, sampler = MapFetch(self.dataset, self.collate_fn, self._auto_collation), self._tickets
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # torch already warned about these settings for this loader
            self._inner = torch.utils.data.DataLoader(
                data, batch_size=None, sampler=sampler, num_workers=self.num_workers, collate_fn=identity,
                pin_memory=self.pin_memory, timeout=self.timeout, worker_init_fn=self.worker_init_fn,
                multiprocessing_context=self.multiprocessing_context, generator=self._base_generator,
                prefetch_factor=self.prefetch_factor, persistent_workers=self.persistent_workers,
                pin_memory_device=self.pin_memory_device, in_order=self.in_order)
        return self._inner

    def _consumed(self, produced: Produced) -> None:
        if self._iterable:
            assert self._merge is not None
            self._progress.consumed_slot(self._merge.next_slot)
            return
        self._progress.consumed_map(produced.position)
        if self._plan is not None:
            self._plan.consumed(produced.position)

    def _finish_epoch(self) -> None:
        self._progress.finish(self._slot_count())

    def _check_current(self, generation: int) -> None:
        if generation != self._generation:
            raise SavegameError(
                "this iterator was superseded by a newer iter() on its savegame.DataLoader (or by "
                "load_state_dict()); only the newest iterator may be advanced"
            )

    def _slot_count(self) -> int:
        return compat.slot_count("iterable" if self._iterable else "map", self.num_workers)

    def _stop_workers(self) -> None:
        """Drop the inner loader (and its persistent workers): they hold copies of the old state."""
        inner, self._inner = self._inner, None
        iterator = getattr(inner, "_iterator", None) if inner is not None else None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


class _LoaderIterator(Iterator[Any]):
    """One epoch of a savegame.DataLoader; records each batch as consumed when it is handed out.

    ``len()`` is the number of batches this iterator yields in all: the loader's
    epoch length less the batches consumed before it started (a restored epoch).
    """

    def __init__(self, loader: DataLoader, source: Iterator[Produced], generation: int, consumed: int) -> None:
        self._loader, self._source, self._generation = loader, source, generation
        self._consumed_before = consumed
        self._finished = False

    def __iter__(self) -> _LoaderIterator:
        return self

    def __next__(self) -> Any:
        if self._finished:
            raise StopIteration
        self._loader._check_current(self._generation)
        try:
            produced = next(self._source)
        except StopIteration:
            self._finished = True
            self._loader._finish_epoch()
            raise
        self._loader._consumed(produced)
        return produced.batch

    def __len__(self) -> int:
        return max(0, len(self._loader) - self._consumed_before)


def _own_seed(seed: int | None, generator: torch.Generator | None) -> int:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigurationError(f"seed must be an int or None, got {seed!r}")
    if seed is not None:
        return seed
    return generator.initial_seed() if generator is not None else seeding.draw_seed()


def _check_snapshot_steps(steps: int | None) -> None:
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ConfigurationError(f"snapshot_every_n_steps must be an int >= 1 or None, got {steps!r} (savegame "
                                 "keeps the state after every batch; the argument is accepted for torchdata code)")


def _default_sampler(dataset: Any, shuffle: bool | None, seed: int) -> ResumableSampler:
    """What ``shuffle=`` means without a sampler: a ResumableSampler over the whole dataset.

    rank 0 of 1, as torch's own default: under DDP pass a sampler (e.g. a
    ResumableSampler, which finds the rank and world size by itself).
    """
    return ResumableSampler(_length(dataset), shuffle=bool(shuffle), seed=seed, rank=0, world_size=1)


def _length(dataset: Any) -> int:
    try:
        return len(dataset)
    except TypeError as exc:
        raise ConfigurationError(
            f"savegame.DataLoader: the map-style dataset {type(dataset).__name__} has no __len__; give it one, "
            "or pass a sampler or batch_sampler"
        ) from exc


def _length_or_none(dataset: Any) -> int | None:
    try:
        return len(dataset)
    except TypeError:
        return None
