"""One checkpoint as its run directory sees it: the fields of its manifest, checked.

A manifest that passes its checksum can still hold a field the run cannot use (a time
that is not a number, a metric of 400 digits): :func:`info_from_manifest` refuses it
with CorruptCheckpointError, so the run lists that checkpoint as damaged and skips it,
like one whose bytes are wrong.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NoReturn

from savegame.engine import reader
from savegame.errors import CorruptCheckpointError
from savegame.format import codec
from savegame.format import names as n
from savegame.policies import MODES, CheckpointRecord
from savegame.run import history

__all__ = ["CheckpointInfo", "info_from_manifest"]


@dataclass(frozen=True)
class CheckpointInfo:
    """What a run directory knows about one committed checkpoint (from its manifest).

    ``best`` is the best-tracking state stored in it (``{metric: {"mode", "entries"}}``),
    or None when it has none; ``seq`` its commit sequence (None when not recorded).
    """

    name: str
    step: int
    epoch: int | None
    metrics: dict[str, float]
    extra: Any
    time: float
    bytes: int = 0
    pinned: bool = False
    aliases: tuple[str, ...] = field(default=())
    best: Mapping[str, Any] | None = None
    seq: int | None = None

    def record(self) -> CheckpointRecord:
        return self._record

    @cached_property
    def _record(self) -> CheckpointRecord:  # made once: the records of a long run are asked for at every save
        return CheckpointRecord(step=self.step, name=self.name, time=self.time, epoch=self.epoch,
                                metrics=self.metrics, pinned=self.pinned, seq=self.seq)



def info_from_manifest(where: str, name: str, doc: Mapping[str, Any]) -> CheckpointInfo:
    """The run's record of checkpoint ``name`` from its checked manifest ``doc``.

    Every field the run directory uses is checked: the step and epoch are ints, the time
    a finite number (or absent), each metric a number, ``pinned`` a bool, ``seq`` an int
    >= 0 (or absent) and the stored best state well formed. Anything else raises
    CorruptCheckpointError naming the field, so the checkpoint is listed as damaged and
    skipped, like one whose bytes are wrong.
    """
    meta = reader.decode_meta(doc)
    step, epoch = meta["step"], meta["epoch"]
    _require(where, "step", step, type(step) is int)
    _require(where, "epoch", epoch, epoch is None or type(epoch) is int)
    pinned, seq = doc.get(n.M_PINNED, False), doc.get(n.M_SEQ)
    _require(where, n.M_PINNED, pinned, type(pinned) is bool)
    _require(where, n.M_SEQ, seq, seq is None or (type(seq) is int and seq >= 0))
    return CheckpointInfo(name, step, epoch, _metrics(where, meta["metrics"]), meta["extra"], _time(where, meta["time"]),
                          reader.data_bytes(doc), pinned, best=_stored_best(where, doc), seq=seq)


def _require(where: str, key: str, value: object, ok: bool) -> None:
    if not ok:
        _bad(where, key, value)


def _bad(where: str, key: str, value: object) -> NoReturn:
    raise CorruptCheckpointError(f"{where}: manifest field {key!r} is malformed ({_short(value)}); "
                                 "the checkpoint is damaged")


def _short(value: object) -> str:
    text = reprlib.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _metrics(where: str, value: object) -> dict[str, float]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        _bad(where, n.M_METRICS, value)
    out = {}
    for key, v in value.items():
        number = history.number(v)
        if number is None:
            _bad(where, f"{n.M_METRICS}.{key}", v)
        out[key] = number
    return out


def _time(where: str, value: object) -> float:
    when = 0.0 if value is None else history.number(value)
    _require(where, n.M_TIME, value, when is not None and math.isfinite(when))
    return when if when is not None else 0.0


def _stored_best(where: str, doc: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The best-tracking state inside a manifest's value tree (it never holds tensors); None when it has none."""
    tree = doc.get(n.M_TREE)
    run = tree.get(n.TREE_RUN) if isinstance(tree, dict) else None
    if run is None:
        return None
    decoded = codec.decode(run, [])
    best = decoded.get("best") if isinstance(decoded, dict) else None
    if best is None:
        return None
    ok = isinstance(best, dict) and all(
        isinstance(metric, str) and isinstance(held, dict) and held.get("mode") in MODES
        and isinstance(held.get("entries"), list) for metric, held in best.items())
    _require(where, "tree.run.best", best, ok)
    return best if isinstance(best, dict) else None
