"""``nan_policy="refuse"``: find a NaN or infinity in metrics or in the floating-point tensors of a state."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from savegame.errors import NonFiniteStateError


def _floating(tree: Any, path: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() or tree.is_complex():
            yield path, tree.detach()
    elif isinstance(tree, np.ndarray):
        if tree.dtype.kind in "fc":
            yield path, torch.from_numpy(np.ascontiguousarray(tree))
    elif isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from _floating(value, f"{path}.{key}" if path else str(key))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from _floating(value, f"{path}[{i}]")


def first_non_finite(tree: Any) -> str | None:
    """The key path of the first floating-point tensor or array holding NaN or inf, or None.

    One device synchronisation per device when everything is finite.
    """
    found = list(_floating(tree, ""))
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for _, tensor in found:
        by_device.setdefault(tensor.device, []).append(torch.isfinite(tensor).all())
    if all(bool(torch.stack(flags).all()) for flags in by_device.values()):
        return None
    return next(path for path, tensor in found if not bool(torch.isfinite(tensor).all()))


def refuse_non_finite_metrics(metrics: Mapping[str, float]) -> None:
    bad = next((k for k, v in metrics.items() if not math.isfinite(v)), None)
    if bad is not None:
        _refuse(f"metric {bad!r} = {metrics[bad]}")


def refuse_non_finite_state(state: Any) -> None:
    path = first_non_finite(state)
    if path is not None:
        _refuse(f"state {path!r}")


def _refuse(where: str) -> None:
    raise NonFiniteStateError(f"{where} is not finite (NaN or inf) and nan_policy='refuse': this state is not "
                                "saved; earlier checkpoints are untouched")
