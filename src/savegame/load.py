"""``savegame.load``: everything in a checkpoint as a read-only nested dict, no model needed."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

import torch

from savegame.engine import reader
from savegame.errors import (
    CheckpointNotFoundError,
    ConfigurationError,
    CorruptCheckpointError,
)
from savegame.format import names as n
from savegame.run import listing
from savegame.run.directory import RunDir
from savegame.storage.base import Storage
from savegame.storage.local import LocalStorage
from savegame.storage.urls import is_url, join


class FrozenDict(dict[str, Any]):
    """A dict that refuses changes: what ``load`` returns describes a file, not live state."""

    def _refuse(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError("savegame.load() returns a read-only tree; copy it (dict(tree)) to change it")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _refuse


def load(path: str | os.PathLike[str], *, which: int | str | None = None,
         map_location: str | torch.device | None = None, verify: bool | None = None,
         mmap: bool = False, storage_options: Mapping[str, Any] | None = None) -> FrozenDict:
    """Read a checkpoint (a checkpoint directory, its manifest, or a run directory for its newest).

    ``which`` picks a checkpoint of a run directory as ``Checkpointer.restore`` does:
    "latest", "best", "best:<metric>" or a step; ``path`` may also be an address,
    ``"runs/x@best:val_loss"``. Paths may be URLs of object stores (``s3://bucket/runs/x``), with
    ``storage_options`` for fsspec (see docs/storage.md).

    Returns ``{"step", "epoch", "metrics", "extra", "time", "savegame_version",
    "torch_version", "state", "rng", "run", "types", "ranks"}`` (``types``: the class of
    each state's object, None where a checkpoint does not record them). Tensors
    are on the CPU unless ``map_location`` says otherwise. Never executes code:
    the format holds no pickle.

    A checkpoint of a distributed job (format v3) reads as rank 0 would restore it:
    ``state`` holds the shared states (tensors stored in chunks by several ranks come
    back whole) and rank 0's own, ``rng`` is rank 0's. ``ranks`` lists every rank's
    own part, ``{"rng": ..., "state": {...}}`` (its RNG states and the states saved
    per rank, such as data loaders), indexed by rank; it is None for a checkpoint
    written by a single process.

    ``mmap=True`` maps tensor files lazily: tensors are views of the files, and
    only the pages you touch are read; tensors stored compressed (``compression="zstd"``)
    are decompressed into tensors of their own instead. ``verify`` (checking every byte against its
    checksum) defaults to True, and to False with ``mmap=True``, where it would
    read every page; the manifest and the tensor file headers are always checked.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigurationError(f"load() takes a checkpoint or run directory path, got {type(path).__name__}")
    for arg, value in (("verify", verify), ("mmap", mmap)):
        if value is not None and not isinstance(value, bool):
            raise ConfigurationError(f"{arg} must be True or False, got {value!r}")
    verify = not mmap if verify is None else verify
    found = listing.checkpoint_path(path, which, storage_options)
    storage, name = listing.locate_url(found, storage_options) if is_url(found) else _locate(Path(found))
    doc = reader.read_manifest(storage, name)
    where = join(storage.root, name)
    try:
        meta = reader.decode_meta(doc)
        tree = reader.read_tree(storage, name, doc, verify=verify, map_location=map_location, mmap=mmap)
    except CorruptCheckpointError as exc:
        raise CorruptCheckpointError(exc.args[0] if where in str(exc) else f"{where}: {exc}") from exc
    out = {**meta, "savegame_version": doc.get(n.M_SAVEGAME_VERSION), "torch_version": doc.get(n.M_TORCH_VERSION),
           **{k: tree.get(k) for k in (n.TREE_STATE, n.TREE_RNG, n.TREE_RUN, n.TREE_TYPES, n.M_RANKS)}}
    frozen: FrozenDict = _freeze(out)
    return frozen


def _locate(path: Path) -> tuple[Storage, str]:
    if path.name == n.MANIFEST:
        path = path.parent
    if (path / n.MANIFEST).is_file():
        return LocalStorage(str(path.parent)), path.name
    if path.is_dir() and RunDir(LocalStorage(str(path))).names():
        newest = Path(listing.resolve(path, "latest"))  # commit order; a damaged newest one is skipped
        return LocalStorage(str(newest.parent)), newest.name
    raise CheckpointNotFoundError(f"{os.fspath(path)!r} is not a savegame checkpoint or a run directory with one")


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return FrozenDict((k, _freeze(v)) for k, v in value.items())
    if isinstance(value, list):
        return [_freeze(v) for v in value]
    return value
