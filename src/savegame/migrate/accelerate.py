"""Hugging Face Accelerate ``Accelerator.save_state`` directories.

Files: ``model.safetensors`` / ``pytorch_model.bin`` (``model_1.safetensors``, ...
for further models), ``optimizer.bin`` (``optimizer_1.bin``, ...),
``scheduler.bin`` (...), ``scaler.pt`` and ``random_states_0.pkl``: rank 0's
``{"step", "random_state", "numpy_random_seed", "torch_manual_seed",
"torch_cuda_manual_seed"}``, written by torch.save (a zip) by current Accelerate
and as a plain pickle by some tools; both are read safely. Samplers, data-loader
states and ``custom_checkpoint_N.pkl`` files are never read.

Accelerate records no global step. The ``step`` in the RNG file is its
gradient-accumulation counter, which restarts at every pass over the data, and
the ``checkpoint_N`` directory number counts saves. The step is taken from a
counter that means it: the first optimizer's step count (Adam-like optimizers
keep one per parameter), else the first scheduler's ``last_epoch`` (Accelerate
steps a prepared scheduler once per optimizer step); the report says which.
Without either the step is 0 and a note asks for ``--step``.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from savegame.errors import CorruptCheckpointError
from savegame.migrate.builder import Draft
from savegame.migrate.files import Loader, list_dir
from savegame.migrate.hf_trainer import tied_weights_note
from savegame.migrate.values import as_float
from savegame.migrate.weights import load_weights

LAYOUT = "accelerate"
COUNTS_EPOCHS = False

RNG_FILE = "random_states_0.pkl"
RNG_KINDS = {"random_state": "python", "numpy_random_seed": "numpy", "torch_manual_seed": "torch",
             "torch_cuda_manual_seed": "cuda"}
_MODEL = re.compile(r"^(?P<base>model|pytorch_model)(?:_(?P<n>\d+))?\.(?:safetensors|bin)(?:\.index\.json)?$")
_OBJECT = re.compile(r"^(?P<base>optimizer|scheduler)(?:_(?P<n>\d+))?\.bin$")


def matches(directory: Path) -> bool:
    names = list_dir(directory)
    return any(n.startswith("random_states_") and n.endswith(".pkl") for n in names) or "optimizer.bin" in names


def convert(directory: Path, loader: Loader) -> Draft:
    draft = Draft()
    read: set[str] = set()
    names = list_dir(directory)
    for name in _by_index(names, _MODEL):
        target = _numbered("model", name, _MODEL)
        if target in draft.state:
            draft.leave_out(name, f"state.{target} was read from another file")
        else:
            state, files = load_weights(directory / name, loader)
            draft.model(name, state, target)
            read.update(files)
            if ".safetensors" in name:  # Accelerate drops the second name of tied weights before writing
                draft.notes.append(tied_weights_note(name, "Accelerate writes safetensors without duplicates"))
        read.add(name)
    for name in _by_index(names, _OBJECT):
        draft.obj(name, loader.load_torch(directory / name), _numbered(None, name, _OBJECT))
        read.add(name)
    if "scaler.pt" in names:
        draft.obj("scaler.pt", loader.load_torch(directory / "scaler.pt"), "scaler")
        read.add("scaler.pt")
    if RNG_FILE in names:
        _rng(draft, _load_rng(directory / RNG_FILE, loader))
        read.add(RNG_FILE)
    _step(draft)
    for name in names:
        if name not in read:
            draft.leave_out(name, "never read" if name.endswith((".pkl", ".bin")) else "")
    return draft


def _by_index(names: list[str], pattern: re.Pattern[str]) -> list[str]:
    """Matching names: sharded indexes first, then safetensors, then .bin (the preferred file wins)."""
    matched = [n for n in names if pattern.match(n)]
    return sorted(matched, key=lambda n: (not n.endswith(".index.json"), not n.endswith(".safetensors"), n))


def _numbered(base: str | None, name: str, pattern: re.Pattern[str]) -> str:
    """model.bin -> model, model_1.bin -> model_1, optimizer_2.bin -> optimizer_2."""
    found = pattern.match(name)
    assert found is not None
    base = base or found.group("base")
    return base if found.group("n") in (None, "0") else f"{base}_{found.group('n')}"


def _load_rng(file: Path, loader: Loader) -> Any:
    return loader.load_torch(file) if zipfile.is_zipfile(file) else loader.load_pickle(file)


def _rng(draft: Draft, states: Any) -> None:
    if not isinstance(states, Mapping):
        raise CorruptCheckpointError(f"{RNG_FILE} holds a {type(states).__name__}, not a dict of RNG states")
    for key, value in states.items():
        source = f"{RNG_FILE}:{key}"
        if key == "step":
            draft.leave_out(source, f"{value!r:.20}: Accelerate's gradient-accumulation counter, which restarts "
                                    "every pass over the data, not the global step")
        elif isinstance(key, str) and key in RNG_KINDS:
            draft.put_rng(RNG_KINDS[key], source, value)
        else:
            draft.leave_out(source, "no such generator in savegame")


def _step(draft: Draft) -> None:
    """The global step: optimizer steps counted by the first optimizer, else by the first scheduler."""
    optimizer, scheduler = draft.state.get("optimizer"), draft.state.get("scheduler")
    counted = _optimizer_steps(optimizer)
    if counted is not None:
        draft.set_step("optimizer.bin:state[*].step (the optimizer's step count)", counted)
        return
    last = scheduler.get("last_epoch") if isinstance(scheduler, Mapping) else None
    if type(last) is int and last >= 0:
        draft.set_step("scheduler.bin:last_epoch (the scheduler's step count)", last)
        return
    draft.notes.append("Accelerate records no global step and neither optimizer.bin nor scheduler.bin counts one, "
                       "so the import is at step 0: pass the step the run had (savegame migrate SRC --to RUN_DIR "
                       "--step N).")


def _optimizer_steps(optimizer: Any) -> int | None:
    """The step count an optimizer keeps per parameter (Adam, AdamW, ...): their largest, when all are counts."""
    per_param = optimizer.get("state") if isinstance(optimizer, Mapping) else None
    if not isinstance(per_param, Mapping):
        return None
    steps = [as_float(s.get("step")) for s in per_param.values() if isinstance(s, Mapping) and "step" in s]
    counts = [s for s in steps if s is not None and s.is_integer() and s >= 0]
    if not counts or len(counts) != len(steps):
        return None
    return int(max(counts))
