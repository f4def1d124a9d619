"""`make demo-ddp` runs end to end: a 2-rank torchrun job SIGKILLed mid-epoch, resumed, every rank bit-identical."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.procs import ROOT, child_env

pytest.importorskip("sklearn")
TIMEOUT = 300  # seconds; the demo takes about a minute on 2 idle cores


def leftover_processes(marker: str) -> list[str]:
    """Command lines of running processes that mention ``marker`` (the demo's own directory)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            found.append(f"{proc.name}: {cmdline}")
    return found


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SAVEGAME_DEMO_DDP") != "1", reason=(
    "the torchrun demo runs on its own (`make demo-ddp`, or SAVEGAME_DEMO_DDP=1 pytest ...): inside the full "
    "suite its torchrun job fails to create gloo groups ('Broken pipe') once boto3 has been imported by the "
    "test process (the S3 tests import it at collection); alone it passes. Under investigation."))
def test_demo_ddp_kill_and_resume_is_bit_identical_on_every_rank(tmp_path):
    proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / "demo_ddp.py"), "--out", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the demo then SIGKILLs its torchrun job before exiting
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"demo_ddp.py did not finish within {TIMEOUT} s:\n{out[-3000:]}\n{err[-3000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out[-3000:] + err[-6000:]
    assert "torchrun exited with -9" in out  # the whole job really died of SIGKILL
    for rank in (0, 1):
        line = next(x for x in out.splitlines() if x.startswith(f"rank {rank}: "))
        assert line.startswith(f"rank {rank}: PASS  per-step losses (100 steps) equal, parameters equal, "
                               "optimizer+scheduler equal, RNG equal, resumed from step 40 equal"), line
    assert "final checkpoints read outside the job (savegame.load): equal" in out
    assert "(2/2 PASS)" in out
    if os.path.isdir("/proc"):
        assert leftover_processes(str(tmp_path)) == []  # no rank outlived the demo
