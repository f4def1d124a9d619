"""Start an N-rank gloo job of a worker script as plain subprocesses, with an outer timeout.

Each rank gets RANK, WORLD_SIZE, MASTER_ADDR and a free MASTER_PORT (as torchrun sets
them) and initialises the group itself with a short timeout, so a hang fails in
seconds. A rank that does not finish within ``timeout`` is killed and the test fails.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(script: str, world: int, *args: str, timeout: float = 90, expect_ok: bool = True,
        env: dict[str, str] | None = None) -> list[subprocess.CompletedProcess[str]]:
    """Run ``script`` (a path) on ``world`` ranks; return each rank's completed process."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        rank_env = {**os.environ, **(env or {}), "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
        procs.append(subprocess.Popen([sys.executable, script, *args], env=rank_env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if expect_ok:
        for rank, c in enumerate(done):
            assert c.returncode == 0, f"rank {rank} exited {c.returncode}:\n{c.stdout[-3000:]}\n{c.stderr[-6000:]}"
    return done


def results(done: list[subprocess.CompletedProcess[str]]) -> list[dict]:
    """The last JSON line each rank printed."""
    return [json.loads([line for line in c.stdout.splitlines() if line.startswith("{")][-1]) for c in done]
