"""Golden files of every foreign layout: each imports exactly to what was committed with it.

Each golden directory under tests/compat/data/foreign/ holds a checkpoint written
by the real tool (Lightning, HF Trainer, Accelerate: make_real_tools.py) or, for
layouts no installable tool writes, by make_foreign.py, and beside it what its
import must give (expected.json + expected.safetensors, see expected.py): the saved
states bit for bit, the RNG states, step, epoch, best values and early stopping.
Nothing is re-trained here: float kernels differ between CPUs, so a golden test
compares the import of a committed file with expectations committed with it.
The committed checksums catch a golden file changed on disk.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from savegame.engine import rng as sg_rng
from savegame.migrate import ForeignCheckpoint, import_checkpoint
from tests.compat.expected import read_expected
from tests.compat.make_foreign import (
    GOLDEN,
    GOLDEN_LAYOUTS,
    REAL_TOOL_LAYOUTS,
    SUMS,
    assert_same,
    build,
    sha256sums,
)

ALL_LAYOUTS = (*GOLDEN_LAYOUTS, *REAL_TOOL_LAYOUTS)
REGENERATE = "python -m tests.compat.make_foreign --force (only for an intended, reviewed change)"
#: The files that hold an object savegame refuses (a framework's class): imported with drop_unsafe.
DROP_UNSAFE = {"001-flat-rng-args", "004-format-v1"}


def test_golden_files_match_their_committed_checksums() -> None:
    assert (GOLDEN / SUMS).read_text() == sha256sums(GOLDEN), (
        f"files under {GOLDEN} differ from {SUMS}: golden files must never change; restore them with git")


def test_every_golden_layout_is_present() -> None:
    assert sorted(p.name for p in GOLDEN.iterdir() if p.is_dir()) == sorted(ALL_LAYOUTS)


def _import(name: str, root: Path = GOLDEN) -> tuple[ForeignCheckpoint, dict[str, Any]]:
    expected = read_expected(GOLDEN / name)
    return import_checkpoint(root / name / expected["source"], drop_unsafe=name in DROP_UNSAFE), expected


def _global_rng_states() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


@pytest.mark.parametrize("name", ALL_LAYOUTS)
def test_golden_file_imports_exactly(name: str) -> None:
    golden, expected = _import(name)
    assert (golden.layout, golden.step, golden.epoch) == (expected["layout"], expected["step"], expected["epoch"])
    state = golden.tree["state"]
    assert sorted(state) == sorted(expected["state"])
    for obj, saved in expected["state"].items():  # safetensors files list a model's keys sorted: order is no state
        assert sorted(state[obj]) == sorted(saved), obj
        for key, value in saved.items():
            assert_same(state[obj][key], value, f"state.{obj}.{key}")

    if expected["rng"] is not None:  # restoring sets the generators to the states the tool saved
        before = _global_rng_states()
        try:
            sg_rng.restore(golden.tree["rng"])
            restored = _global_rng_states()
        finally:
            random.setstate(before["python"]), np.random.set_state(before["numpy"])
            torch.set_rng_state(before["torch"])
        assert_same({k: restored[k] for k in expected["rng"]}, expected["rng"], "rng")

    assert golden.tree["run"]["best"] == expected["best"]
    stopping = golden.tree["run"]["early_stopping"]
    if expected["early_stopping"] is None:
        assert stopping is None
    else:
        assert {k: stopping[k] for k in expected["early_stopping"]} == expected["early_stopping"]
    assert [line["step"] for line in golden.history] == expected["history_steps"]
    if "hyper_parameters" in expected:  # the config snapshot the tool saved, kept as the checkpoint's extra
        assert golden.extra["hyper_parameters"] == expected["hyper_parameters"]


def _shape(value: Any) -> Any:
    """What a re-run of a generator must reproduce on any CPU: structure, dtypes, shapes, exact plain values;
    not the values of tensors and floats, which float kernels compute differently on other CPUs."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, tuple(value.shape))
    if isinstance(value, np.ndarray):
        return ("ndarray", value.dtype, value.shape)
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_shape(v) for v in value)
    if isinstance(value, float):
        return float
    return value


@pytest.mark.parametrize("name", GOLDEN_LAYOUTS)
def test_generator_still_writes_what_the_golden_files_hold(name: str, tmp_path: Path) -> None:
    build(name, tmp_path)
    regenerated, _ = _import(name, tmp_path)
    golden, _ = _import(name)
    for field in ("layout", "step", "epoch", "mapped", "left_out", "notes"):
        assert getattr(regenerated, field) == getattr(golden, field), (
            f"make_foreign.py now writes {name} differently ({field}); the golden files stay as they are. "
            f"If the change is intended, regenerate them with {REGENERATE}")
    assert _shape(regenerated.tree) == _shape(golden.tree), (
        f"make_foreign.py now writes {name} with another structure; if intended, regenerate with {REGENERATE}")
