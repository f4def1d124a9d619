"""Start an N-rank gloo job of a worker script as plain subprocesses, with an outer timeout.

Each rank gets RANK, WORLD_SIZE, MASTER_ADDR and a free MASTER_PORT (as torchrun sets
them) and initialises the group itself with a short timeout, so a hang fails in
seconds. A rank that does not finish within ``timeout`` is killed and the test fails.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Zygote:
    """The rank-forking process of :mod:`tests.distributed._zygote`, one per test session (started when first
    needed, stopped at exit)."""

    def __init__(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": _pythonpath()}
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("_zygote.py"))], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self._pending = b""
        self.exits: dict[int, int] = {}
        self.order: list[int] = []
        atexit.register(self.stop)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def start(self, request: dict[str, object]) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        while not self.order:
            self._read(time.monotonic() + 60)
        return self.order.pop(0)

    def wait(self, pids: list[int], deadline: float) -> dict[int, int | None]:
        """Each pid's exit code, None for those still running at ``deadline``."""
        while not all(pid in self.exits for pid in pids) and self._read(deadline):
            pass
        return {pid: self.exits.pop(pid, None) for pid in pids}

    def _read(self, deadline: float) -> bool:
        """Take one line of the zygote's reports; False if none came before ``deadline``. The pipe is read
        with os.read, never through a buffered file: select() cannot see lines already in a file's buffer."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._pending:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return False
            data = os.read(fd, 1 << 16)
            if not data:
                raise RuntimeError(f"the rank zygote ended (exit {self.proc.wait()})")
            self._pending += data
        line, self._pending = self._pending.split(b"\n", 1)
        kind, pid, *code = line.decode().split()
        if kind == "pid":
            self.order.append(int(pid))
        else:
            self.exits[int(pid)] = int(code[0])
        return True

    def stop(self) -> None:
        if self.alive():
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


_ZYGOTE: list[Zygote] = []


def _zygote() -> Zygote:
    if not _ZYGOTE or not _ZYGOTE[0].alive():
        _ZYGOTE[:] = [Zygote()]
    return _ZYGOTE[0]


def _pythonpath() -> str:
    return os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])


def run(script: str, world: int, *args: str, timeout: float = 90, expect_ok: bool = True,
        env: dict[str, str] | None = None) -> list[subprocess.CompletedProcess[str]]:
    """Run ``script`` (a path) on ``world`` ranks; return each rank's completed process.

    Ranks are forked from a zygote that has imported torch already (see :mod:`tests.distributed._zygote`):
    each starts as ``python script args`` would, without 3 s of imports.
    """
    port = str(free_port())
    zygote = _zygote()
    pids = []
    with tempfile.TemporaryDirectory(prefix="ranks-") as logs:
        for rank in range(world):
            rank_env = {**os.environ, **(env or {}), "RANK": str(rank), "WORLD_SIZE": str(world),
                        "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                        "OMP_NUM_THREADS": "1", "PYTHONPATH": _pythonpath()}
            pids.append(zygote.start({"script": script, "args": list(args), "env": rank_env, "cwd": os.getcwd(),
                                      "out": f"{logs}/{rank}.out", "err": f"{logs}/{rank}.err"}))
        codes = zygote.wait(pids, time.monotonic() + timeout)
        for pid, code in codes.items():
            if code is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if any(code is None for code in codes.values()):
            zygote.wait([pid for pid, code in codes.items() if code is None], time.monotonic() + 30)
        done = [subprocess.CompletedProcess([script, *args], -9 if codes[pid] is None else codes[pid],
                                            Path(f"{logs}/{rank}.out").read_text(),
                                            Path(f"{logs}/{rank}.err").read_text())
                for rank, pid in enumerate(pids)]
    if any(code is None for code in codes.values()):
        raise AssertionError(f"ranks did not finish within {timeout} s:\n" +
                             "\n".join(f"rank {r}: {c.stderr[-3000:]}" for r, c in enumerate(done)))
    if expect_ok:
        for rank, c in enumerate(done):
            assert c.returncode == 0, f"rank {rank} exited {c.returncode}:\n{c.stdout[-3000:]}\n{c.stderr[-6000:]}"
    return done


def results(done: list[subprocess.CompletedProcess[str]]) -> list[dict]:
    """The last JSON line each rank printed."""
    return [json.loads([line for line in c.stdout.splitlines() if line.startswith("{")][-1]) for c in done]
