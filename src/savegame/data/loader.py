"""savegame.DataLoader: torch's DataLoader, resumable mid-epoch, owning its randomness."""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch.utils.data import IterableDataset

from savegame.data import compat, seeding
from savegame.data.fetch import IterStream, MapFetch, Produced, SlotStart, StreamPlan, identity
from savegame.data.merge import SlotMerge
from savegame.data.plan import IndexSource, MapEpoch, TicketSource, is_stateful
from savegame.data.sampler import ResumableSampler
from savegame.errors import ConfigurationError, SavegameError

log = logging.getLogger("savegame.data")


@dataclass
class _Progress:
    """Where the loader stands. ``epoch`` is the epoch in progress, or the next one to start."""

    epoch: int = 0
    in_progress: bool = False
    position: int = 0                       # batches consumed in this epoch (map: contiguous prefix)
    done: set[int] = field(default_factory=set)   # map, in_order=False: consumed positions past the prefix
    slots: list[SlotStart] = field(default_factory=list)   # iterable: per worker slot
    next_slot: int = 0
    resume_pending: bool = False            # the next iter() continues the restored epoch
    sampler_restored: bool = False          # map: the sampler holds the restored position itself


class DataLoader(torch.utils.data.DataLoader):  # type: ignore[type-arg]
    """A drop-in ``torch.utils.data.DataLoader`` with ``state_dict()`` / ``load_state_dict()``.

    Takes torch's arguments, plus ``seed``. Guarantees:

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
    raises SavegameError.
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
    ) -> None:
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ConfigurationError(f"seed must be an int or None, got {seed!r}")
        own_seed = seed if seed is not None else (
            generator.initial_seed() if generator is not None else seeding.draw_seed())
        iterable = isinstance(dataset, IterableDataset)
        if not iterable and sampler is None and batch_sampler is None:
            sampler = ResumableSampler(_length(dataset), shuffle=bool(shuffle), seed=own_seed)
            shuffle = None
        try:
            super().__init__(dataset, batch_size, shuffle, sampler, batch_sampler, num_workers, collate_fn, pin_memory,
                             drop_last, timeout, worker_init_fn, multiprocessing_context, generator,
                             prefetch_factor=prefetch_factor, persistent_workers=persistent_workers,
                             pin_memory_device=pin_memory_device, in_order=in_order)
        except ValueError as exc:
            raise ConfigurationError(f"savegame.DataLoader: {exc}") from exc
        self._seed = own_seed
        self._iterable = iterable
        self._source = None if iterable else IndexSource(self.sampler, self.batch_sampler, self._auto_collation)
        self._dataset_stateful = is_stateful(dataset)
        self._progress = _Progress()
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

        Holds only plain values, tensors and arrays: the sampler's, batch sampler's
        or dataset's own ``state_dict()`` where they have one.
        """
        progress = self._progress
        state: dict[str, Any] = {
            "version": compat.VERSION, "kind": "iterable" if self._iterable else "map", "seed": self._seed,
            "epoch": progress.epoch, "in_progress": progress.in_progress, "position": progress.position,
            "batch_size": self.batch_size, "drop_last": self.drop_last, "length": _length_or_none(self.dataset),
        }
        if self._iterable:
            state["num_workers"] = self._slot_count()
            state["slots"] = [{"batches": s.batches, "state": s.state, "ended": s.ended} for s in progress.slots]
            state["next_slot"] = progress.next_slot
            return state
        source = self._source
        assert source is not None
        # Mid-epoch the sampler may have run ahead (workers prefetch): use what it was after the last consumed batch.
        plan = self._plan if progress.in_progress and not progress.resume_pending else None
        sampler_state = None
        if source.target is not None:
            sampler_state = plan.snapshot_at(progress.position) if plan is not None else source.snapshot()
        generators = plan.epoch_start_generators if plan is not None else source.generator_states()
        state.update({"done": sorted(progress.done), "sampler": sampler_state, "generators": list(generators),
                      "dataset": cast(Any, self.dataset).state_dict() if self._dataset_stateful else None})
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state``: the next ``iter()`` yields the rest of its epoch (or the next epoch).

        Raises IncompatibleStateError, naming the change and the remedy, when the
        batch size, drop_last, the dataset's length or (for an iterable dataset) the
        number of workers changed since a mid-epoch save. Any iterator of this loader
        stops being valid, and persistent workers are restarted.
        """
        compat.check(state, {"kind": "iterable" if self._iterable else "map", "batch_size": self.batch_size,
                             "drop_last": self.drop_last, "length": _length_or_none(self.dataset),
                             "num_workers": self._slot_count()})
        self._stop_workers()
        self._generation += 1
        self._plan = self._merge = None
        self._seed = int(state["seed"])
        in_progress = bool(state["in_progress"])
        progress = _Progress(epoch=int(state["epoch"]), in_progress=in_progress, position=int(state["position"]),
                             resume_pending=in_progress)
        if self._iterable:
            self._load_iterable(state, progress)
        else:
            self._load_map(state, progress)
        self._progress = progress

    def _load_map(self, state: Mapping[str, Any], progress: _Progress) -> None:
        source = self._source
        assert source is not None
        progress.done = set(int(p) for p in state.get("done", ()))
        if state.get("sampler") is not None and source.target is not None:
            source.target.load_state_dict(state["sampler"])
            progress.sampler_restored = True
        elif state.get("sampler") is not None:
            log.warning("savegame.DataLoader: the checkpoint holds a sampler state but this loader's sampler has no "
                        "load_state_dict(); its order is rebuilt from the seed and epoch instead")
        source.set_generator_states(list(state.get("generators") or []))
        if state.get("dataset") is not None and self._dataset_stateful:
            cast(Any, self.dataset).load_state_dict(state["dataset"])

    def _load_iterable(self, state: Mapping[str, Any], progress: _Progress) -> None:
        saved = state.get("slots") or []
        progress.slots = [SlotStart(int(s["batches"]), s["state"], bool(s["ended"])) for s in saved]
        if len(progress.slots) != self._slot_count():
            progress.slots = [SlotStart() for _ in range(self._slot_count())]
        progress.next_slot = int(state.get("next_slot", 0))
        skipped = sum(s.batches for s in progress.slots if s.state is None and not s.ended)
        if progress.in_progress and skipped and not self._dataset_stateful:
            log.warning(
                "savegame.DataLoader: the iterable dataset %s has no state_dict()/load_state_dict(), so resuming "
                "epoch %d reads and discards the %d batches already consumed (this takes longer the further the "
                "epoch went). Implement state_dict()/load_state_dict() on the dataset to resume without re-reading.",
                type(self.dataset).__name__, progress.epoch, skipped)

    # -- iteration ---------------------------------------------------------------------------
    def __iter__(self) -> _LoaderIterator:  # type: ignore[override]  # ours is not torch's iterator class
        progress = self._progress
        resume = progress.resume_pending
        progress.resume_pending = False
        if not resume:
            if progress.in_progress:
                progress.epoch += 1        # the previous iterator was abandoned mid-epoch
            progress.in_progress, progress.position, progress.next_slot = True, 0, 0
            progress.done = set()
            progress.slots = [SlotStart() for _ in range(self._slot_count())]
        self._generation += 1
        self._base_generator.manual_seed(seeding.derive(self._seed, seeding.BASE, progress.epoch))
        source = self._start_iterable(resume) if self._iterable else self._start_map(resume)
        return _LoaderIterator(self, source, self._generation)

    def _start_map(self, resume: bool) -> Iterator[Produced]:
        assert self._source is not None
        progress = self._progress
        self._plan = MapEpoch(self._source, self._seed, progress.epoch, progress.position,
                              frozenset(progress.done), resume, progress.sampler_restored)
        self._tickets.plan = self._plan
        return iter(self._inner_loader())

    def _start_iterable(self, resume: bool) -> Iterator[Produced]:
        progress = self._progress
        inner = self._inner_loader()
        stream = inner.dataset
        assert isinstance(stream, IterStream)
        if not (self.persistent_workers and getattr(inner, "_iterator", None) is not None):
            slots = copy.deepcopy(progress.slots) if resume else None
            stream.plan = StreamPlan(self._seed, progress.epoch, slots, self._dataset_stateful)
        self._merge = SlotMerge(iter(inner), progress.slots, progress.next_slot if resume else 0)
        return self._merge

    def _inner_loader(self) -> torch.utils.data.DataLoader[Any]:
        """The torch loader that does the work over our wrappers; kept for persistent workers."""
        if self._inner is not None:
            return self._inner
        if self._iterable:
            plan = StreamPlan(self._seed, self._progress.epoch, None, self._dataset_stateful)
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
        progress = self._progress
        if self._iterable:
            progress.position += 1
            assert self._merge is not None
            progress.next_slot = self._merge.next_slot
            return
        if produced.position != progress.position:
            progress.done.add(produced.position)
            return
        progress.position += 1
        while progress.position in progress.done:
            progress.done.remove(progress.position)
            progress.position += 1
        if self._plan is not None:
            self._plan.forget_before(progress.position)

    def _finish_epoch(self) -> None:
        progress = self._progress
        progress.epoch += 1
        progress.in_progress, progress.position, progress.next_slot = False, 0, 0
        progress.done = set()
        progress.slots = [SlotStart() for _ in range(self._slot_count())]

    def _check_current(self, generation: int) -> None:
        if generation != self._generation:
            raise SavegameError(
                "this iterator was superseded by a newer iter() on its savegame.DataLoader (or by "
                "load_state_dict()); only the newest iterator may be advanced"
            )

    def _slot_count(self) -> int:
        return max(1, self.num_workers) if self._iterable else 0

    def _stop_workers(self) -> None:
        """Drop the inner loader (and its persistent workers): they hold copies of the old state."""
        inner, self._inner = self._inner, None
        iterator = getattr(inner, "_iterator", None) if inner is not None else None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


class _LoaderIterator(Iterator[Any]):
    """One epoch of a savegame.DataLoader; records each batch as consumed when it is handed out."""

    def __init__(self, loader: DataLoader, source: Iterator[Produced], generation: int) -> None:
        self._loader, self._source, self._generation = loader, source, generation
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
        return len(self._loader)


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
