"""User report 000's layout: ``model``/``optimizer``/... and one nested ``rng_state`` dict.

``{"model", "optimizer", "scheduler"?, "step", "epoch", "train_loss", "val_loss",
"rng_state": {"python", "numpy", "torch", "torch_cuda"}}``. The torch state may
have been saved from the GPU; it is read onto the CPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from savegame.migrate.builder import Draft, apply_rules
from savegame.migrate.rules import COUNTERS, TRACKING, nested_rng, to_model, to_state

LAYOUT = "dict-nested-rng"
COUNTS_EPOCHS = True  # the tool counts epochs only: without a step key, the step is the epoch

RULES = {
    **COUNTERS, **TRACKING,
    "model": to_model(),
    "optimizer": to_state("optimizer"),
    "scheduler": to_state("scheduler"),
    "lr_scheduler": to_state("scheduler"),
    "scaler": to_state("scaler"),
    "rng_state": nested_rng({"python": "python", "numpy": "numpy", "torch": "torch",
                             "torch_cuda": "cuda", "cuda": "cuda"}),
}


def matches(checkpoint: Mapping[str, Any]) -> bool:
    return isinstance(checkpoint.get("model"), Mapping) and isinstance(checkpoint.get("rng_state"), Mapping)


def convert(checkpoint: Mapping[str, Any]) -> Draft:
    draft = Draft()
    apply_rules(draft, checkpoint, RULES)
    return draft
