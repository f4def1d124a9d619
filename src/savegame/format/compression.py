"""Per-entry lossless compression (format v5): zstd, optionally after byte grouping.

An entry is stored compressed only where that pays (:data:`PAYS`); otherwise its bytes
are stored as they are. Elements wider than a byte may be *byte-grouped* first (byte 0 of
every element, then byte 1, ...), which puts the exponent bytes of floats side by side;
a sample of the entry decides whether grouping compresses better.

Reading trusts nothing: the declared raw length must be one zstd can produce from the
stored bytes (:data:`MAX_EXPANSION`, checked by :mod:`savegame.format.manifest` before
anything is allocated), the frame must declare exactly that content size (zstandard
allocates what a frame declares), and the output must have exactly that length. Every
failure is a :class:`~savegame.errors.CorruptCheckpointError`, never a zstd exception.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import numpy as np

from savegame.errors import ConfigurationError, CorruptCheckpointError
from savegame.format import names as n

LEVEL = 1  # level 3 was slower everywhere and compressed no better (BENCHMARKS.md)
PAYS = 0.97  # stored compressed only when that saves at least 3%
MIN_BYTES = 4096  # smaller entries are stored raw: a frame's overhead and a call's cost buy nothing there
SAMPLE = 256 << 10  # the bytes compressed both ways to decide on byte grouping
MAX_EXPANSION = (128 << 10) // 4
"""The most raw bytes one stored byte can stand for. A zstd block regenerates at most 128 KiB
and takes at least 4 bytes (a 3-byte header and one RLE byte); frame headers only add bytes."""
INSTALL = "pip install 'savegame[zstd]'"


def zstd() -> ModuleType:
    """The ``zstandard`` module; ConfigurationError saying how to install it when it is missing."""
    try:
        import zstandard
    except ImportError as exc:
        raise ConfigurationError(f"compression='zstd', and reading compressed checkpoints, need the zstandard "
                                 f"package: {INSTALL}") from exc
    return zstandard


def compressed(entries: Mapping[str, Any]) -> list[int]:
    """The entries of a (validated) manifest's entry table stored with a codec other than raw."""
    codecs = entries.get(n.E_CODEC)
    if codecs is None:
        return []
    return [e for e, codec in enumerate(codecs) if codec != n.CODEC_RAW]


class Packer:
    """Compresses entries, in one thread (zstandard's compressors are not shared between threads)."""

    def __init__(self) -> None:
        self._c = zstd().ZstdCompressor(level=LEVEL)  # writes the content size: readers check it

    def pack(self, data: memoryview, itemsize: int) -> tuple[str, memoryview | bytes]:
        """(codec, stored bytes) for an entry's raw bytes ``data`` of elements of ``itemsize`` bytes."""
        size = len(data)
        if size < MIN_BYTES:
            return n.CODEC_RAW, data
        codec, blob = n.CODEC_ZSTD, None
        if itemsize > 1 and size % itemsize == 0:  # byte grouping, where a sample compresses better with it
            sample = data[:SAMPLE - SAMPLE % itemsize]
            plain, grouped = self._c.compress(sample), self._c.compress(group(sample, itemsize))
            if len(grouped) < len(plain):
                codec = n.CODEC_ZSTD_GROUPED
            if len(sample) == size:  # the sample was the whole entry
                blob = grouped if codec == n.CODEC_ZSTD_GROUPED else plain
        if blob is None:
            blob = self._c.compress(group(data, itemsize) if codec == n.CODEC_ZSTD_GROUPED else data)
        if len(blob) >= PAYS * size:
            return n.CODEC_RAW, data
        return codec, blob


def group(data: memoryview | bytes, itemsize: int) -> memoryview:
    """The bytes of ``data`` grouped by place in their element: byte 0 of every element, then byte 1, ..."""
    raw = np.frombuffer(data, dtype=np.uint8)
    return np.ascontiguousarray(raw.reshape(-1, itemsize).T).reshape(-1).data


def check_bound(stored: int, raw: int) -> bool:
    """Whether ``stored`` bytes of zstd can hold ``raw`` bytes at all (see :data:`MAX_EXPANSION`)."""
    return raw <= stored * MAX_EXPANSION


def unpack_into(codec: str, blob: bytes | memoryview, raw: int, itemsize: int, address: int, where: str) -> None:
    """Decompress an entry's stored bytes ``blob`` into the ``raw`` bytes of memory at ``address``.

    The blob's checksum has been checked by the caller (or checking was turned off).
    """
    if codec not in (n.CODEC_ZSTD, n.CODEC_ZSTD_GROUPED) or not check_bound(len(blob), raw):
        raise CorruptCheckpointError(f"{where}: entry cannot be decoded ({codec!r}, {len(blob)} -> {raw} bytes)")
    z = zstd()
    try:
        declared = z.get_frame_parameters(blob).content_size
        if declared != raw:  # (zstandard would allocate whatever the frame declares)
            raise CorruptCheckpointError(f"{where}: a compressed entry declares {declared} bytes, not {raw}")
        out = z.ZstdDecompressor().decompress(blob, max_output_size=raw)
    except (z.ZstdError, ValueError, MemoryError) as exc:
        raise CorruptCheckpointError(f"{where}: a compressed entry does not decompress ({exc})") from None
    if len(out) != raw:
        raise CorruptCheckpointError(f"{where}: a compressed entry holds {len(out)} bytes, not {raw}")
    if not raw:
        return
    if codec == n.CODEC_ZSTD:
        ctypes.memmove(address, out, raw)
        return
    if raw % itemsize:
        raise CorruptCheckpointError(f"{where}: a byte-grouped entry of {raw} bytes is not whole elements")
    dest = np.ctypeslib.as_array((ctypes.c_uint8 * raw).from_address(address))
    dest.reshape(-1, itemsize)[:] = np.frombuffer(out, dtype=np.uint8).reshape(itemsize, -1).T
