"""The ``savegame`` command as a real process (``python -m savegame.cli``): one-line errors and --debug.

Every verb's exit codes are checked in test_cli_exit_codes.py."""

from __future__ import annotations

import os
import subprocess
import sys


def savegame_cli(*args: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "savegame.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=env, check=False)


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
