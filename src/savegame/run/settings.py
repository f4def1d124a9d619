"""The retention settings of a run directory, ``retention.json``, for tools that prune it by hand.

The Checkpointer writes them (atomically) with its first save, so ``savegame prune`` keeps
what the trainer's own retention keeps (``keep_every``, best-k per metric) without being
told. They describe the last writer; a file that cannot be read is ignored with a warning.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from savegame.errors import StorageError
from savegame.format import names as n
from savegame.policies import MODES
from savegame.storage.base import Storage
from savegame.storage.commit import write_file_atomic

log = logging.getLogger("savegame.run")

FILE = n.SETTINGS_FILE


@dataclass(frozen=True)
class RunSettings:
    """``keep_last``, ``keep_every``, ``best`` (``{metric: mode}``, the first is "best") and ``best_k``."""

    keep_last: int | None = None
    keep_every: int | None = None
    best: Mapping[str, str] = field(default_factory=dict)
    best_k: int = 1

    def to_json(self) -> bytes:
        return json.dumps({"keep_last": self.keep_last, "keep_every": self.keep_every, "best": dict(self.best),
                           "best_k": self.best_k}).encode()


def write(storage: Storage, settings: RunSettings) -> None:
    """Replace the settings file atomically; raises StorageError."""
    write_file_atomic(storage, FILE, settings.to_json())


def read(storage: Storage) -> RunSettings | None:
    """The settings file, or None when there is none or it cannot be read (logged)."""
    try:
        if not storage.exists(FILE):
            return None
        doc = json.loads(storage.read_bytes(FILE))
    except (StorageError, ValueError, UnicodeDecodeError, RecursionError) as exc:
        log.warning("ignoring %s of %s: it cannot be read (%s)", FILE, storage.root, type(exc).__name__)
        return None
    settings = parse(doc)
    if settings is None:
        log.warning("ignoring %s of %s: it is malformed", FILE, storage.root)
    return settings


def parse(doc: Any) -> RunSettings | None:
    """The settings a JSON document holds, or None when any field is malformed."""
    if not isinstance(doc, dict):
        return None
    keep_last, keep_every, best, best_k = (doc.get(k) for k in ("keep_last", "keep_every", "best", "best_k"))
    counts_ok = all(v is None or _count(v) for v in (keep_last, keep_every)) and _count(best_k)
    best_ok = isinstance(best, dict) and all(isinstance(m, str) and m and mode in MODES for m, mode in best.items())
    if not (counts_ok and best_ok):
        return None
    return RunSettings(keep_last, keep_every, dict(best), best_k)  # type: ignore[arg-type]


def _count(value: object) -> bool:
    return type(value) is int and value >= 1
