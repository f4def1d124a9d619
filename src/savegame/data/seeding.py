"""Derived seeds and private random scopes: how the data pipeline owns its randomness.

Every random stream the pipeline uses is a pure function of the loader's seed
and a position (epoch, batch, worker slot), computed with :func:`derive`. Code
that may draw from the *global* generators (a user's sampler, ``__getitem__``,
``collate_fn``) runs inside a :class:`RngScope` in the main process: the
Python, NumPy and torch CPU generators are swapped for private ones on entry
and the caller's generators are put back, bit for bit, on exit. The model's
random streams (dropout, noise) therefore never see the data pipeline.
"""

from __future__ import annotations

import random
from contextlib import AbstractContextManager, nullcontext
from types import TracebackType
from typing import Any, Self

import numpy as np
import torch

_MASK = (1 << 64) - 1

# Purposes, mixed into derived seeds so that streams for different jobs never coincide.
BATCH = 1        # fetching and collating one map-style batch
SAMPLER = 2      # a user's sampler that draws from the global generators
ITER = 3         # calling iter() on an iterable dataset in one worker slot
BASE = 4         # torch's per-iterator base seed (worker_info.seed)
SLOT_BATCH = 5   # producing one batch of an iterable dataset in one worker slot


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def derive(seed: int, *parts: int) -> int:
    """A 64-bit seed that depends on ``seed`` and every part, in order (SplitMix64 chain)."""
    h = _splitmix64(seed & _MASK)
    for part in parts:
        h = _splitmix64(h ^ (part & _MASK))
    return h


def draw_seed(generator: torch.Generator | None = None) -> int:
    """One non-negative 63-bit seed drawn from ``generator`` (the global torch generator if None)."""
    return int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())


def reseed_globals(seed: int) -> None:
    """Seed this process's Python, NumPy and torch CPU generators from one 64-bit seed.

    Only the CPU torch generator is touched (never CUDA), so that the same call
    is safe in the main process inside a :class:`RngScope`.
    """
    seed &= _MASK
    random.seed(seed)
    np.random.seed([seed & 0xFFFFFFFF, seed >> 32])
    torch.default_generator.manual_seed(seed)


def _capture() -> tuple[Any, Any, torch.Tensor]:
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _apply(states: tuple[Any, Any, torch.Tensor]) -> None:
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])


class RngScope:
    """A private set of global generators, swapped in for the duration of a ``with`` block.

    Guarantee: the caller's Python, NumPy and torch CPU generator states after
    the block equal those before it, whatever the block draws or raises. With
    ``continues=True`` the scope's own streams continue across successive
    ``with`` blocks, as if the code inside them had run alone in a process
    seeded with ``seed``; otherwise every block starts from ``seed`` (cheaper:
    reading NumPy's state costs ~35 us).
    """

    __slots__ = ("_continues", "_own", "_saved", "_seed")

    def __init__(self, seed: int, *, continues: bool = False) -> None:
        self._seed, self._continues = seed, continues
        self._own: tuple[Any, Any, torch.Tensor] | None = None
        self._saved: tuple[Any, Any, torch.Tensor] | None = None

    def __enter__(self) -> Self:
        self._saved = _capture()
        if self._own is None:
            reseed_globals(self._seed)
        else:
            _apply(self._own)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        assert self._saved is not None
        if self._continues:
            self._own = _capture()
        _apply(self._saved)
        self._saved = None


def fetch_scope(seed: int) -> AbstractContextManager[Any]:
    """The generators for fetching one unit of data in whichever process runs it.

    In a worker process the globals are reseeded and used directly (a worker's
    streams belong to the data pipeline). In the main process (``num_workers=0``)
    the work runs in a fresh :class:`RngScope`, so the model's streams are untouched.
    Either way the unit sees generators seeded with ``seed``: the data is the same
    whichever process fetches it.
    """
    if torch.utils.data.get_worker_info() is not None:
        reseed_globals(seed)
        return nullcontext()
    return RngScope(seed)
