"""Saves in a loop until killed (run as a subprocess by test_run_faults.py).

usage: python _save_loop_child.py RUN_DIR LAST_STEP
Each step fills the model with the step number, saves asynchronously and prints
"step N". The first line printed is "resumed N" (0 for a fresh run).
"""

from __future__ import annotations

import sys

import torch

import savegame


def main(run_dir: str, last: int) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.Linear(1024, 256))  # ~2 MB
    ckpt = savegame.Checkpointer(run_dir, {"model": model}, keep_last=3, keep_every=10)
    info = ckpt.restore()
    start = info.step if info else 0
    print(f"resumed {start}", flush=True)
    for step in range(start + 1, last + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(step))
        ckpt.save(step, metrics={"step": step})
        print(f"step {step}", flush=True)
    ckpt.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
