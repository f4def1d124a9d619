"""savegame DDP demo: a 2-rank torchrun job is killed with SIGKILL mid-epoch and resumed, every rank bit for bit.

The digits CNN of ``demo_kill_resume.py`` (imported from it) trains under
DistributedDataParallel on 2 CPU ranks (gloo), each rank reading its own half of
every epoch through ``savegame.DataLoader`` + ``savegame.ResumableSampler``, with
dropout and input noise drawn from a per-rank torch generator. The demo

1. runs the job once without interruption (reference),
2. runs it again and SIGKILLs the whole job (the torchrun agent and both ranks)
   right after rank 0's step ``KILL_AT``, which is not a save: the last durable
   checkpoint is at step ``KILL_AT // SAVE_EVERY * SAVE_EVERY``,
3. starts ``torchrun ... --resume``, which restores that checkpoint on both ranks,
4. compares, per rank, every per-step loss, the final parameters, the optimizer and
   LR-scheduler state and the RNG states (Python, NumPy, torch) bit for bit.

Every rank runs the same script (``train`` below): the same Checkpointer, the same
``restore()`` and ``save()`` calls as in one process. Run it with ``make demo-ddp``;
it prints PASS or FAIL per rank and exits non-zero on any mismatch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

WORLD = 2
STEPS = 100
SAVE_EVERY = 20
KILL_AT = 47  # not a multiple of SAVE_EVERY: the killed job loses steps that must be redone identically
TIMEOUT = 30  # seconds: the process group's and savegame's collective timeout, so a lost rank fails fast
ROOT = Path(__file__).resolve().parents[1]


# -- one rank of the job (run by torchrun) -------------------------------------------------------
def train(run_dir: str, out_dir: str, resume: bool) -> None:
    import datetime
    import random

    import numpy as np
    import torch
    import torch.distributed as dist
    from demo_kill_resume import digits_dataset, digits_model  # same folder: sys.path[0]

    import savegame

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=TIMEOUT))
    rank = dist.get_rank()
    print(f"pid {rank} {os.getpid()}", flush=True)  # the driver kills these pids with the agent
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same initial weights on every rank
    model = torch.nn.parallel.DistributedDataParallel(digits_model())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=STEPS)
    dataset = digits_dataset()
    # ResumableSampler takes this rank's share of each epoch's permutation (rank and world size from torch.distributed)
    loader = savegame.DataLoader(dataset, batch_size=32, sampler=savegame.ResumableSampler(dataset, seed=1234))
    random.seed(rank)  # every generator seeded, per rank: dropout and input noise differ between ranks
    np.random.seed(rank)
    torch.manual_seed(1000 + rank)

    ckpt = savegame.Checkpointer(run_dir, state={"model": model, "optimizer": opt, "scheduler": sched,
                                                 "loader": loader}, keep_last=2, collective_timeout=TIMEOUT)
    info = ckpt.restore()  # every rank: the same checkpoint; its own RNG and loader position
    if resume and info is None:
        raise SystemExit(f"--resume: no checkpoint in {run_dir}")
    step = 0 if info is None else info.step
    print(f"[rank {rank}] {'resuming at step ' + str(step) if info else 'starting fresh'}", flush=True)
    with open(Path(out_dir) / f"losses-rank{rank}.jsonl", "a") as log:
        while step < STEPS:
            for x, y in loader:
                x = x + 0.05 * torch.randn_like(x)  # input noise from this rank's global generator
                loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()  # DDP averages the gradients of both ranks here
                opt.step()
                sched.step()
                step += 1
                log.write(json.dumps({"step": step, "loss": loss.item().hex()}) + "\n")
                log.flush()
                if step % SAVE_EVERY == 0 or step == STEPS:
                    ckpt.save(step, epoch=loader.epoch, metrics={"loss": loss.item()})
                    ckpt.wait()  # durable (committed by rank 0 after every rank wrote its part) before we go on
                if rank == 0:
                    print(f"step {step}", flush=True)
                if step == STEPS:
                    break
    ckpt.close()
    final = {"resumed_from": None if info is None else info.step,
             "parameters": digest(model.module.state_dict()),
             "optimizer": digest({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}),
             "rng": digest({"python": random.getstate(), "numpy": np.random.get_state(),
                            "torch": torch.get_rng_state()})}
    (Path(out_dir) / f"final-rank{rank}.json").write_text(json.dumps(final))
    dist.destroy_process_group()


def digest(value: Any) -> str:
    """sha256 of every bit of a nested value: tensors and arrays by dtype, shape and bytes; the rest by repr."""
    import numpy as np
    import torch

    h = hashlib.sha256()

    def feed(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            h.update(f"tensor {v.dtype} {list(v.shape)}".encode())
            h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(v, np.ndarray):
            h.update(f"array {v.dtype} {list(v.shape)}".encode())
            h.update(np.ascontiguousarray(v).tobytes())
        elif isinstance(v, Mapping):
            h.update(b"{")
            for k in sorted(v, key=repr):
                feed(k)
                feed(v[k])
            h.update(b"}")
        elif isinstance(v, (list, tuple)):
            h.update(b"[")
            for x in v:
                feed(x)
            h.update(b"]")
        else:  # floats' repr is exact (shortest round-trip)
            h.update(repr(v).encode())

    feed(value)
    return h.hexdigest()


# -- the driver ------------------------------------------------------------------------------------
def run_job(run_dir: str, out_dir: str, *, resume: bool = False, kill_at: int | None = None) -> int:
    """Run the job under torchrun, rank 0's steps as a progress bar; SIGKILL all of it after step ``kill_at``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           __file__, "--train", run_dir, out_dir, *(["--resume"] if resume else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    ranks: list[int] = []
    try:
        with Progress(TextColumn("   {task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn()) as bar:
            task = bar.add_task(f"training on {WORLD} ranks", total=STEPS)
            for line in proc.stdout:
                line = line.strip()
                if line.startswith("pid "):
                    ranks.append(int(line.split()[2]))
                elif line.startswith("step "):
                    bar.update(task, completed=int(line.split()[1]))
                    if line == f"step {kill_at}":
                        kill_job(proc, ranks)
                        bar.update(task, description=f"job killed with SIGKILL after rank 0's step {kill_at}")
                        return proc.returncode
                elif line:  # a rank's news: fresh start or resumed step
                    bar.console.print("   " + line, markup=False, highlight=False)
            proc.wait(timeout=TIMEOUT * 2)
    finally:
        if proc.poll() is None:  # the driver failed or was interrupted: leave nothing running
            kill_job(proc, ranks)
    if proc.returncode != 0:
        raise SystemExit(f"DEMO FAILED: the torchrun job exited with {proc.returncode}")
    return proc.returncode


def kill_job(agent: subprocess.Popen[str], ranks: list[int]) -> None:
    """SIGKILL the torchrun agent and every rank (torchrun starts each rank in its own session, so the
    agent's process group does not reach them), and wait until all are gone."""
    for pid in (agent.pid, *ranks):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    agent.wait()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in ranks):
        if time.monotonic() > deadline:
            raise SystemExit(f"DEMO FAILED: ranks {ranks} still alive 10 s after SIGKILL")
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, only not yet reaped
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def per_step_losses(path: Path) -> dict[int, str]:
    out: dict[int, str] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        out.setdefault(rec["step"], rec["loss"])
        if out[rec["step"]] != rec["loss"]:  # a redone step must repeat the killed job's loss exactly
            out[rec["step"]] = "MISMATCH"
    return out


def compare_rank(rank: int, ref: Path, res: Path, resumed_from: int) -> bool:
    a, b = per_step_losses(ref / f"losses-rank{rank}.jsonl"), per_step_losses(res / f"losses-rank{rank}.jsonl")
    fa, fb = (json.loads((d / f"final-rank{rank}.json").read_text()) for d in (ref, res))
    checks = {
        "losses": sorted(a) == sorted(b) == list(range(1, STEPS + 1)) and a == b,
        "parameters": fa["parameters"] == fb["parameters"],
        "optimizer": fa["optimizer"] == fb["optimizer"],
        "rng": fa["rng"] == fb["rng"],
        "resumed": fb["resumed_from"] == resumed_from and fa["resumed_from"] is None,
    }
    ok = all(checks.values())
    print(f"rank {rank}: {'PASS' if ok else 'FAIL'}  per-step losses ({len(a)} steps) {_ok(checks['losses'])}, "
          f"parameters {_ok(checks['parameters'])}, optimizer+scheduler {_ok(checks['optimizer'])}, "
          f"RNG {_ok(checks['rng'])}, resumed from step {fb['resumed_from']} {_ok(checks['resumed'])}")
    print(f"        parameters sha256 {fa['parameters'][:16]} (uninterrupted) {fb['parameters'][:16]} (resumed)")
    return ok


def _ok(flag: bool) -> str:
    return "equal" if flag else "DIFFERENT"


def saved_checkpoints_equal(ref: str, res: str) -> bool:
    """The two final checkpoints, read outside the job (no process group) as full tensors, are equal."""
    import savegame

    a, b = savegame.load(ref), savegame.load(res)
    return a["step"] == b["step"] == STEPS and digest(a["state"]) == digest(b["state"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--train", nargs=2, metavar=("RUN_DIR", "OUT_DIR"), help="run one rank (under torchrun)")
    parser.add_argument("--resume", action="store_true", help="with --train: fail unless a checkpoint is restored")
    parser.add_argument("--out", default=None, help="where to keep the run directories (default: a temp dir)")
    args = parser.parse_args()
    if args.train:
        run_dir, out_dir = args.train
        train(run_dir, out_dir, resume=args.resume)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # run_job's cleanup kills the job
    base = Path(args.out or tempfile.mkdtemp(prefix="savegame-demo-ddp-"))
    ref, res = base / "uninterrupted", base / "interrupted"
    for d in (ref, res):
        d.mkdir(parents=True, exist_ok=True)
    last_save = KILL_AT // SAVE_EVERY * SAVE_EVERY
    t0 = time.time()
    print(f"1) uninterrupted job: {WORLD} ranks (torchrun, gloo, DDP), {STEPS} steps")
    run_job(str(ref / "run"), str(ref))
    print(f"   done ({time.time() - t0:.1f} s)")
    print(f"2) the same job, SIGKILLed (agent and every rank) after rank 0's step {KILL_AT} "
          f"(last durable save at step {last_save})")
    code = run_job(str(res / "run"), str(res), kill_at=KILL_AT)
    print(f"   torchrun exited with {code} (-9 = SIGKILL) ({time.time() - t0:.1f} s)")
    print("3) torchrun ... --resume: every rank restores the last checkpoint and trains on")
    run_job(str(res / "run"), str(res), resume=True)
    print(f"   done ({time.time() - t0:.1f} s)")
    print("\n=== savegame DDP demo report ===")
    print(f"{WORLD} ranks, {STEPS} steps, killed after step {KILL_AT} with SIGKILL (torchrun exit {code}), "
          f"resumed from step {last_save}, redone steps: {KILL_AT - last_save}")
    passed = [compare_rank(rank, ref, res, last_save) for rank in range(WORLD)]
    same_ckpt = saved_checkpoints_equal(str(ref / "run"), str(res / "run"))
    print(f"final checkpoints read outside the job (savegame.load): {_ok(same_ckpt)}")
    print(f"run directories kept in {base} ({time.time() - t0:.1f} s)")
    if not (all(passed) and same_ckpt and code == -signal.SIGKILL):
        raise SystemExit("DEMO FAILED: the resumed job differs from the uninterrupted one")
    print(f"RESULT: every rank of the resumed job is bit-identical to the uninterrupted job ({WORLD}/{WORLD} PASS)")


if __name__ == "__main__":
    main()
