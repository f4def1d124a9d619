"""The metrics history of a run: ``metrics.jsonl``, one JSON line per committed save.

Each line is ``{"step", "epoch", "time", "metrics"}`` (a non-finite metric is written
as the string "nan", "inf" or "-inf"). A crash during an append can leave a torn last
line: the next append starts on a fresh line, so the torn line never swallows the
next record, and readers skip lines that do not parse (:func:`parse` says which).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from typing import Any

from savegame.errors import StorageError
from savegame.format import names as n
from savegame.storage.base import Storage
from savegame.storage.commit import write_file_atomic
from savegame.storage.local import storage_error

log = logging.getLogger("savegame.run")

FILE = n.HISTORY_FILE


def line(step: int, epoch: int | None, metrics: Mapping[str, float], when: float) -> bytes:
    record = {"step": step, "epoch": epoch, "time": when,
              "metrics": {k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()}}
    return (json.dumps(record) + "\n").encode()


def parse(raw: bytes) -> dict[str, Any] | None:
    """One history line as a record ``{"step", "epoch", "time", "metrics"}``, or None when it is damaged.

    Damaged: torn, not UTF-8 JSON (or nested too deep to parse), not an object, a step that is
    not an int, an epoch that is neither an int nor null, a time that is not a finite number,
    or a metric that is not a number (or "nan"/"inf"/"-inf") a float holds. Metrics come back
    as floats.
    """
    try:
        record = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(record, dict):
        return None
    step, epoch, when, metrics = record.get("step"), record.get("epoch"), record.get("time"), record.get("metrics")
    if type(step) is not int or not (epoch is None or type(epoch) is int):
        return None
    if when is not None and not (type(when) in (int, float) and _finite(when)):
        return None
    values = {} if metrics is None else metrics
    if not isinstance(values, dict):
        return None
    floats = {k: _metric(v) for k, v in values.items()}
    if any(v is None for v in floats.values()):
        return None
    return {"step": step, "epoch": epoch, "time": when, "metrics": floats}


def _metric(value: object) -> float | None:
    if isinstance(value, str):
        return _SPECIAL.get(value)
    return number(value)


def number(value: object) -> float | None:
    """``value`` as a float when it is an int or float (not bool) that a float holds, else None."""
    if type(value) not in (int, float):
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except OverflowError:  # an int of hundreds of digits
        return None


def _finite(value: object) -> bool:
    try:
        return math.isfinite(value)  # type: ignore[arg-type]
    except OverflowError:
        return False


_SPECIAL = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def read(storage: Storage) -> tuple[list[dict[str, Any]], int]:
    """Every readable record of the history, in file order, and how many lines were skipped as damaged."""
    return History(storage).read()


class History:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._ends_clean = False  # True once this process knows the file ends with a newline

    def append(self, step: int, epoch: int | None, metrics: Mapping[str, float], when: float) -> None:
        data = line(step, epoch, metrics, when)
        if not self._ends_clean and self._torn():
            log.warning("%s ends in a torn line (a crash during a write); it is left in place and skipped by readers",
                        FILE)
            data = b"\n" + data
        self._ends_clean = False
        self.storage.append(FILE, data)
        self._ends_clean = True

    def records(self) -> list[dict[str, Any]]:
        """Every readable record, in file order; damaged lines are skipped (and counted in the log)."""
        out, damaged = self.read()
        if damaged:
            log.warning("%s: skipped %d damaged line(s)", FILE, damaged)
        return out

    def read(self) -> tuple[list[dict[str, Any]], int]:
        """(every readable record in file order, the number of damaged lines skipped); raises StorageError."""
        out, damaged = [], 0
        for raw in self._lines():
            record = parse(raw)
            if record is None:
                damaged += 1
            else:
                out.append(record)
        return out, damaged

    def split_after(self, step: int) -> tuple[bytes, bytes]:
        """(the lines to keep, the lines of records past ``step``); damaged lines stay with the kept ones."""
        keep: list[bytes] = []
        past: list[bytes] = []
        for raw in self._lines():
            record = parse(raw)
            (past if record is not None and record["step"] > step else keep).append(raw.rstrip(b"\n") + b"\n")
        return b"".join(keep), b"".join(past)

    def replace(self, data: bytes) -> None:
        write_file_atomic(self.storage, FILE, data)
        self._ends_clean = data.endswith(b"\n") or not data

    def _lines(self) -> list[bytes]:
        if not self.storage.exists(FILE):
            return []
        return [raw for raw in self.storage.read_bytes(FILE).splitlines(keepends=True) if raw.strip()]

    def _torn(self) -> bool:
        try:
            if not self.storage.exists(FILE):
                return False
            size = self.storage.size(FILE)
            if size == 0:
                return False
            with self.storage.open_read(FILE) as f:
                f.seek(size - 1)
                return f.read(1) != b"\n"
        except StorageError:
            raise
        except OSError as exc:
            raise storage_error(exc, "read the end of", FILE) from exc
