"""Checksums of checkpoint bytes: xxh3-64 since format v2, CRC-32 in format v1 files.

xxh3-64 hashes at memory speed (about 25 GB/s on one core here, 6x zlib's
CRC-32), so verifying every byte of a restore costs a fraction of copying it.
It is not cryptographic: it detects damage, not tampering; loading is safe
anyway because nothing in a checkpoint is executable.

A checksum value is what the manifest stores: a 16-digit lowercase hex string
for xxh3-64, an int for CRC-32. :class:`Algorithm` hides which one is in use.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Protocol

import xxhash

from savegame.errors import CorruptCheckpointError

XXH3_64 = "xxh3_64"
XXH3_128 = "xxh3_128"  # format v4: an entry's checksum is also its content identity in the run's content store
CRC32 = "crc32"
WIDTH = {XXH3_64: 16, XXH3_128: 32}  # hex digits of a stored value

Value = str | int


class Running(Protocol):
    """A checksum being computed over consecutive chunks."""

    def update(self, data: memoryview | bytes) -> None: ...

    def value(self) -> Value: ...


class Algorithm:
    """One checksum algorithm: a whole-buffer function and a streaming one."""

    def __init__(self, name: str) -> None:
        if name not in (XXH3_64, XXH3_128, CRC32):
            raise CorruptCheckpointError(f"unknown checksum algorithm {name!r} in checkpoint")
        self.name = name
        # the whole-buffer function itself, for loops over many small entries
        self.function: Callable[[memoryview | bytes], Value] = (
            xxhash.xxh3_64_hexdigest if name == XXH3_64 else
            xxhash.xxh3_128_hexdigest if name == XXH3_128 else zlib.crc32
        )

    def of(self, data: memoryview | bytes) -> Value:
        return self.function(data)

    def running(self) -> Running:
        return _Crc32() if self.name == CRC32 else _Xxh3(self.name == XXH3_128)

    def is_value(self, value: object) -> bool:
        """Whether ``value`` has the shape of a stored checksum of this algorithm."""
        if self.name in WIDTH:
            return type(value) is str and len(value) == WIDTH[self.name]
        return type(value) is int and 0 <= value < 2**32


class _Xxh3:
    def __init__(self, wide: bool = False) -> None:
        self._h: xxhash.xxh3_64 | xxhash.xxh3_128 = xxhash.xxh3_128() if wide else xxhash.xxh3_64()

    def update(self, data: memoryview | bytes) -> None:
        self._h.update(data)

    def value(self) -> Value:
        return self._h.hexdigest()


class _Crc32:
    def __init__(self) -> None:
        self._crc = 0

    def update(self, data: memoryview | bytes) -> None:
        self._crc = zlib.crc32(data, self._crc)

    def value(self) -> Value:
        return self._crc


CURRENT = Algorithm(XXH3_64)
CONTENT = Algorithm(XXH3_128)  # of incremental (v4) checkpoints: checksum and content identity at once
