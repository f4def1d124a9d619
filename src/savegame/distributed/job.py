"""This process's place in a distributed job, and the collectives savegame needs.

savegame never uses the job's own process group while training runs: collectives
issued from the background writer would interleave with the training's (gloo then
aborts with "collective mismatch", or hangs). It makes two gloo groups of its own,
once, at construction: ``fg`` for the calls made on the training thread (agreeing
on a save, on a restore) and ``bg`` for the background writer. Every wait on them is
bounded by ``timeout``: a dead or stuck rank makes the others raise, never hang.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from savegame.errors import (
    ConfigurationError,
    CorruptCheckpointError,
    RankDamagedError,
    RankFailedError,
    SavegameError,
)

log = logging.getLogger("savegame.distributed")
T = TypeVar("T")


def active() -> bool:
    """Whether this process is part of an initialised ``torch.distributed`` job."""
    return dist.is_available() and dist.is_initialized()


@dataclass(frozen=True)
class Report:
    """One rank's outcome of a collective step."""

    error: str | None
    damaged: bool  # the error was a CorruptCheckpointError (the checkpoint, not the job, is at fault)
    value: Any = None


def raise_failed(reports: list[Report], error: BaseException | None, what: str) -> None:
    """Raise on every rank if any rank failed: this rank's own error, or one naming the first failed rank."""
    if error is not None:
        raise error
    for rank, report in enumerate(reports):
        if report.error is not None:
            cls = RankDamagedError if report.damaged else RankFailedError
            raise cls(f"{what} failed on rank {rank}: {report.error}")


class Job:
    """Rank, world size and savegame's own process groups."""

    def __init__(self, timeout: float) -> None:
        if not active():
            raise ConfigurationError("no torch.distributed process group is initialised")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        wait = datetime.timedelta(seconds=timeout)
        self.fg = _gloo_group(wait)  # every rank creates both groups, in the same order (new_group is collective)
        self.bg = _gloo_group(wait)
        self.timeout = timeout

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def gather(self, value: Any, group: Any) -> list[Any]:
        """Every rank's ``value``, on every rank (a collective on ``group``)."""
        out: list[Any] = [None] * self.world_size
        try:
            dist.all_gather_object(out, value, group=group)
        except (RuntimeError, ValueError) as exc:  # a rank died or timed out: gloo says so here
            raise RankFailedError(f"rank {self.rank}: another rank of the job stopped answering ({exc}); "
                                  "see that rank's log for its error") from exc
        return out

    def exchange(self, error: BaseException | None, value: Any, group: Any) -> list[Report]:
        """Every rank's outcome of a step (its error, if any, and ``value``), on every rank."""
        mine = Report(None if error is None else f"{type(error).__name__}: {error}",
                      isinstance(error, CorruptCheckpointError), value)
        return self.gather(mine, group)

    def agree(self, action: Callable[[], T], group: Any, what: str,
              public: Callable[[T], Any] | None = None) -> tuple[T, list[Any]]:
        """Run ``action`` on every rank; return its local result and every rank's ``public(result)``.

        If it fails on any rank, every rank raises: the failing rank its own error, the
        others RankFailedError naming the rank and its error.
        """
        result: Any = None
        error: BaseException | None = None
        try:
            result = action()
        except Exception as exc:  # any failure must reach the other ranks, or they would wait forever
            error = exc
        reports = self.exchange(error, None if error is not None or public is None else public(result), group)
        raise_failed(reports, error, what)
        return result, [r.value for r in reports]

    def from_leader(self, action: Callable[[], T], group: Any, what: str) -> T:
        """Run ``action`` on rank 0 only and hand its result (or its failure) to every rank."""
        _, values = self.agree(lambda: action() if self.leader else None, group, what, public=lambda v: v)
        return values[0]  # type: ignore[no-any-return]

    def any_true(self, flag: bool, group: Any) -> bool:
        return any(self.gather(bool(flag), group))

    def close(self) -> None:
        for group in (self.fg, self.bg):
            try:
                dist.destroy_process_group(group)
            except (RuntimeError, ValueError, AssertionError) as exc:  # the job's group may already be gone
                log.debug("could not destroy a savegame process group: %s", exc)


def _gloo_group(wait: datetime.timedelta, attempts: int = 2) -> Any:
    """A new gloo group of every rank. A connection reset while the ranks connect (seen once in many
    torchrun starts on a loaded machine, on every rank at once) is retried once, by every rank alike."""
    for attempt in range(attempts):
        try:
            return dist.new_group(backend="gloo", timeout=wait)
        except (RuntimeError, ValueError) as exc:
            network = type(exc).__name__ == "DistNetworkError"
            if network and attempt + 1 < attempts:
                log.warning("creating savegame's gloo process group failed (%s); trying once more", exc)
                continue
            raise SavegameError(f"could not create savegame's gloo process groups: {exc}; savegame needs "
                                "torch.distributed with the gloo backend (it ships with every torch) and the "
                                "ranks must reach each other over TCP") from exc
    raise AssertionError("unreachable")


def is_dtensor(value: Any) -> bool:
    """Whether ``value`` is a DTensor (without importing DTensor where torch lacks it)."""
    cls = type(value)
    return isinstance(value, torch.Tensor) and cls.__name__ == "DTensor" and "distributed" in cls.__module__
