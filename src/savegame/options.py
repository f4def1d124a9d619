"""The Checkpointer's keyword options, validated in one place at construction.

Every check raises ConfigurationError naming the argument, the value it got and what
it accepts, before anything touches the run directory.
"""

from __future__ import annotations

import math
import numbers
import os
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from savegame.errors import ConfigurationError
from savegame.format import compression as compression_module
from savegame.policies import EarlyStopping, parse_best_spec
from savegame.storage.base import Storage

NAN_POLICIES = ("allow", "refuse")
_STORAGE_METHODS = ("create", "open_read", "size", "read_bytes", "exists", "append", "makedirs", "list_dir",
                    "rename", "remove", "remove_tree", "fsync_dir")


@dataclass(frozen=True)
class Options:
    async_save: bool = True
    keep_last: int | None = None
    keep_every: int | None = None
    best: Mapping[str, str] | Sequence[str] | str | None = None
    best_k: int = 1
    early_stopping: EarlyStopping | None = None
    name_format: str | None = None
    every_steps: int | None = None
    every_seconds: float | None = None
    save_on_signals: int | Sequence[int] = ()
    nan_policy: str = "allow"
    verify: bool = True
    shard_bytes: int = 1 << 30
    storage: Storage | None = None
    fresh: bool = False
    per_rank: Sequence[str] = ()
    collective_timeout: float = 300.0
    incremental: bool = False
    compression: str | None = None
    modes: dict[str, str] = field(init=False)
    signals: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        for arg in ("async_save", "verify", "fresh", "incremental"):
            check_bool(getattr(self, arg), arg)
        for arg in ("keep_last", "keep_every", "every_steps"):
            value = getattr(self, arg)
            object.__setattr__(self, arg, None if value is None else as_int(value, arg, minimum=1))
        object.__setattr__(self, "best_k", as_int(self.best_k, "best_k", minimum=1))
        object.__setattr__(self, "shard_bytes", as_int(self.shard_bytes, "shard_bytes", minimum=1))
        object.__setattr__(self, "modes", parse_best_spec(self.best))
        object.__setattr__(self, "signals", _signals(self.save_on_signals))
        if self.early_stopping is not None and not isinstance(self.early_stopping, EarlyStopping):
            raise ConfigurationError(
                f"early_stopping must be a savegame.EarlyStopping or None, got {type(self.early_stopping).__name__}")
        if self.nan_policy not in NAN_POLICIES:
            raise ConfigurationError(f"nan_policy must be 'allow' or 'refuse', got {self.nan_policy!r}")
        _check_seconds(self.every_seconds)
        _check_name_format(self.name_format)
        _check_storage(self.storage)
        _check_per_rank(self.per_rank)
        _check_compression(self.compression)
        _check_seconds(self.collective_timeout, "collective_timeout")
        if self.collective_timeout is None:
            raise ConfigurationError("collective_timeout must be a number of seconds > 0, got None")


def check_bool(value: object, arg: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigurationError(f"{arg} must be True or False, got {value!r}")
    return value


MAX_INT = 2**63 - 1
"""The largest step, epoch or count: what a signed 64-bit integer holds (as torch and most tools read it)."""


def as_int(value: object, arg: str, *, minimum: int = 0) -> int:
    """An integer argument: any int-like number (Python, NumPy, a 0-dim integer tensor), not a bool,
    from ``minimum`` to :data:`MAX_INT`."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point() \
            and not value.is_complex() and value.dtype is not torch.bool:
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not minimum <= int(value) <= MAX_INT:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ConfigurationError(f"{arg} must be {kind} and at most 2**63 - 1, got {_brief(value)}")
    return int(value)


def _brief(value: object) -> str:
    """``repr(value)`` for a message; an int past Python's 4,300-digit str limit has none."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and abs(int(value)).bit_length() > 64:
        return f"an int of {abs(int(value)).bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def run_path(run_dir: object) -> str:
    if not isinstance(run_dir, (str, os.PathLike)):
        raise ConfigurationError(f"run_dir must be a path (str or os.PathLike), got {type(run_dir).__name__}")
    path = os.fspath(run_dir)
    if not isinstance(path, str) or not path or "\0" in path:
        raise ConfigurationError(f"run_dir must be a non-empty text path without NUL characters, got {run_dir!r}")
    return path


def _signals(value: int | Sequence[int]) -> tuple[int, ...]:
    items = (value,) if isinstance(value, int) else value
    if not isinstance(items, Sequence) or isinstance(items, (str, bytes)):
        raise ConfigurationError(
            f"save_on_signals must be a signal or a sequence of signals, e.g. (signal.SIGTERM,), got {value!r}")
    for sig in items:
        if isinstance(sig, bool) or not isinstance(sig, int):
            raise ConfigurationError(f"save_on_signals: {sig!r} is not a signal number such as signal.SIGTERM")
    return tuple(items)


def _check_seconds(value: object, arg: str = "every_seconds") -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < float(value) < math.inf:
        raise ConfigurationError(f"{arg} must be a positive number of seconds, got {value!r}")


def _check_name_format(name_format: object) -> None:
    if name_format is None:
        return
    if not isinstance(name_format, str):
        raise ConfigurationError(f"name_format must be a str template such as 'e{{epoch:03d}}', got {name_format!r}")
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(name_format) if name is not None]
    except ValueError as exc:
        raise ConfigurationError(f"name_format {name_format!r} is not a valid template: {exc}") from exc
    for _, name, spec, conversion in string.Formatter().parse(name_format):
        if conversion not in (None, "r", "s", "a"):
            raise ConfigurationError(f"name_format {name_format!r}: unknown conversion '!{conversion}' "
                                     "(use !r, !s or !a, or none)")
    for name in fields:
        if not name or name.isdigit():
            raise ConfigurationError(f"name_format {name_format!r}: every field needs a name (step, epoch or a "
                                     f"metric), as in '{{epoch:03d}}'; {{{name}}} has none")
        if "." in name or "[" in name:
            raise ConfigurationError(
                f"name_format {name_format!r}: in a template '.' and '[' mean attribute and index access, so "
                f"{{{name}}} cannot name a metric; report the metric under a name without them too "
                "(e.g. 'val_loss' beside 'val.loss') and use that"
            )
    if "{" not in "".join(spec or "" for _, _, spec, _ in string.Formatter().parse(name_format)):
        _try_name_format(name_format, fields)


def _try_name_format(name_format: str, fields: list[str]) -> None:
    """Fill the template as a save would (step and epoch ints, metrics floats), so a bad format spec
    is refused now rather than at the first save."""
    sample: dict[str, Any] = {name: 0 if name in ("step", "epoch") else 0.0 for name in fields}
    try:
        name_format.format(**sample)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(
            f"name_format {name_format!r} cannot be filled (step and epoch are ints, metrics floats): {exc}"
        ) from exc


def _check_storage(storage: Any) -> None:
    if storage is None:
        return
    missing = [m for m in _STORAGE_METHODS if not callable(getattr(storage, m, None))]
    if missing or not isinstance(getattr(storage, "root", None), str):
        lacks = ", ".join(missing + ([] if isinstance(getattr(storage, "root", None), str) else ["root (a str)"]))
        raise ConfigurationError(
            f"storage must implement savegame.storage.Storage; {type(storage).__name__} lacks {lacks}")


def clean_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """``save(metrics=...)`` as ``{name: float}``: numbers, NumPy scalars and one-element tensors are accepted."""
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise ConfigurationError(f"metrics must be a mapping of names to numbers, got {type(metrics).__name__}")
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, np.generic):
            value = value.item()
        if not isinstance(key, str) or not key or isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigurationError(f"metric {key!r} must be a number keyed by a non-empty str, got {_brief(value)}")
        try:
            out[key] = float(value)
        except (OverflowError, ValueError, TypeError) as exc:
            raise ConfigurationError(f"metric {key!r} = {_brief(value)} is not representable as a float: {exc}") \
                from exc
    return out


def _check_per_rank(names: object) -> None:
    if isinstance(names, str) or not isinstance(names, Sequence) or not all(isinstance(k, str) for k in names):
        raise ConfigurationError(f"per_rank must be a list of state names, got {names!r}")


COMPRESSIONS = (None, "zstd")


def _check_compression(compression: object) -> None:
    if compression is not None and (not isinstance(compression, str) or compression not in COMPRESSIONS):
        raise ConfigurationError(f"compression must be None or 'zstd', got {_brief(compression)}")
    if compression is None:
        return
    compression_module.zstd()  # ConfigurationError naming pip install 'savegame[zstd]' when it is missing
