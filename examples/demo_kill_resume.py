"""savegame demo: a training process is killed with SIGKILL part-way and resumed, bit for bit.

A small CNN learns scikit-learn's bundled digits with dropout, input noise,
AdamW, a OneCycle schedule and a shuffling, resumable data loader. The demo

1. trains once without interruption (reference),
2. trains again in a child process, kills it with SIGKILL mid-epoch at a moment
   that is not a save, and starts a new process that resumes from the run
   directory,
3. compares every per-step loss and every final weight bit for bit.

Run it with ``make demo``: a progress bar per training process, then a short report.
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
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

STEPS = 150
SAVE_EVERY = 20
KILL_AT = 67  # not a multiple of SAVE_EVERY: the killed process loses work that must be redone identically


def digits_dataset() -> torch.utils.data.TensorDataset:
    """scikit-learn's bundled 8x8 digits (1,797 images, no download) as a TensorDataset."""
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    return torch.utils.data.TensorDataset(images, labels)


def digits_model() -> torch.nn.Module:
    """A small CNN with dropout, initialised from the global torch generator."""
    import torch

    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Dropout(0.2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Dropout(0.3), torch.nn.Linear(32 * 4 * 4, 10),
    )


def build(run_dir: str):
    import torch

    import savegame

    torch.manual_seed(0)
    torch.set_num_threads(1)
    dataset = digits_dataset()
    model = digits_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=STEPS)
    loader = savegame.DataLoader(dataset, batch_size=32, shuffle=True, seed=1234)
    ckpt = savegame.Checkpointer(run_dir, state={"model": model, "optimizer": opt, "scheduler": sched,
                                                 "loader": loader}, keep_last=2)
    return model, opt, sched, loader, ckpt


def train(run_dir: str, losses_path: str) -> None:
    import torch

    model, opt, sched, loader, ckpt = build(run_dir)
    info = ckpt.restore()
    step = 0 if info is None else info.step
    print(f"[child {os.getpid()}] {'resuming at step ' + str(step) if info else 'starting fresh'}", flush=True)
    with open(losses_path, "a") as log:
        while step < STEPS:
            for x, y in loader:
                x = x + 0.05 * torch.randn_like(x)  # input noise from the global generator
                loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                log.write(json.dumps({"step": step, "loss": loss.item().hex()}) + "\n")
                log.flush()
                if step % SAVE_EVERY == 0 or step == STEPS:
                    ckpt.save(step, metrics={"loss": loss.item()})
                    ckpt.wait()
                print(f"step {step}", flush=True)
                if step == STEPS:
                    break
    ckpt.close()


def run_child(run_dir: str, losses: str, kill_at: int | None) -> int | None:
    """Run one training process, its steps shown as a progress bar; SIGKILL it after step ``kill_at``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    cmd = [sys.executable, __file__, "--child", run_dir, losses]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    with Progress(TextColumn("   {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        task = bar.add_task("training", total=STEPS)
        for line in proc.stdout:
            line = line.strip()
            if not line.startswith("step "):  # the child's own news: fresh start or resumed step
                bar.console.print("   " + line, markup=False, highlight=False)
                continue
            bar.update(task, completed=int(line.split()[1]))
            if kill_at is not None and line == f"step {kill_at}":
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                bar.update(task, description=f"killed with SIGKILL after step {kill_at}")
                return proc.returncode
        proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"training process failed with exit code {proc.returncode}")
    return proc.returncode


def per_step_losses(path: str) -> dict[int, str]:
    out: dict[int, str] = {}
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        out.setdefault(rec["step"], rec["loss"])
        if out[rec["step"]] != rec["loss"]:  # a redone step must repeat the killed process's loss exactly
            out[rec["step"]] = "MISMATCH"
    return out


def weights_digest(run_dir: str) -> tuple[str, dict]:
    import savegame

    tree = savegame.load(run_dir)
    state = tree["state"]["model"]
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return digest.hexdigest(), state


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=2, metavar=("RUN_DIR", "LOSSES"))
    parser.add_argument("--out", default=None, help="where to keep the run directories (default: a temp dir)")
    args = parser.parse_args()
    if args.child:
        train(*args.child)
        return
    base = Path(args.out or tempfile.mkdtemp(prefix="savegame-demo-"))
    base.mkdir(parents=True, exist_ok=True)
    ref, res = str(base / "uninterrupted"), str(base / "interrupted")
    t0 = time.time()
    print(f"1) uninterrupted run of {STEPS} steps")
    run_child(ref, ref + ".losses", None)
    print(f"2) the same run, killed with SIGKILL after step {KILL_AT} (last save at step {KILL_AT // SAVE_EVERY * SAVE_EVERY})")
    code = run_child(res, res + ".losses", KILL_AT)
    print(f"   child exited with {code} (-9 = SIGKILL)")
    print("3) a new process resumes from the run directory")
    run_child(res, res + ".losses", None)
    a, b = per_step_losses(ref + ".losses"), per_step_losses(res + ".losses")
    same_losses = sorted(a) == sorted(b) == list(range(1, STEPS + 1)) and a == b
    da, wa = weights_digest(ref)
    db, wb = weights_digest(res)
    import torch

    same_weights = all(torch.equal(wa[k], wb[k]) for k in wa) and list(wa) == list(wb)
    print("\n=== savegame demo report ===")
    print(f"steps: {STEPS}, killed after step {KILL_AT} with SIGKILL (exit {code}), resumed from step "
          f"{KILL_AT // SAVE_EVERY * SAVE_EVERY}, redone steps: {KILL_AT - KILL_AT // SAVE_EVERY * SAVE_EVERY}")
    print(f"per-step losses equal bit for bit: {same_losses} ({len(a)} steps compared)")
    print(f"final weights equal bit for bit:  {same_weights}")
    print(f"  uninterrupted sha256 {da}\n  interrupted   sha256 {db}")
    print(f"run directories kept in {base} ({time.time() - t0:.1f} s)")
    if not (same_losses and same_weights and code == -signal.SIGKILL):
        raise SystemExit("DEMO FAILED: the resumed run differs from the uninterrupted one")
    print("RESULT: the resumed run is bit-identical to the uninterrupted run")


if __name__ == "__main__":
    main()
