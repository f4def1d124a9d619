"""Run a child Python script and SIGKILL it when it prints a chosen line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def child_env() -> dict[str, str]:
    """The environment for a child Python that imports savegame and the tests package."""
    path = [p for p in (os.environ.get("PYTHONPATH"), str(ROOT / "src"), str(ROOT)) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def run(script: Path, *args: str, kill_on: str | None = None, timeout: float = 120) -> int:
    proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, text=True, env=child_env())
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            if kill_on is not None and line.strip() == kill_on:
                os.kill(proc.pid, signal.SIGKILL)
                break
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
