"""User report 001's layout: ``model``/``optimizer``/``lr_scheduler`` and one key per RNG.

``{"model", "optimizer", "lr_scheduler", "epoch", "args", "train_stats", "val_stats",
"best_val_loss", "best_pck", "epochs_without_improvement", "rng_state",
"cuda_rng_state", "np_rng_state", "py_rng_state"}``. ``args`` (an
argparse.Namespace) is left out. The tool counts epochs only, so the step is the
saved epoch. Early stopping counts epochs without a better PCK when a best PCK is
saved, else without a better validation loss, as the report's training loop does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from savegame.migrate.builder import Draft, apply_rules
from savegame.migrate.rules import COUNTERS, FLAT_RNG, TRACKING, to_model, to_state

LAYOUT = "dict-flat-rng"
COUNTS_EPOCHS = True  # the tool counts epochs only: without a step key, the step is the epoch

RULES = {
    **COUNTERS, **TRACKING, **FLAT_RNG,
    "model": to_model(),
    "optimizer": to_state("optimizer"),
    "lr_scheduler": to_state("scheduler"),
    "scheduler": to_state("scheduler"),
    "scaler": to_state("scaler"),
}


def matches(checkpoint: Mapping[str, Any]) -> bool:
    return isinstance(checkpoint.get("model"), Mapping)


def convert(checkpoint: Mapping[str, Any]) -> Draft:
    draft = Draft()
    apply_rules(draft, checkpoint, RULES)
    return draft
