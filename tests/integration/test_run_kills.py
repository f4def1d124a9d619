"""SIGKILL at random moments of a save loop, many times, including in the middle of writes.

A zygote process (imports done once) forks each save loop; the test kills it either
a random few milliseconds after a save returned (the background write is then in
flight) or right as it announces a chosen storage operation (mid-write, mid-commit,
mid-retention). After every kill: every listed checkpoint verifies, restore() returns
the newest listed step, which is at least the last step the child reported durable,
with exactly its content, and the next child carries on from there. Then ``savegame prune
--keep-last 1`` runs, as a user cleaning up after the crash would: the checkpoint that is
best by the recorded metrics survives it, and so does every alias's target.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import torch
from click.testing import CliRunner

import savegame
from savegame import policies
from savegame.cli import main as cli_main
from savegame.engine.reader import verify_checkpoint
from savegame.run.directory import RunDir
from savegame.storage import LocalStorage
from tests.integration.procs import child_env, run

HERE = Path(__file__).parent
KILLS = 40


class Zygote:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(HERE / "_run_kill_zygote.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=child_env())
        self.pid: int | None = None  # the save loop running now

    def kill_one(self, run_dir: Path, rng: random.Random) -> tuple[int, int, str]:
        """Run one save loop and SIGKILL it; return (resumed step, last durable step reported, how it was killed)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{run_dir}\n")
        self.proc.stdin.flush()
        pid, resumed, durable, fired = None, -1, -1, False
        target, by_op = None, rng.random() < 0.5
        ops_left, delay = rng.randint(1, 12), rng.uniform(0.0, 0.02)
        how = ""
        for line in self.proc.stdout:
            word, _, rest = line.strip().partition(" ")
            if word == "exit":
                assert int(rest) == -signal.SIGKILL, f"the child was not killed but ended with {rest}"
                return resumed, durable, how
            if word == "child":
                pid = self.pid = int(rest)
            elif word == "resumed":
                resumed = int(rest)
                durable = max(durable, resumed)
                target = resumed + rng.randint(1, 6)
            elif word == "durable":
                durable = max(durable, int(rest))
            elif fired or pid is None:
                continue
            elif word == "saved" and int(rest) == target and not by_op:
                fired, how = True, f"{delay * 1000:.1f} ms after save({target}) returned"
                threading.Timer(delay, os.kill, (pid, signal.SIGKILL)).start()  # a random instant, not a wait
            elif word == "op" and target is not None and durable >= target - 1:
                ops_left -= 1
                if ops_left == 0:
                    fired, how = True, f"at '{rest}'"
                    os.kill(pid, signal.SIGKILL)
        raise AssertionError("the zygote ended")

    def close(self) -> None:
        """End the zygote; a save loop a failed test left running is killed first."""
        assert self.proc.stdin is not None
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # already killed, as it should be
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def check(run_dir: Path, durable: int, how: str) -> int:
    storage = LocalStorage(run_dir)
    names = RunDir(storage).names()
    for name in names:
        assert verify_checkpoint(storage, name) == [], (how, name)
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.Linear(1024, 256))
    with savegame.Checkpointer(run_dir, {"model": model}) as ckpt:
        info = ckpt.restore()
    assert info is not None, how
    assert info.step == max(int(name[5:15]) for name in names), how
    assert info.step >= durable, f"killed {how}: restored {info.step}, but {durable} was reported durable"
    assert all(p.eq(float(info.step)).all() for p in model.parameters()), how
    return info.step


def prune_keeps_the_best(run_dir: Path, how: str) -> None:
    records = [info.record() for info in RunDir(LocalStorage(run_dir)).infos()]
    best = policies.rank_best(policies.latest_saves(records), "loss", "min")[0].name
    result = CliRunner().invoke(cli_main, ["prune", str(run_dir), "--keep-last", "1"])
    assert result.exit_code == 0, (how, result.output)
    names = RunDir(LocalStorage(run_dir)).names()
    assert best in names, f"killed {how}: prune deleted the best checkpoint {best}:\n{result.output}"
    for alias in run_dir.glob("*.alias.json"):
        target = RunDir(LocalStorage(run_dir)).read_alias(alias.name.removesuffix(".alias.json"))
        assert target is None or target in names, (how, alias.name, target, names)


def test_sigkill_at_random_moments_many_times(tmp_path):
    rng = random.Random(20261123)
    run_dir = tmp_path / "run"
    zygote = Zygote()
    newest, ways = 0, set()
    try:
        for _ in range(KILLS):
            resumed, durable, how = zygote.kill_one(run_dir, rng)
            assert resumed == newest  # the next process carries on from the newest durable step
            newest = check(run_dir, durable, how)
            prune_keeps_the_best(run_dir, how)
            ways.add(how.split(" ")[0] if how.startswith("at") else "timer")
    finally:
        zygote.close()
    assert ways == {"timer", "at"}  # killed both at random instants and right at storage operations
    assert newest > KILLS  # it made progress across kills
    assert run(HERE / "_save_loop_child.py", str(run_dir), str(newest + 3)) == 0  # a fresh interpreter goes on
    assert check(run_dir, newest + 3, "after the last run") == newest + 3
