"""Capture and restore of every global random generator: Python, NumPy, torch CPU and CUDA.

Restored tensors are moved to the CPU before ``set_rng_state`` (which requires
a CPU ByteTensor) whatever device they were saved from or mapped to, so a
checkpoint saved on a CUDA machine restores on a CPU-only one: the CUDA states
are then skipped with a log message.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

from savegame.errors import IncompatibleStateError

log = logging.getLogger("savegame.rng")


def capture() -> dict[str, Any]:
    """The current state of every global generator (CUDA only if CUDA was initialised)."""
    cuda: list[torch.Tensor] = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        cuda = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=True),
        "torch": torch.get_rng_state(),
        "cuda": cuda,
    }


def restore(state: Any) -> None:
    """Set every generator present in ``state``; raise IncompatibleStateError if one is malformed."""
    if not isinstance(state, dict):
        raise IncompatibleStateError("the checkpoint's RNG state is not a mapping; it cannot be restored")
    try:
        if "python" in state:
            random.setstate(_python_state(state["python"]))
        if "numpy" in state:
            np.random.set_state(state["numpy"])
        if "torch" in state:
            torch.set_rng_state(_cpu_bytes(state["torch"]))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise IncompatibleStateError(f"the checkpoint's RNG state could not be restored: {exc}") from exc
    _restore_cuda(state.get("cuda") or [])


def _python_state(value: Any) -> tuple[Any, ...]:
    if not (isinstance(value, tuple) and len(value) == 3 and isinstance(value[1], (tuple, list))):
        raise TypeError("Python random state must be (version, internal state, gauss)")
    return (value[0], tuple(value[1]), value[2])


def _cpu_bytes(value: Any) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"RNG state must be a tensor, got {type(value).__name__}")
    # A fresh tensor: set_rng_state reads the storage from its start, ignoring a view's offset,
    # and tensors read from a checkpoint are views into one file buffer.
    return value.detach().to(device="cpu", dtype=torch.uint8).clone(memory_format=torch.contiguous_format)


def _restore_cuda(states: list[Any]) -> None:
    if not states:
        return
    if not torch.cuda.is_available():
        log.info("checkpoint holds %d CUDA RNG state(s); no CUDA here, so they are not restored", len(states))
        return
    count = torch.cuda.device_count()
    if count != len(states):
        log.warning("checkpoint holds %d CUDA RNG states but %d devices are visible; restoring the first %d",
                    len(states), count, min(count, len(states)))
    for index, value in enumerate(states[:count]):
        torch.cuda.set_rng_state(_cpu_bytes(value), index)
