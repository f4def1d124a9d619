"""User reports 002/003's layout: ``model_state_dict``, ``optimizer_state_dict``, ...

PyTorch's "complete checkpoint pattern": ``{"epoch", "model_state_dict",
"optimizer_state_dict", "scheduler_state_dict", "loss", "rng_state",
"cuda_rng_state"}``. Model keys saved from a ``torch.compile``-d or DDP-wrapped
model lose their ``_orig_mod.`` / ``module.`` parts. Without a step counter the
step is the saved epoch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from savegame.migrate.builder import Draft, apply_rules
from savegame.migrate.rules import COUNTERS, FLAT_RNG, TRACKING, to_model, to_state

LAYOUT = "dict-state-dicts"
COUNTS_EPOCHS = True  # the tool counts epochs only: without a step key, the step is the epoch

RULES = {
    **COUNTERS, **TRACKING, **FLAT_RNG,
    "model_state_dict": to_model(),
    "optimizer_state_dict": to_state("optimizer"),
    "optimizer_state_dicts": to_state("optimizer"),
    "scheduler_state_dict": to_state("scheduler"),
    "lr_scheduler_state_dict": to_state("scheduler"),
    "scaler_state_dict": to_state("scaler"),
    "scaler": to_state("scaler"),
}


def matches(checkpoint: Mapping[str, Any]) -> bool:
    return isinstance(checkpoint.get("model_state_dict"), Mapping)


def convert(checkpoint: Mapping[str, Any]) -> Draft:
    draft = Draft()
    apply_rules(draft, checkpoint, RULES)
    return draft
