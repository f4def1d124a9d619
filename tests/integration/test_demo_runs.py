"""`make demo` runs end to end: a real SIGKILL, a resume in a new process, bit-identical results."""

from __future__ import annotations

import subprocess
import sys

from tests.integration.procs import ROOT, child_env


def test_demo_kill_and_resume_is_bit_identical(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "demo_kill_resume.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, env=child_env(), check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "exit -9" in out.stdout  # the child really died of SIGKILL
    assert "per-step losses equal bit for bit: True (150 steps compared)" in out.stdout
    assert "final weights equal bit for bit:  True" in out.stdout
