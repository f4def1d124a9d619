"""Every verb's exit codes, from a real ``savegame`` process: 0 ok, 1 a finding, 2 usage or unreadable input.

Errors (exit 2) are exactly one line on stderr, ``savegame: error: ...``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import savegame
from savegame.cli import main

REPO = Path(__file__).resolve().parents[2]


def run_cli(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "savegame.cli", *args], capture_output=True, text=True,
                          timeout=180, env=env, cwd=REPO, check=False)


def make_run(path: Path) -> Path:
    model = torch.nn.Linear(4, 2)
    with savegame.Checkpointer(path, state={"model": model}, async_save=False) as ckpt:
        for step in (1, 2):
            with torch.no_grad():
                model.weight.add_(1.0)
            ckpt.save(step, metrics={"loss": 1.0 / step})
    return path


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, list[str], int, str]]:
    d = tmp_path_factory.mktemp("codes")
    run = make_run(d / "run")
    damaged = Path(shutil.copytree(run, d / "damaged"))
    tensors = damaged / "step-0000000002" / "tensors-00000.safetensors"
    os.truncate(tensors, tensors.stat().st_size - 1)
    empty = d / "empty"
    empty.mkdir()
    (d / "notes.txt").write_text("hello")
    torch.save({"model": torch.nn.Linear(2, 2).state_dict(), "epoch": 3}, d / "old.pth")
    torch.save({"model": {"w": torch.ones(2)}, "args": os.system}, d / "evil.pth")
    one, two = str(run / "step-0000000001"), str(run / "step-0000000002")
    return [  # (verb, arguments, exit code, a fragment of stdout for 0/1 or of the one stderr line for 2)
        ("ls", ["ls", str(run)], 0, "step-0000000002"),
        ("ls", ["ls", str(d / "nope")], 2, "does not exist"),
        ("verify", ["verify", str(run)], 0, "intact"),
        ("verify", ["verify", str(damaged)], 1, "DAMAGED step-0000000002"),
        ("verify", ["verify", str(empty)], 2, "no savegame checkpoint"),
        ("inspect", ["inspect", str(run)], 0, "model: tensors"),
        ("inspect", ["inspect", str(d / "notes.txt")], 2, "not a savegame checkpoint"),
        ("diff", ["diff", "--exit-code", one, one], 0, "identical"),
        ("diff", ["diff", "--exit-code", one, two], 1, "state.model.weight"),
        ("diff", ["diff", one, str(empty)], 2, "no savegame checkpoint"),
        ("export", ["export", str(run), "--to", str(d / "w.safetensors")], 0, "exported 2 tensors"),
        ("export", ["export", str(run), "--to", str(d / "w.bin")], 2, "unknown format"),
        ("prune", ["prune", str(run), "--keep-last", "1", "--dry-run"], 0, "would delete 1"),
        ("prune", ["prune", str(run), "--keep-last", "0"], 2, "--keep-last"),
        ("plot", ["plot", str(run), "--to", str(d / "p.png")], 0, "plotted loss"),
        ("plot", ["plot", str(empty), "--to", str(d / "q.png")], 2, "metrics.jsonl"),
        ("migrate", ["migrate", str(d / "old.pth"), "--to", str(d / "imported")], 0, "layout: dict-flat-rng"),
        ("migrate", ["migrate", str(d / "evil.pth"), "--to", str(d / "refused")], 2, "posix.system"),
    ]


def check(verb: str, args: list[str], code: int, fragment: str, returncode: int, stdout: str, stderr: str) -> None:
    assert returncode == code, (args, stdout, stderr)
    if code == 2:
        [line] = stderr.strip().splitlines()
        assert line.startswith("savegame: error: ") and fragment in line, (args, line)
    else:
        assert fragment in stdout, (args, stdout)


def test_every_verb_exits_0_1_or_2_as_documented(cases: list[tuple[str, list[str], int, str]]) -> None:
    """Every case through the command's entry point in this process (a fresh process per case costs ~1.5 s of
    imports); the next test runs one case of each exit code as a real process."""
    for verb, args, code, fragment in cases:
        done = CliRunner().invoke(main, args)
        check(verb, args, code, fragment, done.exit_code, done.stdout, done.stderr)
    assert {verb for verb, *_ in cases} == {"ls", "verify", "inspect", "diff", "export", "prune", "plot", "migrate"}


def test_a_real_process_exits_with_the_code(cases: list[tuple[str, list[str], int, str]]) -> None:
    """A finding (exit 1) from a real process; test_cli_process.py runs usage errors (exit 2) as processes."""
    verb, args, code, fragment = next(case for case in cases if case[2] == 1)
    done = run_cli(args)
    check(verb, args, code, fragment, done.returncode, done.stdout, done.stderr)
