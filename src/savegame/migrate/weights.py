"""Model weight files in checkpoint directories: safetensors, torch ``.bin``, and sharded indexes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from savegame.errors import CorruptCheckpointError, StorageError

#: Reads one torch.save file safely (safe_torch_load with the import's trust settings).
TorchLoader = Callable[[Path], Any]


def load_weights(file: Path, load_torch: TorchLoader) -> tuple[dict[str, Any], list[str]]:
    """The state dict in ``file`` and the names of the files read for it (shards included)."""
    if file.name.endswith(".index.json"):
        return _sharded(file, load_torch)
    if file.suffix == ".safetensors":
        return _safetensors(file), [file.name]
    state = load_torch(file)
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"{file} holds a {type(state).__name__}, not a model state dict")
    return state, [file.name]


def _safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file), device="cpu")
    except (SafetensorError, ValueError) as exc:
        raise CorruptCheckpointError(f"{file} is not a readable safetensors file: {exc}") from exc
    except OSError as exc:
        raise StorageError(f"cannot read {file}: {exc}") from exc


def _sharded(index: Path, load_torch: TorchLoader) -> tuple[dict[str, Any], list[str]]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptCheckpointError(f"{index} is not a readable weight index (weight_map): {exc}") from exc
    state: dict[str, Any] = {}
    for shard in shards:
        if not isinstance(shard, str) or Path(shard).name != shard or shard.endswith(".index.json"):
            raise CorruptCheckpointError(f"{index} names a shard outside its directory: {shard!r}")
        part, _ = load_weights(index.parent / shard, load_torch)
        state.update(part)
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise CorruptCheckpointError(f"{index} lists tensors no shard holds: {', '.join(missing[:10])}")
    return state, [index.name, *shards]
