"""The benchmark script runs end to end on tiny sizes, so it cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.integration.procs import ROOT, child_env


def test_benchmark_small_run(tmp_path):
    out_file = tmp_path / "rows.json"
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_save_restore.py"), "--small", "--reps", "1",
                          "--dir", str(tmp_path), "--out", str(out_file)],
                         capture_output=True, text=True, timeout=300,
                         env=child_env())
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out_file.read_text())
    methods = {r["method"] for r in rows}
    assert {"raw write+fsync", "savegame async", "torch.save+fsync", "safetensors+fsync"} <= methods
    assert {r["state"] for r in rows} == {"big", "tiny", "model+adamw"}
    for row in rows:
        assert row["durable_s"] > 0 and row["blocked_s"] <= row["durable_s"] + 1e-9
    assert "| state | method |" in out.stdout
