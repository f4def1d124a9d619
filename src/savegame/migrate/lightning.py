"""PyTorch Lightning ``.ckpt`` files (``Trainer.save_checkpoint``).

``state_dict`` is the LightningModule's own state: its keys keep the attribute
prefix they have there (``model.layer.weight``), because that module is what
the run restores into; only ``_orig_mod.`` segments are dropped. Optimizers and
schedulers are numbered in Lightning's order. ModelCheckpoint callback states
become best tracking (scores of ``best_k_models``, steps read from the
``step=N`` part of their file names when present) and an EarlyStopping callback
state becomes early stopping. ``hyper_parameters`` goes into ``extra`` when it
holds plain JSON values. Loops and other callbacks are left out.

Lightning 1.x keys ``callbacks`` by the callback *class* (a pickled reference to
``pytorch_lightning.callbacks...ModelCheckpoint``), which the safe loader refuses
to import: with ``drop_unsafe=True`` the key becomes an inert stand-in that still
says which class it named, and the state is mapped as usual. Such keys record no
mode; Lightning's default, ``min``, is assumed and reported.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from savegame.migrate.builder import Draft, apply_rules, early_stopping_state, marker
from savegame.migrate.rules import to_epoch, to_model, to_state, to_step
from savegame.migrate.stand_ins import stand_in_name
from savegame.migrate.values import as_float

LAYOUT = "lightning"
COUNTS_EPOCHS = False

_MODE = re.compile(r"'mode': '(min|max)'")
_MONITOR = re.compile(r"'monitor': '([^']+)'")
_STEP_IN_NAME = re.compile(r"step=(\d+)")

RULES = {
    "pytorch-lightning_version": marker,
    "state_dict": to_model(),
    "optimizer_states": to_state("optimizer"),
    "lr_schedulers": to_state("scheduler"),
    "epoch": to_epoch,
    "global_step": to_step,
    # the AMP GradScaler, under the precision plugin's name (Lightning 2.x) or its 1.x key
    "MixedPrecision": to_state("scaler"),
    "MixedPrecisionPlugin": to_state("scaler"),
    "native_amp_scaling_state": to_state("scaler"),
    "hyper_parameters": lambda draft, key, value: draft.config(key, value),
}


def matches(checkpoint: Mapping[str, Any]) -> bool:
    return "pytorch-lightning_version" in checkpoint or (
        isinstance(checkpoint.get("state_dict"), Mapping)
        and any(k in checkpoint for k in ("optimizer_states", "lr_schedulers", "loops", "callbacks")))


def convert(checkpoint: Mapping[str, Any]) -> Draft:
    draft = Draft()
    apply_rules(draft, {k: v for k, v in checkpoint.items() if k != "callbacks"}, RULES)
    if "callbacks" in checkpoint:  # after global_step, which best tracking falls back to
        _callbacks(draft, checkpoint["callbacks"])
    return draft


def _callbacks(draft: Draft, callbacks: Any) -> None:
    if not isinstance(callbacks, Mapping):
        draft.leave_out("callbacks", "not a dict of callback states")
        return
    # ModelCheckpoint first: early stopping takes its best step from the best values (Lightning itself
    # stores the checkpoint callbacks last).
    ordered = sorted(callbacks.items(), key=lambda item: not _callback_name(item[0]).startswith("ModelCheckpoint"))
    for key, state in ordered:
        name = _callback_name(key)
        source = f"callbacks[{name!r}]"
        mode = _MODE.search(name)
        monitor = state.get("monitor") if isinstance(state, Mapping) else None
        if name.startswith("ModelCheckpoint") and isinstance(monitor, str) and monitor not in draft.best:
            if mode is None:
                source += " (mode not recorded; Lightning's default min assumed)"
            _model_checkpoint(draft, source, state, monitor, mode.group(1) if mode else "min")
        elif name.startswith("EarlyStopping") and isinstance(state, Mapping) and draft.early_stopping is None:
            _early_stopping(draft, source, state, name)
        else:
            draft.leave_out(source)


def _callback_name(key: Any) -> str:
    """Lightning 2.x keys: "ModelCheckpoint{...}"; 1.x keys: the class, here a stand-in naming it."""
    named = stand_in_name(key)
    if named is not None:
        return named.rsplit(".", 1)[-1]
    return key if isinstance(key, str) else getattr(key, "__name__", str(key))


def _model_checkpoint(draft: Draft, source: str, state: Mapping[str, Any], monitor: str, mode: str) -> None:
    ranked = state.get("best_k_models")
    if isinstance(ranked, Mapping) and ranked:
        entries = [(score, _step_in(path)) for path, score in ranked.items()]
    else:
        entries = [(state.get("best_model_score"), _step_in(state.get("best_model_path")))]
    draft.best_entries(source, entries, monitor, mode)
    if state.get("current_score") is not None:
        draft.metric(f"{source}.current_score", state["current_score"], monitor)


def _early_stopping(draft: Draft, source: str, state: Mapping[str, Any], key: str) -> None:
    found = _MONITOR.search(key)
    mode = _MODE.search(key)
    wait = state.get("wait_count")
    metric = found.group(1) if found else state.get("monitor")
    if not isinstance(metric, str) or type(wait) is not int:
        draft.leave_out(source, "no monitor or wait count")
        return
    best = as_float(state.get("best_score"))
    held = draft.best.get(metric, ("", []))[1]
    best_step = next((s for v, s in held if v == best and s is not None), None)  # None: the import's step
    patience = state.get("patience")
    draft.early_stopping = early_stopping_state(
        metric, mode.group(1) if mode else "min", best=best, best_step=best_step, bad_epochs=wait,
        patience=patience if type(patience) is int else None, stopped=bool(state.get("stopped_epoch")))
    draft.map(source, "run.early_stopping")


def _step_in(path: Any) -> int | None:
    found = _STEP_IN_NAME.search(path) if isinstance(path, str) else None
    return int(found.group(1)) if found else None
