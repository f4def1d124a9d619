"""Hugging Face ``transformers.Trainer`` checkpoint directories (``checkpoint-500/``).

Files: the model (``model.safetensors``, ``pytorch_model.bin`` or a sharded index),
``config.json`` (the model's configuration, kept in ``extra``),
``optimizer.pt``, ``scheduler.pt``, ``scaler.pt``, ``rng_state.pth`` (rank 0's
``{"python", "numpy", "cpu", "cuda"}``; ``rng_state_N.pth`` when distributed) and
``trainer_state.json``. ``training_args.bin`` is a pickled TrainingArguments and is
never read.

trainer_state.json does not say which metric ``best_metric`` is (that lives in
the unread training args), so the name is found in ``log_history``: the ``eval_*``
value equal to ``best_metric`` (at the best checkpoint's step when known). Its
mode follows Trainer's own default: ``min`` for names ending in "loss", else
``max``. A non-distributed run saves one CUDA state (the current device's); it
becomes device 0's.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from savegame.errors import CorruptCheckpointError
from savegame.migrate.builder import Draft, early_stopping_state
from savegame.migrate.files import Loader, list_dir, read_json_object
from savegame.migrate.values import as_float
from savegame.migrate.weights import load_weights

LAYOUT = "hf-trainer"
COUNTS_EPOCHS = False

STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.json"
MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json")
OBJECT_FILES = {"optimizer.pt": "optimizer", "scheduler.pt": "scheduler", "scaler.pt": "scaler"}
RNG_KINDS = {"python": "python", "numpy": "numpy", "cpu": "torch", "cuda": "cuda"}
NOT_READ = {"training_args.bin": "a pickled TrainingArguments; never read"}
_CHECKPOINT_STEP = re.compile(r"checkpoint-(\d+)$")


def matches(directory: Path) -> bool:
    return (directory / STATE_FILE).is_file() or any(n.startswith("rng_state") and n.endswith(".pth")
                                                     for n in list_dir(directory))


def convert(directory: Path, loader: Loader) -> Draft:
    draft = Draft()
    read: set[str] = set()
    model = next((name for name in MODEL_FILES if (directory / name).is_file()), None)
    if model is not None:
        state, files = load_weights(directory / model, loader)
        draft.model(model, state)
        read.update(files)
        if model.startswith("model.safetensors"):
            _tied_weights_note(draft, directory, model)
    for name, target in OBJECT_FILES.items():
        if (directory / name).is_file():
            draft.obj(name, loader.load_torch(directory / name), target)
            read.add(name)
    rng_file = next((n for n in ("rng_state.pth", "rng_state_0.pth") if (directory / n).is_file()), None)
    if rng_file is not None:
        _rng(draft, rng_file, loader.load_torch(directory / rng_file))
        read.add(rng_file)
    if (directory / STATE_FILE).is_file():
        _trainer_state(draft, read_json_object(directory / STATE_FILE))
        read.add(STATE_FILE)
    if (directory / CONFIG_FILE).is_file():  # the model's configuration: kept as the checkpoint's extra
        draft.config(CONFIG_FILE, read_json_object(directory / CONFIG_FILE))
        read.add(CONFIG_FILE)
    for name in list_dir(directory):
        if name not in read:
            draft.leave_out(name, NOT_READ.get(name, "other ranks' RNG" if name.startswith("rng_state_") else ""))
    return draft


def _tied_weights_note(draft: Draft, directory: Path, model: str) -> None:
    """save_pretrained writes a tied parameter once; say what to do when restore misses its other name."""
    if not (directory / "config.json").is_file():
        return
    config = read_json_object(directory / "config.json")
    if config.get("tie_word_embeddings", True) is not False:  # transformers' default is True
        draft.notes.append(tied_weights_note(model, "config.json ties the word embeddings"))


def tied_weights_note(model: str, why: str) -> str:
    """What to do when a safetensors model file left out the second name of a tied weight."""
    return (f"{model} may hold tied weights under one name only ({why}; safetensors cannot store one tensor "
            "twice, so its writer drops the second name, e.g. lm_head.weight). restore() gives such a name the "
            "tensor your model ties it to, so a model that ties them restores as usual. A model that does not tie "
            "them gets the name reported missing: tie it before restoring, or restore(strict=False) and set it.")


def _rng(draft: Draft, name: str, states: Any) -> None:
    if not isinstance(states, Mapping):
        raise CorruptCheckpointError(f"{name} holds a {type(states).__name__}, not a dict of RNG states")
    for key, value in states.items():
        kind = RNG_KINDS.get(key) if isinstance(key, str) else None
        if kind is None:
            draft.leave_out(f"{name}:{key}", "no such generator in savegame")
        else:
            draft.put_rng(kind, f"{name}:{key}", value)


def _trainer_state(draft: Draft, state: dict[str, Any]) -> None:
    used = {"global_step", "epoch", "log_history", "best_metric", "best_model_checkpoint", "best_global_step",
            "stateful_callbacks"}
    if "global_step" in state:
        draft.set_step(f"{STATE_FILE}:global_step", state["global_step"])
    if state.get("epoch") is not None:
        draft.set_epoch(f"{STATE_FILE}:epoch", state["epoch"])
    history = [e for e in state.get("log_history") or [] if isinstance(e, Mapping)]
    _log_history(draft, history)
    metric = _best(draft, state, history)
    _early_stopping(draft, state, metric)
    for key in state:
        if key not in used:
            draft.leave_out(f"{STATE_FILE}:{key}")


def _log_history(draft: Draft, history: list[Mapping[str, Any]]) -> None:
    """Each logged step becomes one history line (train and eval logs of a step merged); the values
    logged at the checkpoint's step become its metrics."""
    steps: dict[int, tuple[int | None, dict[str, Any]]] = {}
    for entry in history:
        step, epoch = entry.get("step"), as_float(entry.get("epoch"))
        if type(step) is not int or step < 0:
            continue
        numbers = {k: v for k, v in entry.items() if k not in ("step", "epoch") and as_float(v) is not None}
        known = None if epoch is None or not math.isfinite(epoch) or epoch < 0 else math.floor(epoch)
        previous = steps.get(step, (None, {}))
        steps[step] = (known if known is not None else previous[0], {**previous[1], **numbers})
    for step, (epoch, numbers) in sorted(steps.items()):
        draft.add_history(step, epoch, numbers)
    at_checkpoint = steps[draft.step][1] if draft.step in steps else {}
    for key, value in at_checkpoint.items():
        draft.metric(f"{STATE_FILE}:log_history[step={draft.step}].{key}", value, key)
    if history:
        draft.map(f"{STATE_FILE}:log_history", f"metrics history ({len(steps)} steps)")


def _best(draft: Draft, state: Mapping[str, Any], history: list[Mapping[str, Any]]) -> str | None:
    value = as_float(state.get("best_metric"))
    if value is None or not math.isfinite(value):
        return None
    step = state.get("best_global_step")
    if type(step) is not int:
        found = _CHECKPOINT_STEP.search(str(state.get("best_model_checkpoint") or ""))
        step = int(found.group(1)) if found else None
    names = {k for e in history if step is None or e.get("step") == step
             for k, v in e.items() if k.startswith("eval_") and as_float(v) == value}
    if len(names) != 1:
        draft.leave_out(f"{STATE_FILE}:best_metric", "which metric it is is not recorded; "
                        + ("several match" if names else "no logged eval_* value matches"))
        return None
    metric = names.pop()
    draft.best_value(f"{STATE_FILE}:best_metric", value, metric, "min" if metric.endswith("loss") else "max", step)
    return metric


def _early_stopping(draft: Draft, state: Mapping[str, Any], metric: str | None) -> None:
    callbacks = state.get("stateful_callbacks")
    if not isinstance(callbacks, Mapping):
        return
    for name, saved in callbacks.items():
        source = f"{STATE_FILE}:stateful_callbacks.{name}"
        saved = saved[0] if isinstance(saved, list) and len(saved) == 1 else saved
        attributes = _field(saved, "attributes")
        counter = attributes.get("early_stopping_patience_counter")
        if name != "EarlyStoppingCallback" or type(counter) is not int or metric is None:
            draft.leave_out(source)
            continue
        mode, entries = draft.best[metric]
        patience = _field(saved, "args").get("early_stopping_patience")
        draft.early_stopping = early_stopping_state(  # best_step None: the import's step
            metric, mode, best=entries[0][0], best_step=entries[0][1], bad_epochs=counter,
            patience=patience if type(patience) is int else None)
        draft.map(source, "run.early_stopping")


def _field(value: Any, key: str) -> Mapping[str, Any]:
    inner = value.get(key) if isinstance(value, Mapping) else None
    return inner if isinstance(inner, Mapping) else {}
