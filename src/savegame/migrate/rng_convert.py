"""Foreign RNG states -> exactly the values savegame's state tree holds (see docs/design.md).

python: the tuple ``random.getstate()`` returns; numpy: the legacy tuple
``('MT19937', uint32[624], pos, has_gauss, cached_gaussian)``; torch: a uint8 CPU
tensor; cuda: a list of uint8 CPU tensors. A malformed state raises
CorruptCheckpointError naming the foreign key, because restoring it would fail
later, far from its cause. A well-formed state of a generator savegame does not
track (a ``numpy.random.default_rng`` Generator: PCG64, Philox, ...) raises
:class:`Untracked`, and the import leaves it out with that reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from savegame.errors import CorruptCheckpointError

_MT_WORDS = 624
_OTHER_BIT_GENERATORS = ("PCG64", "PCG64DXSM", "Philox", "SFC64")


class Untracked(Exception):
    """A valid state of a generator savegame does not restore; the message says what it is."""


def python_state(value: Any, key: str) -> tuple[Any, ...]:
    if (isinstance(value, (tuple, list)) and len(value) == 3 and isinstance(value[1], (tuple, list))
            and type(value[0]) is int and all(type(w) is int for w in value[1])
            and (value[2] is None or isinstance(value[2], float))):
        return (value[0], tuple(value[1]), value[2])
    raise CorruptCheckpointError(f"{key} is not a Python random state (version, internal state, gauss)")


NumpyState = tuple[str, "np.ndarray[Any, np.dtype[np.uint32]]", int, int, float]


def numpy_state(value: Any, key: str) -> NumpyState:
    """Accepts the legacy tuple and the dict of ``get_state(legacy=False)`` / ``bit_generator.state``."""
    if isinstance(value, Mapping):
        inner = value.get("state")
        kind = value.get("bit_generator")
        if kind in _OTHER_BIT_GENERATORS and isinstance(inner, Mapping):
            raise Untracked(f"a NumPy {kind} state, as numpy.random.default_rng() keeps: savegame restores the "
                            "global legacy generator (np.random, MT19937) only; save and restore your Generator "
                            "yourself, e.g. as part of a Stateful object")
        if kind != "MT19937" or not isinstance(inner, Mapping):
            raise CorruptCheckpointError(f"{key} is not an MT19937 NumPy random state")
        value = ("MT19937", inner.get("key"), inner.get("pos"), value.get("has_gauss", 0), value.get("gauss", 0.0))
    if not (isinstance(value, (tuple, list)) and len(value) == 5 and value[0] == "MT19937"):
        raise CorruptCheckpointError(f"{key} is not a NumPy random state ('MT19937', key, pos, has_gauss, gauss)")
    words = np.asarray(value[1])
    if words.shape != (_MT_WORDS,) or words.dtype.kind not in "iu":
        raise CorruptCheckpointError(f"{key} does not hold {_MT_WORDS} integer MT19937 words")
    try:
        pos, has_gauss, gauss = int(value[2]), int(value[3]), float(value[4])
    except (TypeError, ValueError) as exc:
        raise CorruptCheckpointError(f"{key} has a malformed position or cached gaussian: {exc}") from exc
    return ("MT19937", np.ascontiguousarray(words, dtype=np.uint32), pos, has_gauss, gauss)


def torch_state(value: Any, key: str) -> torch.Tensor:
    """A fresh uint8 CPU tensor, whichever device the foreign tool saved it from."""
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
        raise CorruptCheckpointError(f"{key} is not a torch RNG state (a 1-D uint8 tensor)")
    return value.detach().to("cpu").clone(memory_format=torch.contiguous_format)


def cuda_states(value: Any, key: str) -> list[torch.Tensor]:
    """A list of CPU states: None means none saved; a single tensor is device 0's."""
    if value is None:
        return []
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return [torch_state(value, key)]
    if isinstance(value, (list, tuple)):
        return [torch_state(v, f"{key}[{i}]") for i, v in enumerate(value)]
    raise CorruptCheckpointError(f"{key} is not a list of CUDA RNG states")
