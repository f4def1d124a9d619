"""Page-locked host memory that savegame owns, outside torch's caching host allocator.

``torch.empty(..., pin_memory=True)`` takes memory from the caching host
allocator, which rounds every block up to a power of two and keeps freed
blocks pinned until the process ends: a 1.1 GiB data section would pin 2 GiB,
and a buffer replaced by a bigger one would stay pinned. A :class:`HostBuffer`
is instead an anonymous memory mapping of exactly the size asked for (rounded
up to a page), page-locked with ``cudaHostRegister`` (portable, so every
device's streams may copy into it) and unregistered by :meth:`HostBuffer.release`
or, failing that, when it is garbage-collected. Copies into it with
``non_blocking=True`` are then truly asynchronous, as into any pinned memory.

Registration is behind the small :class:`Pinner` protocol so tests can count
page-locked bytes on machines without a GPU.
"""

from __future__ import annotations

import logging
import mmap
import weakref
from typing import Protocol

import torch

log = logging.getLogger("savegame.engine.pinned")

PAGE = mmap.PAGESIZE
_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context, so for every device


class Pinner(Protocol):
    """Page-locks host memory and unlocks it again."""

    def register(self, address: int, nbytes: int) -> bool:
        """Page-lock ``nbytes`` at ``address``; False (after logging why) if that is impossible."""
        ...

    def unregister(self, address: int) -> None: ...


class CudaPinner:
    """``cudaHostRegister`` / ``cudaHostUnregister`` through torch's CUDA runtime bindings."""

    def register(self, address: int, nbytes: int) -> bool:
        try:
            err = int(torch.cuda.cudart().cudaHostRegister(address, nbytes, _PORTABLE))  # type: ignore[no-untyped-call]
        except (AssertionError, AttributeError, RuntimeError) as exc:  # a build without these runtime bindings
            log.warning("cannot page-lock staging memory (%s); device-to-host copies into it will not overlap", exc)
            return False
        if err:  # e.g. a small RLIMIT_MEMLOCK: the copies stay correct, only synchronous
            log.warning("could not page-lock %d bytes of staging memory (cudaError %d); "
                        "device-to-host copies into it will not overlap", nbytes, err)
            return False
        return True

    def unregister(self, address: int) -> None:
        err = int(torch.cuda.cudart().cudaHostUnregister(address))  # type: ignore[no-untyped-call]
        if err:
            log.warning("cudaHostUnregister failed with cudaError %d", err)


_CUDA = CudaPinner()


def cuda_pinner() -> Pinner:
    return _CUDA


def pages(nbytes: int) -> int:
    """``nbytes`` rounded up to whole pages: what page-locking ``nbytes`` costs."""
    return -(-nbytes // PAGE) * PAGE


class HostBuffer:
    """``nbytes`` of page-aligned host memory (``tensor``, uint8), page-locked by ``pinner`` if it can."""

    def __init__(self, nbytes: int, pinner: Pinner) -> None:
        self._map = mmap.mmap(-1, nbytes)  # anonymous: page-aligned, its own pages, zero until touched
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8)
        self.pinned_bytes = 0
        address = self.tensor.data_ptr()
        if pinner.register(address, nbytes):
            self.pinned_bytes = pages(nbytes)
            # also unregistered if never released (atexit off: the CUDA context may be gone by then)
            self._unregister = weakref.finalize(self, pinner.unregister, address)
            self._unregister.atexit = False

    def release(self) -> None:
        """Unlock the pages now; the memory itself goes when the last tensor viewing it does."""
        if self.pinned_bytes:
            self._unregister()
            self.pinned_bytes = 0
