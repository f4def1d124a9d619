"""Flatten a loaded tree into tensors and plain values by key path, to compare with the stored expectation."""

from __future__ import annotations

from typing import Any

import torch


def flatten(tree: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, Any] = {}

    def walk(value: Any, path: str) -> None:
        if isinstance(value, torch.Tensor):
            tensors[path] = value.contiguous()
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{path}/{k}")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{path}[{i}]")
        else:
            values[path] = value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)

    walk(tree, prefix)
    return tensors, values
