"""Coverage-guided fuzzing (atheris) of the readers of untrusted bytes, for a bounded number of runs.

The harness is fuzz_atheris.py: manifests, tensor-file headers, plain pickles, torch.save
zips and legacy torch files, from a seed corpus of valid inputs. It must finish its runs
with only savegame errors raised: libFuzzer fails the process on any other exception, a
crash, a hang (-timeout) or memory past -rss_limit_mb. Skipped, with the reason printed,
where atheris is not installed (``pip install atheris==3.0.0``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris", reason="atheris is not installed (pip install atheris==3.0.0): coverage-guided "
                                       "fuzzing of the readers is skipped; the hypothesis fuzz tests still run")

HARNESS = Path(__file__).with_name("fuzz_atheris.py")
REPO = Path(__file__).resolve().parents[2]
RUNS = 2500  # about 8 s; longer offline runs are in docs/design.md


def test_readers_survive_coverage_guided_fuzzing(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    env = {**os.environ, "SAVEGAME_FUZZ_SEED_CORPUS": str(corpus)}
    done = subprocess.run(
        [sys.executable, str(HARNESS), f"-runs={RUNS}", "-max_len=8192", "-timeout=20", "-rss_limit_mb=3072",
         "-malloc_limit_mb=1024", "-seed=12345", f"-artifact_prefix={tmp_path}/", str(corpus)],
        capture_output=True, text=True, cwd=REPO, timeout=600, check=False, env=env)
    report = done.stderr[-3000:]
    assert done.returncode == 0, report
    assert f"Done {RUNS} runs" in done.stderr and "INITED" in done.stderr, report
    assert {p.name for p in corpus.iterdir()} >= {f"seed-{t}" for t in ("manifest", "header", "pickle", "torch",
                                                                       "legacy")}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-"))], report
