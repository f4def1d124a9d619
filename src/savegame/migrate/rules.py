"""Rules shared by the importers of hand-written ``torch.save`` dicts.

A rule takes (draft, key, value) and records where the value goes. The tables
at the bottom hold the keys that the hand-written layouts (user reports 000-003)
spell the same way: counters, best tracking and logged metrics.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from savegame.errors import CorruptCheckpointError
from savegame.migrate.builder import Draft, Rule
from savegame.migrate.values import as_count


def to_model(name: str = "model") -> Rule:
    return lambda draft, key, value: draft.model(key, value, name)


def to_state(name: str) -> Rule:
    """One state dict -> ``name``; a list of them -> ``name``, ``name_1``, ..."""
    def rule(draft: Draft, key: str, value: Any) -> None:
        if isinstance(value, (list, tuple)):
            draft.numbered(key, value, name)
        else:
            draft.obj(key, value, name)
    return rule


def to_rng(kind: str) -> Rule:
    return lambda draft, key, value: draft.put_rng(kind, key, value)


def nested_rng(kinds: Mapping[str, str]) -> Rule:
    """A dict of generator states; ``kinds`` maps its keys to python/numpy/torch/cuda."""
    def rule(draft: Draft, key: str, value: Any) -> None:
        if not isinstance(value, Mapping):
            raise CorruptCheckpointError(f"{key} is a {type(value).__name__}, not a dict of RNG states")
        for sub, state in value.items():
            kind = kinds.get(sub) if isinstance(sub, str) else None
            if kind is None:
                draft.leave_out(f"{key}.{sub}", "no such generator in savegame")
            else:
                draft.put_rng(kind, f"{key}.{sub}", state)
    return rule


def to_step(draft: Draft, key: str, value: Any) -> None:
    draft.set_step(key, value)


def to_epoch(draft: Draft, key: str, value: Any) -> None:
    draft.set_epoch(key, value)


def to_metric(name: str) -> Rule:
    return lambda draft, key, value: draft.metric(key, value, name)


def to_best(metric: str, mode: str) -> Rule:
    return lambda draft, key, value: draft.best_value(key, value, metric, mode)


def to_stats(rename: Mapping[str, str], prefix: str = "") -> Rule:
    """A dict of logged numbers -> metrics, named by ``rename`` or ``prefix + key``."""
    def rule(draft: Draft, key: str, value: Any) -> None:
        if not isinstance(value, Mapping):
            draft.leave_out(key, "not a dict of numbers")
            return
        for sub, number in value.items():
            draft.metric(f"{key}.{sub}", number, rename.get(str(sub), f"{prefix}{sub}"))
    return rule


def epochs_without_improvement(draft: Draft, key: str, value: Any) -> None:
    draft.bad_epochs = as_count(value, key)
    draft.map(key, "run.early_stopping")


COUNTERS: dict[str, Rule] = {
    "epoch": to_epoch, "step": to_step, "global_step": to_step, "iteration": to_step,
}

#: Best tracking and metrics as user report 001 (and 000's listing) spell them.
TRACKING: dict[str, Rule] = {
    "best_val_loss": to_best("val_loss", "min"),
    "best_pck": to_best("pck", "max"),
    "epochs_without_improvement": epochs_without_improvement,
    "val_loss": to_metric("val_loss"),
    "train_loss": to_metric("train_loss"),
    "loss": to_metric("loss"),
    "val_stats": to_stats({"loss": "val_loss"}),
    "train_stats": to_stats({"loss": "train_loss"}, prefix="train_"),
}

#: Flat RNG keys (user reports 001 and 002).
FLAT_RNG: dict[str, Rule] = {
    "rng_state": to_rng("torch"),
    "cuda_rng_state": to_rng("cuda"),
    "np_rng_state": to_rng("numpy"),
    "numpy_rng_state": to_rng("numpy"),
    "py_rng_state": to_rng("python"),
    "python_rng_state": to_rng("python"),
}
