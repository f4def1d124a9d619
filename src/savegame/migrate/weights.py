"""Model weight files in checkpoint directories: safetensors, torch ``.bin``, and sharded indexes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from savegame.errors import CorruptCheckpointError, StorageError
from savegame.migrate.files import Loader, read_json_object


def load_weights(file: Path, loader: Loader) -> tuple[dict[str, Any], list[str]]:
    """The state dict in ``file`` and the names of the files read for it (shards included)."""
    if file.name.endswith(".index.json"):
        return _sharded(file, loader)
    if file.suffix == ".safetensors":
        return loader.load_safetensors(file), [file.name]
    state = loader.load_torch(file)
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"{file} holds a {type(state).__name__}, not a model state dict")
    return state, [file.name]


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors on the CPU (the format holds no code: only a JSON header and bytes)."""
    try:
        return load_file(str(file), device="cpu")
    except (SafetensorError, ValueError) as exc:
        raise CorruptCheckpointError(f"{file} is not a readable safetensors file: {exc}") from exc
    except OSError as exc:
        raise StorageError(f"cannot read {file}: {exc}") from exc


def _sharded(index: Path, loader: Loader) -> tuple[dict[str, Any], list[str]]:
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CorruptCheckpointError(f"{index} is not a weight index: it has no weight_map object")
    try:
        shards = sorted(set(weight_map.values()))
    except TypeError as exc:  # unhashable or unorderable values: not shard file names
        raise CorruptCheckpointError(f"{index} names its shards with values that are not file names") from exc
    state: dict[str, Any] = {}
    for shard in shards:
        if not isinstance(shard, str) or Path(shard).name != shard or shard.endswith(".index.json"):
            raise CorruptCheckpointError(f"{index} names a shard outside its directory: {shard!r}")
        part, _ = load_weights(index.parent / shard, loader)
        state.update(part)
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise CorruptCheckpointError(f"{index} lists tensors no shard holds: {', '.join(missing[:10])}")
    return state, [index.name, *shards]
