"""Damaging checkpoints on purpose, through the reader's view of the format (not its JSON shape)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from savegame.engine import reader
from savegame.format import manifest
from savegame.format import names as n
from savegame.format.tensorfile import read_header
from savegame.storage import LocalStorage


def data_byte(ckpt_dir: str | os.PathLike[str], entry: int = 0) -> tuple[str, int]:
    """(tensor file path, absolute offset) of the first byte of ``entry`` of a checkpoint."""
    ckpt_dir = os.fspath(ckpt_dir)
    storage = LocalStorage(os.path.dirname(ckpt_dir))
    doc = reader.read_manifest(storage, os.path.basename(ckpt_dir))
    entries = doc[n.M_ENTRIES]
    path = os.path.join(ckpt_dir, doc[n.M_FILES][entries[n.E_FILE][entry]])
    with open(path, "rb") as f:
        start, _ = read_header(f, os.path.getsize(path), path)
    return path, start + entries[n.E_START][entry]


def flip_data_byte(ckpt_dir: str | os.PathLike[str], entry: int = 0) -> None:
    """Invert the first data byte of ``entry`` (the checkpoint then fails verification)."""
    path, offset = data_byte(ckpt_dir, entry)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def rewrite_manifest(ckpt_dir: str | os.PathLike[str], mutate: Callable[[dict[str, Any]], None]) -> None:
    """Let ``mutate`` change the manifest as stored (compact JSON: a column of equal values may be one
    value), then write it back with a valid checksum: only the content is hostile, not the bytes."""
    path = os.path.join(os.fspath(ckpt_dir), n.MANIFEST)
    with open(path, "rb") as f:
        doc = json.loads(f.read())
    doc.pop(n.M_CHECKSUM)
    mutate(doc)
    with open(path, "wb") as f:
        f.write(manifest.dumps(doc))


def set_entry(doc: dict[str, Any], column: str, entry: int, value: Any) -> None:
    """Set one cell of the manifest's entry table (expanding a column stored as one value)."""
    cells = doc[n.M_ENTRIES][column]
    if not isinstance(cells, list):
        cells = [cells] * len(doc[n.M_ENTRIES][n.E_START])
    cells[entry] = value
    doc[n.M_ENTRIES][column] = cells


def entry_at(doc: dict[str, Any], *path: str | int) -> int:
    """The entry number of the tensor or array at ``path`` in the manifest's encoded tree."""
    node = doc[n.M_TREE]
    for key in path:
        node = node[key]
    return doc[n.M_TENSORS][n.T_ENTRY][node.get("$t", node.get("$nd"))]
