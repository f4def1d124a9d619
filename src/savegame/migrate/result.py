"""What an import produces: :class:`ForeignCheckpoint`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ForeignCheckpoint:
    """A foreign checkpoint translated into savegame's state tree.

    ``tree`` is exactly the tree of docs/design.md: ``{"state": {name: state_dict},
    "rng": {...only the generators the file saved...}, "run": {"best": {...},
    "early_stopping": {...} | None}}``. ``mapped`` says where each foreign key went
    ("model_state_dict -> state.model"); ``left_out`` lists what was not carried over.
    ``history`` is the metrics history the file recorded, as lines of the run's
    ``metrics.jsonl`` (``{"step", "epoch", "metrics"}``, oldest first); ``notes`` say
    what to do when resuming needs more than ``Checkpointer(...).restore()``.
    ``extra`` holds the tool's config snapshots (plain JSON values) by their foreign
    key or file name; ``savegame migrate`` writes it as the checkpoint's ``extra``.
    """

    layout: str
    tree: dict[str, Any]
    step: int
    epoch: int | None
    metrics: dict[str, float]
    mapped: list[str]
    left_out: list[str]
    history: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
