"""A trainer SIGKILLed right after a durable save can be restarted at once.

Its forked children (DataLoader workers, any process it forked without exec) outlive
it for a while; they must not keep the run directory's lock, or every restart loop
(torchrun --max-restarts, Kubernetes, SLURM requeue) fails with RunLockedError.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import savegame
from savegame.errors import RunLockedError
from tests.integration.procs import child_env

CHILD = Path(__file__).parent / "_lock_fork_child.py"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_restart_right_after_a_kill_gets_the_run_while_the_loader_workers_live_on(tmp_path):
    proc = subprocess.Popen([sys.executable, str(CHILD), str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env=child_env())
    workers: set[int] = set()
    watchdog = threading.Timer(60, proc.kill)  # a trainer that hangs is killed: the loop below then ends
    watchdog.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            word, _, rest = line.strip().partition(" ")
            if word == "worker":
                workers.add(int(rest))
            elif word == "durable":
                break
        else:
            pytest.fail(f"the trainer ended before its save was durable (exit {proc.wait(timeout=10)})")
        watchdog.cancel()
        with pytest.raises(RunLockedError, match=f"it is held by process {proc.pid}, which is alive"):
            savegame.Checkpointer(tmp_path, {"model": torch.nn.Linear(1, 1)})
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
        assert len(workers) == 2 and all(_alive(pid) for pid in workers), "the workers should outlive the trainer"
        # at once, no retry: the workers must not hold the lock
        with savegame.Checkpointer(tmp_path, {"model": torch.nn.Linear(1, 1)}) as ckpt:
            assert ckpt.restore().step == 1
    finally:
        watchdog.cancel()
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # already gone
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_forked_child_neither_keeps_the_lock_nor_releases_it(tmp_path):
    report, go = os.pipe(), os.pipe()
    with savegame.Checkpointer(tmp_path, {"m": torch.nn.Linear(1, 1)}):
        pid = os.fork()
        if pid == 0:  # the child: the parent's lock must still stand against it; then it lingers
            answer = b"acquired"
            try:
                savegame.run.directory.RunLock(str(tmp_path)).acquire()
            except RunLockedError:
                answer = b"refused"
            except Exception as exc:  # reported, so the parent never waits for an answer that will not come
                answer = repr(exc).encode()
            finally:
                os.write(report[1], answer)
                os.read(go[0], 1)
                os._exit(0)
        try:
            assert os.read(report[0], 4096) == b"refused"
        except BaseException:
            os.write(go[1], b"x")
            raise
    try:  # the parent let go while its child lives on: the run is free at once
        with savegame.Checkpointer(tmp_path, {"m": torch.nn.Linear(1, 1)}):
            pass
    finally:
        os.write(go[1], b"x")
        os.waitpid(pid, 0)
        for fd in (*report, *go):
            os.close(fd)


def test_a_holder_that_is_gone_is_named_as_not_running(tmp_path):
    """A lock kept by a child forked outside Python: the message says the named holder no longer runs."""
    gone = subprocess.Popen(["true"])
    gone.wait(timeout=10)
    fd = os.open(tmp_path / ".savegame.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"{gone.pid} {socket.gethostname()}\n".encode())
        with pytest.raises(RunLockedError, match=f"held by process {gone.pid}, which is not running"):
            savegame.Checkpointer(tmp_path, {"m": torch.nn.Linear(1, 1)})
        os.pwrite(fd, b"4242 another-host\n", 0)
        with pytest.raises(RunLockedError, match="process 4242 on host 'another-host'"):
            savegame.Checkpointer(tmp_path, {"m": torch.nn.Linear(1, 1)})
    finally:
        os.close(fd)
