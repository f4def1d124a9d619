"""The ``best=`` argument, normalised to ``{metric: mode}``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from savegame.errors import ConfigurationError
from savegame.policies._common import check_mode


def _split_spec(item: object) -> tuple[object, object]:
    if not isinstance(item, str):
        raise ConfigurationError(f"best must name metrics as strings, got {item!r}")
    metric, sep, mode = item.rpartition(":")
    return (metric, mode) if sep else (item, "min")


def parse_best_spec(best: Mapping[str, str] | Sequence[str] | str | None) -> dict[str, str]:
    """Normalise ``best=`` to ``{metric: mode}`` in the given order (the first is "best").

    Accepts None (nothing tracked), ``{"val_loss": "min", "pck": "max"}``, a name
    (``"val_loss"`` is minimised, ``"pck:max"`` names its mode) or a sequence of names.
    Raises ConfigurationError for a mode other than "min"/"max", an empty or non-string
    name, or one metric given two modes.
    """
    if best is None:
        return {}
    if isinstance(best, Mapping):
        pairs: list[tuple[object, object]] = [(metric, mode) for metric, mode in best.items()]
    elif isinstance(best, str):
        pairs = [_split_spec(best)]
    elif isinstance(best, Sequence):
        pairs = [_split_spec(item) for item in best]
    else:
        raise ConfigurationError(f"best must be a mapping, a sequence of names, a name or None, got {type(best).__name__}")
    out: dict[str, str] = {}
    for metric, mode in pairs:
        if not isinstance(metric, str) or not metric:
            raise ConfigurationError(f"best: metric names must be non-empty strings, got {metric!r}")
        mode = check_mode(mode, f"best[{metric!r}]")
        if out.setdefault(metric, mode) != mode:
            raise ConfigurationError(f"best: metric {metric!r} is given both modes 'min' and 'max'")
    return out
