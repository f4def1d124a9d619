"""The metrics history of a run: ``metrics.jsonl``, one JSON line per committed save.

Each line is ``{"step", "epoch", "time", "metrics"}`` (a non-finite metric is written
as the string "nan", "inf" or "-inf"). A crash during an append can leave a torn last
line: the next append starts on a fresh line, so the torn line never swallows the
next record, and readers skip lines that do not parse.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from typing import Any

from savegame.commit import write_file_atomic
from savegame.errors import StorageError
from savegame.format import names as n
from savegame.storage.base import Storage
from savegame.storage.local import storage_error

log = logging.getLogger("savegame.run")

FILE = n.HISTORY_FILE


def line(step: int, epoch: int | None, metrics: Mapping[str, float], when: float) -> bytes:
    record = {"step": step, "epoch": epoch, "time": when,
              "metrics": {k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()}}
    return (json.dumps(record) + "\n").encode()


def parse(raw: bytes) -> dict[str, Any] | None:
    """One history line as a record, or None when it is damaged (torn, not JSON, no int step)."""
    try:
        record = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    ok = isinstance(record, dict) and isinstance(record.get("step"), int) and not isinstance(record["step"], bool)
    return record if ok else None


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
        out, damaged = [], 0
        for raw in self._lines():
            record = parse(raw)
            if record is None:
                damaged += raw.strip() != b""
            else:
                out.append(record)
        if damaged:
            log.warning("%s: skipped %d damaged line(s)", FILE, damaged)
        return out

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
