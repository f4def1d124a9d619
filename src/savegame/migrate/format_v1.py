"""User report 004's "checkpoint format v1" (model_training_framework).

``{"format_version": 1, "model_state_dict", "optimizer_state_dicts": [...],
"scheduler_state_dicts": [...], "amp_scaler_state", "rng_states": {"python_random",
"numpy_random", "torch_cpu", "torch_cuda"}, "epoch", "global_step",
"metrics_history", ...}``. The data-loader manager state, the choice RNG, the
``resume_state`` object belong to that framework's own loader and trainer: they
are left out and reported. The config snapshot goes into ``extra`` when it holds
plain JSON values. ``resume_state`` is an
instance of the framework's own class, so the file loads only with
``drop_unsafe=True`` (it is dropped, never constructed) or ``trust=True``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from savegame.migrate.builder import Draft, apply_rules, marker
from savegame.migrate.rules import nested_rng, to_epoch, to_model, to_state, to_step

LAYOUT = "mtf-format-v1"
COUNTS_EPOCHS = False


def _metrics_history(draft: Draft, key: str, value: Any) -> None:
    """Per-epoch values: a dict of lists (or numbers), or a list of per-epoch dicts.

    Every epoch becomes a line of the metrics history; the latest value of each
    metric becomes the checkpoint's metrics.
    """
    epochs = _by_epoch(value)
    if epochs is None:
        draft.leave_out(key, "None" if value is None else "not a dict of metrics")
        return
    latest: dict[str, Any] = {}
    for epoch, metrics in enumerate(epochs):
        draft.add_history(None, epoch, metrics)
        latest.update(metrics)
    for name, number in latest.items():
        draft.metric(f"{key}.{name}", number, name)
    draft.map(key, f"metrics history ({len(epochs)} epochs)")


def _by_epoch(value: Any) -> list[dict[str, Any]] | None:
    """{"loss": [a, b], "acc": [c]} or [{"loss": a, "acc": c}, {"loss": b}] -> one dict per epoch."""
    if isinstance(value, (list, tuple)) and all(isinstance(e, Mapping) for e in value):
        return [{str(k): v for k, v in e.items()} for e in value]
    if not isinstance(value, Mapping):
        return None
    series = {str(k): list(v) if isinstance(v, (list, tuple)) else [v] for k, v in value.items()}
    count = max((len(v) for v in series.values()), default=0)
    return [{k: v[i] for k, v in series.items() if i < len(v)} for i in range(count)]


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
    "config_snapshot": lambda draft, key, value: draft.config(key, value),
}


def matches(checkpoint: Mapping[str, Any]) -> bool:
    return checkpoint.get("format_version") == 1 and "model_state_dict" in checkpoint and (
        "optimizer_state_dicts" in checkpoint or "rng_states" in checkpoint)


def convert(checkpoint: Mapping[str, Any]) -> Draft:
    draft = Draft()
    apply_rules(draft, checkpoint, RULES)
    return draft
