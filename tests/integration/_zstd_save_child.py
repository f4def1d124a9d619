"""Saves compressed checkpoints in a loop until killed (run as a subprocess by test_compression.py).

usage: python _zstd_save_child.py RUN_DIR LAST_STEP
Each step sets the model's weights to a compressible pattern plus the step number, saves
asynchronously with compression="zstd" and prints "step N". The first line is "resumed N".
"""

from __future__ import annotations

import sys

import torch

import savegame


def fill(model: torch.nn.Module, step: int) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((torch.arange(p.numel()) % 13).reshape(p.shape) / 16 + step)


def main(run_dir: str, last: int) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.Linear(1024, 256))  # ~2 MB
    ckpt = savegame.Checkpointer(run_dir, {"model": model}, compression="zstd", keep_last=3)
    info = ckpt.restore()
    start = info.step if info else 0
    print(f"resumed {start}", flush=True)
    for step in range(start + 1, last + 1):
        fill(model, step)
        ckpt.save(step)
        print(f"step {step}", flush=True)
    ckpt.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
