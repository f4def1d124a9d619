"""Damaging checkpoints on purpose, through the reader's view of the format (not its JSON shape)."""

from __future__ import annotations

import os

from savegame import reader
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
