"""The single extension point: anything with ``state_dict()`` / ``load_state_dict()``."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Stateful(Protocol):
    """The shape PyTorch itself uses for modules, optimizers, schedulers and scalers.

    ``state_dict()`` returns a nested structure of tensors, NumPy arrays and plain
    Python values (None, bool, int, float, str, bytes, tuple, list, dict, set,
    torch.dtype/device/Size); ``load_state_dict(state)`` takes such a structure back.
    """

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state_dict: Any, /) -> Any: ...
