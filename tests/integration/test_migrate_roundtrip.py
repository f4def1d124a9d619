"""Every recognised layout through the real CLI: build it the way its tool does, run
``savegame migrate SRC --to RUN_DIR`` as a process, then resume with
``savegame.Checkpointer(RUN_DIR, state={fresh objects}).restore()``.

The restore must be exact: model, optimizers, schedulers and scaler bit for bit,
the global RNGs drawing what they would have drawn after the save, step and epoch,
the early stopping the tool recorded, its best values, and its metrics history.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import savegame
from savegame import EarlyStopping
from tests.compat.make_foreign import Built, build

REPO = Path(__file__).resolve().parents[2]


def savegame_cli(*args: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "savegame.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=180, env=env, cwd=REPO, check=False)


def resume(run: Path, built: Built) -> tuple[dict[str, Any], Any, EarlyStopping | None]:
    """Restore ``run`` into fresh objects the way a training script would."""
    fresh = built.fresh()
    expected = built.early_stopping
    es = EarlyStopping(expected["metric"], mode=expected["mode"], patience=10) if expected else None
    with savegame.Checkpointer(run, state=fresh, early_stopping=es, async_save=False) as ckpt:
        info = ckpt.restore()  # strict, tied weights included
    return fresh, info, es


#: Every layout, plus the variants that change what a resume needs (legacy format, --drop-unsafe, tied weights).
#: make_foreign.BUILDERS has two more (flat RNG without args, Accelerate's pickled RNG), imported in the unit tests.
LAYOUTS = ["000-nested-rng", "001-flat-rng-args", "001-flat-rng-legacy", "003-state-dicts-compiled", "004-format-v1",
           "state-dict-ddp", "state-dict-safetensors", "lightning", "hf-trainer", "hf-trainer-tied", "accelerate"]


@pytest.mark.parametrize("name", LAYOUTS)
def test_migrate_then_restore_exactly(name: str, tmp_path: Path) -> None:
    built = build(name, tmp_path / "foreign")
    run = tmp_path / "run"
    done = savegame_cli("migrate", built.source, "--to", run, *built.flags)
    assert done.returncode == 0, done.stderr
    assert f"layout: {built.layout}" in done.stdout and f"wrote {run}" in done.stdout

    fresh, info, es = resume(run, built)
    built.assert_restored(fresh)
    built.assert_draws()  # the RNG states were set by restore(): the next draws continue the saved stream
    assert (info.step, info.epoch) == (built.step, built.epoch)
    if es is not None and built.early_stopping is not None:
        state = es.state_dict()
        assert {k: state[k] for k in ("best", "best_step", "bad_epochs")} == {
            k: built.early_stopping[k] for k in ("best", "best_step", "bad_epochs")}
    loaded = savegame.load(run)
    assert loaded["run"]["best"] == built.best
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [*built.history_steps, built.step]
    if name == "hf-trainer-tied":
        assert "tied" in done.stdout
        assert fresh["model"].head.weight is fresh["model"].embed.weight  # still tied, with the saved values
