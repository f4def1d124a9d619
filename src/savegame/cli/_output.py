"""How the CLI prints: consoles, tables, JSON, and short texts for sizes, ages, numbers and tensors."""

from __future__ import annotations

import base64
import json
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import click
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from savegame.cli._app import broken_pipe
from savegame.format.codec import BIG_INT_BITS, encode


def console(*, stderr: bool = False) -> Console:
    """A rich console on the current stdout (or stderr); 120 columns when not a terminal.

    Markup is off: checkpoint names and state keys are printed as they are ("layers[0]").
    """
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or "COLUMNS" in os.environ else 120
    return _Console(file=stream, stderr=stderr, width=width, markup=False, highlight=False, soft_wrap=True)


class _Console(Console):
    def on_broken_pipe(self) -> None:  # rich would exit 1, which here means "a finding"
        self.quiet = True
        broken_pipe()


def new_table(title: str | None, *columns: str, right: tuple[str, ...] = ()) -> Table:
    """A table whose long cells (key paths, checkpoint names) wrap instead of being cut off."""
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, justify="right" if column in right else "left", overflow="fold")
    return table


def echo_json(value: Any) -> None:
    click.echo(json.dumps(jsonable(value), indent=2, allow_nan=False))


def human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_age(when: float | None, now: float | None = None) -> str:
    if not when:
        return "?"
    seconds = max(0.0, (now or time.time()) - when)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, int):
        return int_text(value)
    return str(value)


def key_text(key: Any) -> str:
    """A mapping key as text (an int past the int/str digit limit too)."""
    return int_text(key) if isinstance(key, int) and not isinstance(key, bool) else str(key)


def int_text(value: int) -> str:
    """An int as text; one past Python's 4,300-digit int/str limit by its size and first hex digits."""
    if value.bit_length() <= BIG_INT_BITS:
        return str(value)
    return f"<int of {value.bit_length()} bits: {'-' if value < 0 else ''}0x{format(abs(value), 'x')[:12]}...>"


def metrics_text(metrics: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={number(v)}" for k, v in metrics.items())


def short(value: Any, limit: int = 60) -> str:
    """A one-line description of a value, cut to ``limit`` characters."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return tensor_text(value)
    if isinstance(value, (list, tuple)) and len(value) > 8:
        return f"{type(value).__name__} of {len(value)} items"
    if isinstance(value, int) and not isinstance(value, bool):
        text = int_text(value)
    else:
        try:
            text = repr(value)
        except ValueError:  # it holds an int past the int/str digit limit, which has no repr
            text = f"{type(value).__name__} holding an int too large to show"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def dtype_name(t: torch.Tensor | np.ndarray) -> str:
    return str(t.dtype).removeprefix("torch.")


def tensor_text(t: torch.Tensor | np.ndarray) -> str:
    return f"{dtype_name(t)} {list(t.shape)}"


def nbytes(t: torch.Tensor | np.ndarray) -> int:
    if isinstance(t, np.ndarray):
        return int(t.nbytes)
    return t.numel() * t.element_size()


def jsonable(value: Any) -> Any:
    """Plain JSON for any value a checkpoint holds (tensors become {dtype, shape})."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):  # past the int/str digit limit: as the format writes it
        return value if value.bit_length() <= BIG_INT_BITS else encode(int(value), _no_tensors)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {key_text(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((jsonable(v) for v in value), key=repr)
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return {"dtype": dtype_name(value), "shape": list(value.shape)}
    if isinstance(value, np.generic):
        item = value.item()  # a long double's .item() is itself: shown as its text, exactly
        return str(value) if isinstance(item, np.generic) else jsonable(item)
    if isinstance(value, complex):
        return [jsonable(value.real), jsonable(value.imag)]
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode()
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return str(value)


def _no_tensors(tensor: torch.Tensor, path: str) -> int:
    raise AssertionError("an int holds no tensor")
