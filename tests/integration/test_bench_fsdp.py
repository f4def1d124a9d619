"""The FSDP2 benchmark runs end to end on a tiny model (two gloo ranks), so it cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.integration.procs import ROOT, child_env


def test_fsdp_benchmark_small_run(tmp_path):
    out_file = tmp_path / "fsdp.json"
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_fsdp.py"), "--small", "--reps", "1",
                          "--dir", str(tmp_path), "--out", str(out_file), "--timeout", "120"],
                         capture_output=True, text=True, timeout=180, env=child_env(), check=False)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    result = json.loads(out_file.read_text())
    figures = result["figures"]
    assert set(figures) == {"savegame save", "dcp.save", "dcp.async_save", "savegame restore", "dcp.load"}
    for method in ("savegame save", "dcp.save", "dcp.async_save"):
        assert 0 < figures[method]["blocked_s"] <= figures[method]["durable_s"]
    assert figures["savegame restore"]["restore_s"] > 0 and figures["dcp.load"]["restore_s"] > 0
    assert [t[0] for t in result["targets"]] == ["save() blocked vs dcp.save", "time to durable vs dcp.save",
                                                 "restore() vs dcp.load"]
    assert "| target | wanted |" in out.stdout
