"""Golden files of every foreign layout: written once by make_foreign.py, never regenerated silently.

Each golden file (tests/compat/data/foreign/) must import exactly: into fresh objects
with the saved state, the RNG draws that followed the save, step, epoch, best and
early stopping. The generator is run again into a temporary directory: if what it
writes no longer imports to what the golden files import to, the test fails (it
never rewrites them); the committed checksums catch a golden file changed on disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from savegame import rng as sg_rng
from savegame.migrate import ForeignCheckpoint, import_checkpoint
from tests.compat.make_foreign import (
    GOLDEN,
    GOLDEN_LAYOUTS,
    SUMS,
    Built,
    assert_same,
    build,
    sha256sums,
)

REGENERATE = "python -m tests.compat.make_foreign --force (only for an intended, reviewed change)"


def test_golden_files_match_their_committed_checksums() -> None:
    assert (GOLDEN / SUMS).read_text() == sha256sums(GOLDEN), (
        f"files under {GOLDEN} differ from {SUMS}: golden files must never change; restore them with git")


def test_every_golden_layout_is_present() -> None:
    assert sorted(p.name for p in GOLDEN.iterdir() if p.is_dir()) == sorted(GOLDEN_LAYOUTS)


def _import(source: Path, built: Built) -> ForeignCheckpoint:
    return import_checkpoint(source, drop_unsafe="--drop-unsafe" in built.flags)


@pytest.mark.parametrize("name", GOLDEN_LAYOUTS)
def test_golden_file_imports_exactly(name: str, tmp_path: Path) -> None:
    built = build(name, tmp_path)
    golden = _import(GOLDEN / built.source.relative_to(tmp_path), built)
    assert golden.layout == built.layout and golden.step == built.step and golden.epoch == built.epoch

    fresh = built.fresh()
    for obj_name, obj in fresh.items():
        obj.load_state_dict(golden.tree["state"][obj_name])
    built.assert_restored(fresh)
    if built.draws is not None:
        sg_rng.restore(golden.tree["rng"])
        built.assert_draws()
    assert golden.tree["run"]["best"] == built.best
    stopping: dict[str, Any] = golden.tree["run"]["early_stopping"] or {}
    assert {k: stopping.get(k) for k in (built.early_stopping or {})} == (built.early_stopping or {})
    assert [line["step"] for line in golden.history] == built.history_steps


@pytest.mark.parametrize("name", GOLDEN_LAYOUTS)
def test_generator_still_writes_what_the_golden_files_hold(name: str, tmp_path: Path) -> None:
    built = build(name, tmp_path)
    regenerated = _import(built.source, built)
    golden = _import(GOLDEN / built.source.relative_to(tmp_path), built)
    for field in ("layout", "step", "epoch", "metrics", "mapped", "left_out", "history", "notes"):
        assert getattr(regenerated, field) == getattr(golden, field), (
            f"make_foreign.py now writes {name} differently ({field}); the golden files stay as they are. "
            f"If the change is intended, regenerate them with {REGENERATE}")
    try:
        assert_same(regenerated.tree, golden.tree, "tree")
    except AssertionError as exc:
        raise AssertionError(f"make_foreign.py now writes {name} with other values ({exc}); "
                             f"if intended, regenerate with {REGENERATE}") from None
