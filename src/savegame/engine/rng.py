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

from savegame.errors import CorruptCheckpointError, IncompatibleStateError

log = logging.getLogger("savegame.engine.rng")
_TORCH_STATE_BYTES = torch.get_rng_state().numel()
_MT_WORDS = 624  # NumPy's legacy MT19937 state: 624 uint32 words, then a position in 0..624


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


def check(state: Any) -> None:
    """Refuse (CorruptCheckpointError) an RNG state :func:`restore` could not set, before reading its data.

    Tensors may be stand-ins with a ``dtype`` and ``shape`` only: their bytes are checked by
    :func:`check_values` once read. The Python state, plain JSON, is tried on a scratch generator.
    """
    if state is None:
        return
    if not isinstance(state, dict):
        raise CorruptCheckpointError("the RNG state is not a mapping")
    for key, test in (("python", _check_python), ("numpy", _check_numpy), ("torch", _check_torch),
                      ("cuda", _check_cuda)):
        if key in state:
            problem = test(state[key])
            if problem:
                raise CorruptCheckpointError(f"the {key} RNG state is malformed: {problem}")


def _check_python(value: Any) -> str | None:
    try:
        random.Random().setstate(_python_state(value))
    except (TypeError, ValueError, OverflowError) as exc:
        return str(exc)
    return None


def _check_numpy(value: Any) -> str | None:
    if not (isinstance(value, tuple) and len(value) == 5 and type(value[0]) is str and value[0] == "MT19937"):
        return "expected ('MT19937', keys, pos, has_gauss, cached_gaussian)"
    _, keys, pos, has_gauss, gauss = value
    if _dtype_shape(keys) not in ((torch.uint32, (_MT_WORDS,)), (np.dtype(np.uint32), (_MT_WORDS,))):
        return f"keys must be {_MT_WORDS} uint32 words"
    if type(pos) is not int or not 0 <= pos <= _MT_WORDS or type(has_gauss) is not int or has_gauss not in (0, 1):
        return "bad position or has_gauss"
    if type(gauss) is not float:
        return "cached_gaussian must be a float"
    return None


def _check_torch(value: Any) -> str | None:
    if _dtype_shape(value) != (torch.uint8, (_TORCH_STATE_BYTES,)):
        return f"expected a uint8 tensor of {_TORCH_STATE_BYTES} bytes"
    return None


def _check_cuda(value: Any) -> str | None:
    if not isinstance(value, list):
        return "expected a list of tensors"
    if not all(_dtype_shape(v)[0] is torch.uint8 and len(_dtype_shape(v)[1]) == 1 for v in value):
        return "expected 1-D uint8 tensors"
    return None


def _dtype_shape(value: Any) -> tuple[Any, tuple[int, ...]]:
    """(dtype, shape) of a tensor, an array, or a stand-in for one; (None, ()) for anything else."""
    dtype, shape = getattr(value, "dtype", None), getattr(value, "shape", None)
    if isinstance(value, (str, bytes, int, float)) or dtype is None or not isinstance(shape, tuple | torch.Size):
        return None, ()
    return dtype, tuple(shape)


def check_values(state: Any) -> None:
    """Refuse (CorruptCheckpointError) a torch RNG state, checked by :func:`check` and now read, whose
    bytes torch rejects (tried on a scratch generator: the global one is untouched). NumPy accepts
    any 624 uint32 words, which :func:`check` already made sure of."""
    value = state.get("torch") if isinstance(state, dict) else None
    if not isinstance(value, torch.Tensor) or value.is_meta:  # meta: no bytes to check
        return
    try:
        torch.Generator().set_state(_cpu_bytes(value))
    except RuntimeError as exc:
        raise CorruptCheckpointError(f"the torch RNG state is invalid: {exc}") from exc


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
