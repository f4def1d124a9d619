"""Bit-exact training across SIGKILL: the resumed run equals one never stopped."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

import savegame
from tests.integration.procs import run

CHILD = Path(__file__).with_name("_train_child.py")
TOTAL, SAVE_EVERY = 40, 10


def losses(path: Path) -> dict[int, str]:
    out: dict[int, str] = {}
    for line in path.read_text().splitlines():
        step, loss = json.loads(line)
        assert out.setdefault(step, loss) == loss, f"step {step} was redone with a different loss"
        out[step] = loss
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    base = tmp_path_factory.mktemp("reference")
    assert run(CHILD, str(base / "run"), str(base / "losses"), str(TOTAL), str(SAVE_EVERY)) == 0
    return losses(base / "losses"), savegame.load(base / "run")["state"]["model"]


@pytest.mark.parametrize("kills", [[17], [3, 25], [10, 11]], ids=["one-kill", "two-kills", "kill-right-after-save"])
def test_killed_and_resumed_run_is_bit_identical(tmp_path, reference, kills):
    ref_losses, ref_model = reference
    run_dir, log = str(tmp_path / "run"), tmp_path / "losses"
    for kill_at in kills:
        code = run(CHILD, run_dir, str(log), str(TOTAL), str(SAVE_EVERY), kill_on=f"step {kill_at}")
        assert code == -signal.SIGKILL
    assert run(CHILD, run_dir, str(log), str(TOTAL), str(SAVE_EVERY)) == 0
    assert losses(log) == ref_losses
    model = savegame.load(run_dir)["state"]["model"]
    assert list(model) == list(ref_model)
    assert all(torch.equal(model[k], ref_model[k]) for k in model)
