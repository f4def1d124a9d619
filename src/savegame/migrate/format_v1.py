"""User report 004's "checkpoint format v1" (model_training_framework).

``{"format_version": 1, "model_state_dict", "optimizer_state_dicts": [...],
"scheduler_state_dicts": [...], "amp_scaler_state", "rng_states": {"python_random",
"numpy_random", "torch_cpu", "torch_cuda"}, "epoch", "global_step",
"metrics_history", ...}``. The data-loader manager state, the choice RNG, the
``resume_state`` object and the config snapshot belong to that framework's own
loader and trainer: they are left out and reported. ``resume_state`` is an
instance of the framework's own class, so the file loads only with
``drop_unsafe=True`` (it is dropped, never constructed) or ``trust=True``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from savegame.migrate.draft import Draft, ForeignCheckpoint, apply_rules, marker
from savegame.migrate.rules import nested_rng, to_epoch, to_model, to_state, to_step

LAYOUT = "mtf-format-v1"


def _metrics_history(draft: Draft, key: str, value: Any) -> None:
    """The latest value of each metric: a dict of lists (or numbers), or a list of per-epoch dicts."""
    if isinstance(value, (list, tuple)) and value and isinstance(value[-1], Mapping):
        value = value[-1]
    if not isinstance(value, Mapping):
        draft.leave_out(key, "None" if value is None else "not a dict of metrics")
        return
    for name, history in value.items():
        latest = history[-1] if isinstance(history, (list, tuple)) and history else history
        draft.metric(f"{key}.{name}", latest, str(name))


RULES = {
    "format_version": marker,
    "epoch": to_epoch,
    "global_step": to_step,
    "model_state_dict": to_model(),
    "optimizer_state_dicts": to_state("optimizer"),
    "scheduler_state_dicts": to_state("scheduler"),
    "amp_scaler_state": to_state("scaler"),
    "rng_states": nested_rng({"python_random": "python", "numpy_random": "numpy",
                              "torch_cpu": "torch", "torch_cuda": "cuda"}),
    "metrics_history": _metrics_history,
}


def matches(checkpoint: Mapping[str, Any]) -> bool:
    return checkpoint.get("format_version") == 1 and "model_state_dict" in checkpoint and (
        "optimizer_state_dicts" in checkpoint or "rng_states" in checkpoint)


def convert(checkpoint: Mapping[str, Any]) -> ForeignCheckpoint:
    draft = Draft()
    apply_rules(draft, checkpoint, RULES)
    return draft.finish(LAYOUT)
