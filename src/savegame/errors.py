"""The one closed error hierarchy of savegame.

Every failure the library reports is a :class:`SavegameError`. OS, JSON, torch
and safetensors exceptions are translated at the boundary where they happen,
with the path involved and what to do about it in the message; the original
exception is kept as ``__cause__``.
"""

from __future__ import annotations


class SavegameError(Exception):
    """Base class of every error savegame raises."""


class ConfigurationError(SavegameError, ValueError):
    """A bad argument: the message names the argument and the accepted values."""


class CheckpointNotFoundError(SavegameError, LookupError):
    """The requested checkpoint (step, alias or path) does not exist."""


class CorruptCheckpointError(SavegameError):
    """A checkpoint failed verification: a checksum, a size or the manifest is wrong."""


class IncompatibleStateError(SavegameError):
    """A checkpoint does not fit the objects it is restored into (keys, shapes, sizes)."""


class UnsupportedValueError(SavegameError, TypeError):
    """A value in the state cannot be stored exactly; the message names its key path."""


class UnsafeCheckpointError(SavegameError):
    """A foreign file would need code execution (a pickle global outside the allowlist) to load."""


class NonFiniteStateError(SavegameError, ValueError):
    """nan_policy="refuse": a metric or a floating-point tensor of the state is NaN or inf; nothing was saved."""


class StorageError(SavegameError, OSError):
    """Reading or writing the storage failed (full disk, I/O error, permissions)."""


class RunLockedError(SavegameError):
    """Another process already writes to this run directory."""


__all__ = [
    "CheckpointNotFoundError",
    "ConfigurationError",
    "CorruptCheckpointError",
    "IncompatibleStateError",
    "NonFiniteStateError",
    "RunLockedError",
    "SavegameError",
    "StorageError",
    "UnsafeCheckpointError",
    "UnsupportedValueError",
]


class RankFailedError(SavegameError):
    """Another rank of a distributed job failed (or stopped answering in) a step every rank takes together;
    the message names the rank and its error. Every rank raises, none waits forever."""


class RankDamagedError(CorruptCheckpointError):
    """Another rank of a distributed job found its part of a checkpoint damaged: every rank skips it together."""
