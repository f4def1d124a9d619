"""Hugging Face Accelerate ``Accelerator.save_state`` directories.

Files: ``model.safetensors`` / ``pytorch_model.bin`` (``model_1.safetensors``, ...
for further models), ``optimizer.bin`` (``optimizer_1.bin``, ...),
``scheduler.bin`` (...), ``scaler.pt`` and ``random_states_0.pkl``: rank 0's
``{"step", "random_state", "numpy_random_seed", "torch_manual_seed",
"torch_cuda_manual_seed"}``, written by torch.save (a zip) by current Accelerate
and as a plain pickle by some tools; both are read safely. Samplers, data-loader
states and ``custom_checkpoint_N.pkl`` files are never read. Without a ``step``
in the RNG file the step is 0: the ``checkpoint_N`` directory number counts
saves, not steps.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from savegame.errors import CorruptCheckpointError
from savegame.migrate.draft import Draft, ForeignCheckpoint
from savegame.migrate.restricted_unpickler import safe_pickle_load
from savegame.migrate.weights import TorchLoader, load_weights

LAYOUT = "accelerate"

RNG_FILE = "random_states_0.pkl"
RNG_KINDS = {"random_state": "python", "numpy_random_seed": "numpy", "torch_manual_seed": "torch",
             "torch_cuda_manual_seed": "cuda"}
_MODEL = re.compile(r"^(?P<base>model|pytorch_model)(?:_(?P<n>\d+))?\.(?:safetensors|bin)(?:\.index\.json)?$")
_OBJECT = re.compile(r"^(?P<base>optimizer|scheduler)(?:_(?P<n>\d+))?\.bin$")


def matches(directory: Path) -> bool:
    return any(directory.glob("random_states_*.pkl")) or (directory / "optimizer.bin").is_file()


def convert(directory: Path, load_torch: TorchLoader) -> ForeignCheckpoint:
    draft = Draft()
    read: set[str] = set()
    names = sorted(p.name for p in directory.iterdir())
    for name in _by_index(names, _MODEL):
        target = _numbered("model", name, _MODEL)
        if target in draft.state:
            draft.leave_out(name, f"state.{target} was read from another file")
        else:
            state, files = load_weights(directory / name, load_torch)
            draft.model(name, state, target)
            read.update(files)
        read.add(name)
    for name in _by_index(names, _OBJECT):
        draft.obj(name, load_torch(directory / name), _numbered(None, name, _OBJECT))
        read.add(name)
    if "scaler.pt" in names:
        draft.obj("scaler.pt", load_torch(directory / "scaler.pt"), "scaler")
        read.add("scaler.pt")
    if RNG_FILE in names:
        _rng(draft, _load_rng(directory / RNG_FILE, load_torch))
        read.add(RNG_FILE)
    for name in names:
        if name not in read:
            draft.leave_out(name, "never read" if name.endswith((".pkl", ".bin")) else "")
    return draft.finish(LAYOUT)


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


def _load_rng(file: Path, load_torch: TorchLoader) -> Any:
    return load_torch(file) if zipfile.is_zipfile(file) else safe_pickle_load(file)


def _rng(draft: Draft, states: Any) -> None:
    if not isinstance(states, Mapping):
        raise CorruptCheckpointError(f"{RNG_FILE} holds a {type(states).__name__}, not a dict of RNG states")
    for key, value in states.items():
        source = f"{RNG_FILE}:{key}"
        if key == "step":
            draft.set_step(source, value)
        elif isinstance(key, str) and key in RNG_KINDS:
            draft.put_rng(RNG_KINDS[key], source, value)
        else:
            draft.leave_out(source, "no such generator in savegame")
