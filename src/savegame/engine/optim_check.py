"""Optimizer and scheduler states are checked against their targets before anything loads.

``Optimizer.load_state_dict`` accepts almost anything: an Adam state loads into
SGD (which then fails at its next ``step()`` for want of ``momentum``), into
AdamW (which then silently trains as Adam), and moment buffers of a layer whose
shape changed load too, failing or broadcasting later. Model keys and shapes are
checked elsewhere (:mod:`savegame.engine.keys`); this module does the same for the
optimizers and learning-rate schedulers of torch itself, whose classes and
state layouts are known:

- the class recorded at save time (the tree's ``types``) must be the class given
  now (compared by class name, so a class torch moved between modules matches);
- every per-parameter state tensor of a torch optimizer with as many dimensions
  as its parameter must match its shape (a dimension of 1 is allowed: Adafactor's
  factored moments). LBFGS keeps flat vectors of all parameters and is skipped.

With ``strict`` a mismatch raises IncompatibleStateError before any object is
loaded; otherwise the object is skipped (wrong class) or loaded without the
mismatched parameters' state (which then starts fresh), and the report says so.
User-defined optimizers are not second-guessed: their states can be anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from savegame.engine.keys import KeyReport
from savegame.errors import IncompatibleStateError
from savegame.format.layout import Spec

SKIP = object()
"""Returned in place of a state that must not be loaded at all."""


def _shape_of(value: object) -> tuple[int, ...] | None:
    if isinstance(value, torch.Tensor | Spec):
        return tuple(value.shape)
    return None


def type_name(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def recorded_types(objects: Mapping[str, Any]) -> dict[str, str]:
    """What the tree's ``types`` holds: the class of every object, by state name."""
    return {name: type_name(obj) for name, obj in objects.items()}


def checked_kind(obj: object) -> str | None:
    """"optimizer" or "scheduler" for torch's own classes, whose states this module checks; else None."""
    if isinstance(obj, torch.optim.Optimizer):
        kind = "optimizer"
    elif isinstance(obj, (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)):
        kind = "scheduler"
    else:
        return None
    return kind if type(obj).__module__.startswith("torch.optim") else None


def check(name: str, obj: object, state: Any, saved_type: object, *, strict: bool) -> tuple[Any, KeyReport]:
    """The state to load into ``obj`` (or SKIP), and what did not match; raises when ``strict``."""
    kind = checked_kind(obj)
    report = KeyReport()
    if kind is None:
        return state, report
    given = type_name(obj)
    malformed = _malformed(kind, state)
    if malformed:
        report.incompatible.append(f"the checkpoint's {kind} state {malformed}")
    elif isinstance(saved_type, str) and saved_type.rsplit(".", 1)[-1] != given.rsplit(".", 1)[-1]:
        report.incompatible.append(f"the checkpoint holds a {saved_type} {kind} state, "
                                   f"but a {given} was given")
    if report.incompatible:
        if strict:
            raise IncompatibleStateError(
                f"state {name!r}: {report.incompatible[0]}; loading it would change how training goes on. "
                f"Restore with the {kind} the run was saved with, or pass strict=False to leave this one as it is"
            )
        return SKIP, report
    if kind == "optimizer" and not isinstance(obj, torch.optim.LBFGS):
        state = _drop_mismatched(obj, state, report)  # type: ignore[arg-type]
        if strict and report:
            raise IncompatibleStateError(report.describe(name) + "; pass strict=False to start those fresh")
    return state, report


def _malformed(kind: str, state: Any) -> str | None:
    """What makes ``state`` unloadable into any torch optimizer (or scheduler) at all, or None."""
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        return "is not a mapping with str keys"
    if kind == "scheduler":
        return None
    groups, per_param = state.get("param_groups"), state.get("state")
    if not isinstance(per_param, Mapping) or not isinstance(groups, list):
        return "lacks its 'state' mapping or its 'param_groups' list"
    if not all(isinstance(g, Mapping) and isinstance(g.get("params"), list)
               and all(type(i) is int for i in g["params"]) for g in groups):
        return "has a parameter group without a 'params' list of parameter numbers"
    if not all(isinstance(v, Mapping) for v in per_param.values()):
        return "has a per-parameter state that is not a mapping"
    return None


def _drop_mismatched(opt: torch.optim.Optimizer, state: Any, report: KeyReport) -> Any:
    """``state`` without the per-parameter states whose tensors do not fit their parameters."""
    if not isinstance(state, Mapping):
        return state
    groups, per_param = state.get("param_groups"), state.get("state")
    if not isinstance(groups, list) or not isinstance(per_param, Mapping):
        return state
    ids = [i for g in groups if isinstance(g, Mapping) for i in g.get("params", ())]
    params = [p for g in opt.param_groups for p in g["params"]]
    if len(ids) != len(params):
        return state  # torch's own load_state_dict refuses this, naming the group sizes
    by_id = dict(zip(ids, params, strict=True))
    bad = set()
    for pid, values in per_param.items():
        param = by_id.get(pid)
        if param is None or not isinstance(values, Mapping):
            continue
        for key, value in values.items():
            shape = _shape_of(value)
            if shape is not None and _misfits(shape, tuple(param.shape)):
                report.mismatched.append(f"state[{pid}].{key} {shape} in checkpoint, parameter {tuple(param.shape)}")
                bad.add(pid)
    if not bad:
        return state
    return {**state, "state": {pid: v for pid, v in per_param.items() if pid not in bad}}


def _misfits(shape: tuple[int, ...], param: tuple[int, ...]) -> bool:
    if not shape or len(shape) != len(param):
        return False
    return any(a != b and a != 1 for a, b in zip(shape, param, strict=True))
