"""The ``savegame`` command as a real process (``python -m savegame.cli``): exit codes and stderr."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

import savegame


def savegame_cli(*args: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "savegame.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=env)


def make_run(path) -> str:
    model = torch.nn.Linear(4, 2)
    with savegame.Checkpointer(path, state={"model": model}, async_save=False) as ckpt:
        for step in (1, 2):
            with torch.no_grad():
                model.weight.add_(1.0)
            ckpt.save(step, metrics={"loss": 1.0 / step})
    return str(path)


def test_exit_codes_of_a_real_process(tmp_path):
    run = make_run(tmp_path / "run")
    ok = savegame_cli("verify", run)
    assert ok.returncode == 0 and "all 2 checkpoint(s) intact" in ok.stdout and ok.stderr == ""

    differ = savegame_cli("diff", "--exit-code", os.path.join(run, "step-0000000001"), run)
    assert differ.returncode == 1 and "state.model.weight" in differ.stdout

    tensors = os.path.join(run, "step-0000000002", "tensors-00000.safetensors")
    os.truncate(tensors, os.path.getsize(tensors) - 1)
    bad = savegame_cli("verify", run)
    assert bad.returncode == 1
    assert [line.split()[1] for line in bad.stdout.splitlines() if line.startswith("DAMAGED")] == ["step-0000000002:"]


def test_usage_error_is_one_line_and_debug_adds_the_traceback(tmp_path):
    usage = savegame_cli("ls", "--no-such-option", tmp_path)
    assert usage.returncode == 2 and usage.stdout == ""
    [line] = usage.stderr.splitlines()
    assert line.startswith("savegame: error: No such option") and "--no-such-option" in line
    assert line.endswith("(see 'savegame ls --help')")

    (tmp_path / "step-0000000001").mkdir()  # looks like a checkpoint, has no manifest
    debug = savegame_cli("--debug", "inspect", tmp_path / "step-0000000001")
    assert debug.returncode == 2
    assert "Traceback (most recent call last)" in debug.stderr and "CorruptCheckpointError" in debug.stderr
    last = debug.stderr.strip().splitlines()[-1]
    assert last.startswith("savegame: error: ") and "manifest" in last
