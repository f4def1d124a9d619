"""A trainer whose DataLoader workers outlive it: SIGKILLed by test_restart_after_kill.py.

usage: python _lock_fork_child.py RUN_DIR

A savegame.DataLoader with num_workers=2 is iterating (each worker prints "worker PID"
when it fetches its first samples); a save is made durable and "durable" is printed;
then training goes on until the process is killed.
"""

from __future__ import annotations

import os
import sys
import time

import torch

import savegame


class Announcing(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __len__(self) -> int:
        return 100_000

    def __getitem__(self, index: int) -> torch.Tensor:
        if torch.utils.data.get_worker_info() is not None and index < 64:
            os.write(1, f"worker {os.getpid()}\n".encode())
        return torch.tensor([float(index)])


def main(run_dir: str) -> None:
    ckpt = savegame.Checkpointer(run_dir, {"model": torch.nn.Linear(1, 1)})
    batches = iter(savegame.DataLoader(Announcing(), batch_size=4, num_workers=2, shuffle=False))
    for _ in range(4):
        next(batches)
    ckpt.save(1)
    ckpt.wait()
    os.write(1, b"durable\n")
    while True:  # training goes on until the parent kills this process
        next(batches)
        time.sleep(0.01)


if __name__ == "__main__":
    main(sys.argv[1])
