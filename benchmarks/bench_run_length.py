"""Run-length benchmark: what one save and ``savegame ls`` cost as a run directory fills up.

Long runs without retention, or with ``keep_every``, hold thousands of checkpoints.
For each size this builds a run directory of that many checkpoints of a small model
(one real save, then copies of it whose manifests say other steps and metrics:
building 10,000 by saving would take longer than the measurement), opens a
Checkpointer on it (best="loss"; no retention, then keep_last=3 with keep_every keeping
every checkpoint there, as a long run that keeps every N-th step has) and reports:

- *open*: constructing the Checkpointer and the first save+wait (every manifest is read once);
- *save+wait*: the median of the next saves, each followed by ``wait()``: the bookkeeping
  a save does besides writing its own bytes;
- *ls*: ``savegame ls RUN_DIR`` in-process (reads every manifest and tensor header).

    python benchmarks/bench_run_length.py             # 100, 2,000 and 10,000 checkpoints
    python benchmarks/bench_run_length.py --small     # tiny sizes, seconds (run in CI)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from click.testing import CliRunner

import savegame
from savegame.cli import main as cli_main
from savegame.format import manifest
from savegame.format import names as n

EVERY = 10  # checkpoints are saved every EVERY steps; the keep_every variant keeps each of them


def small_state() -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    return {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}


def build_run(run_dir: Path, count: int) -> None:
    """``count`` checkpoints, steps EVERY, 2*EVERY, ...: one real save, then copies with rewritten manifests."""
    with savegame.Checkpointer(run_dir, small_state(), async_save=False) as ckpt:
        ckpt.save(EVERY, metrics={"loss": 1.0})
    first = run_dir / f"step-{EVERY:010d}"
    raw = (first / n.MANIFEST).read_bytes()
    body = json.loads(raw[:raw.rfind(b',"' + n.M_CHECKSUM.encode() + b'":')] + b"}")
    files = [p.name for p in first.iterdir() if p.name != n.MANIFEST]
    start = time.time() - count
    for step in range(2 * EVERY, (count + 1) * EVERY, EVERY):
        target = run_dir / f"step-{step:010d}"
        target.mkdir()
        for name in files:
            os.link(first / name, target / name)  # identical tensor bytes; only the manifest differs
        meta = {n.M_STEP: step, n.M_TIME: start + step, n.M_METRICS: {"loss": 1.0 + (step * 7919 % 997) / 997}}
        (target / n.MANIFEST).write_bytes(manifest.dumps({**body, **meta}))


def time_saves(run_dir: Path, count: int, saves: int, **options: Any) -> dict[str, float]:
    state = small_state()
    t0 = time.perf_counter()
    ckpt = savegame.Checkpointer(run_dir, state, best="loss", **options)
    r0 = time.perf_counter()
    ckpt.restore()  # the run goes on (a save into another run's directory without restoring is refused)
    restoring = time.perf_counter() - r0  # not counted: the rows measure opening the run and its first save
    ckpt.save((count + 1) * EVERY, metrics={"loss": 5.0})
    ckpt.wait()
    opened = time.perf_counter() - t0 - restoring
    times = []
    for k in range(2, saves + 2):
        t0 = time.perf_counter()
        ckpt.save((count + k) * EVERY, metrics={"loss": 5.0 + k})
        ckpt.wait()
        times.append(time.perf_counter() - t0)
    ckpt.close()
    return {"open_s": opened, "save_wait_ms": statistics.median(times) * 1e3}


def time_ls(run_dir: Path) -> float:
    runner = CliRunner()
    t0 = time.perf_counter()
    result = runner.invoke(cli_main, ["ls", str(run_dir)])
    elapsed = time.perf_counter() - t0
    if result.exit_code != 0:
        raise RuntimeError(f"savegame ls failed ({result.exit_code}): {result.output[-500:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny sizes for CI")
    parser.add_argument("--sizes", type=int, nargs="*", default=None, help="numbers of checkpoints")
    parser.add_argument("--saves", type=int, default=None, help="timed saves per size")
    parser.add_argument("--dir", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    sizes = args.sizes or ([10, 50] if args.small else [100, 2000, 10000])
    saves = args.saves or (3 if args.small else 20)
    torch.set_num_threads(1)
    print(f"# torch {torch.__version__}, savegame {savegame.__version__}, {time.strftime('%Y-%m-%d')}", flush=True)
    print("| checkpoints | retention | open + first save s | save+wait ms | ls s |")
    print("| ---: | --- | ---: | ---: | ---: |", flush=True)
    rows = []
    workdir = Path(tempfile.mkdtemp(prefix="savegame-runlength-", dir=args.dir))
    try:
        for count in sizes:
            for label, options in (("none", {}), (f"keep_last=3, keep_every={EVERY}",
                                                  {"keep_last": 3, "keep_every": EVERY})):
                run_dir = workdir / f"run-{count}"
                shutil.rmtree(run_dir, ignore_errors=True)
                build_run(run_dir, count)
                row: dict[str, Any] = {"checkpoints": count, "retention": label, **time_saves(run_dir, count, saves,
                                                                                             **options)}
                row["ls_s"] = time_ls(run_dir) if label == "none" else None
                rows.append(row)
                ls_text = f"{row['ls_s']:.3f}" if row["ls_s"] is not None else "-"
                print(f"| {count:,} | {label} | {row['open_s']:.3f} | {row['save_wait_ms']:.1f} | {ls_text} |",
                      flush=True)
                shutil.rmtree(run_dir, ignore_errors=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
