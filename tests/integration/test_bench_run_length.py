"""The run-length benchmark runs end to end on tiny sizes, so it cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.integration.procs import ROOT, child_env


def test_run_length_benchmark_small_run(tmp_path):
    out_file = tmp_path / "rows.json"
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_run_length.py"), "--small", "--dir",
                          str(tmp_path), "--out", str(out_file)], capture_output=True, text=True, timeout=300,
                         env=child_env(), check=False)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = json.loads(out_file.read_text())["rows"]
    assert [(r["checkpoints"], r["retention"]) for r in rows] == [
        (10, "none"), (10, "keep_last=3, keep_every=10"), (50, "none"), (50, "keep_last=3, keep_every=10")]
    assert all(r["save_wait_ms"] > 0 and r["open_s"] > 0 for r in rows)
    assert all(r["ls_s"] > 0 for r in rows if r["retention"] == "none")
    assert "| checkpoints | retention |" in out.stdout
