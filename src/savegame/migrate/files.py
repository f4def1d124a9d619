"""Reading the files of foreign checkpoint directories: the loader protocol, JSON documents, listings.

OS errors become StorageError and malformed JSON (deeply nested JSON included,
which makes Python's parser raise RecursionError) becomes CorruptCheckpointError,
each naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import torch

from savegame.errors import CorruptCheckpointError, StorageError


class Loader(Protocol):
    """Reads the data files of one import safely, with its settings (trust, byte budget, progress)."""

    def load_torch(self, file: Path) -> Any:
        """A torch.save file (safe_torch_load)."""

    def load_pickle(self, file: Path) -> Any:
        """A plain pickle (restricted_unpickle)."""

    def load_safetensors(self, file: Path) -> dict[str, torch.Tensor]:
        """A safetensors file, onto the CPU."""


def read_json(file: Path) -> Any:
    """The JSON value in ``file``."""
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise StorageError(f"cannot read {file}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise CorruptCheckpointError(f"{file} is not UTF-8 text: {exc}") from exc
    try:
        return json.loads(text)
    except RecursionError as exc:
        raise CorruptCheckpointError(f"{file} nests its JSON too deeply to read; the file is damaged or "
                                     "forged") from exc
    except ValueError as exc:
        raise CorruptCheckpointError(f"{file} is not valid JSON: {exc}") from exc


def read_json_object(file: Path) -> dict[str, Any]:
    """The JSON object in ``file``; CorruptCheckpointError for any other JSON value."""
    data = read_json(file)
    if not isinstance(data, dict):
        raise CorruptCheckpointError(f"{file} does not hold a JSON object")
    return data


def list_dir(directory: Path) -> list[str]:
    """The names in ``directory``, sorted."""
    try:
        return sorted(p.name for p in directory.iterdir())
    except OSError as exc:
        raise StorageError(f"cannot list {directory}: {exc}") from exc
