"""A save loop with incremental checkpoints, to be SIGKILLed by test_incremental_kills.py.

argv: RUN_DIR. stdout: "resumed STEP", "saved STEP", and "op NAME PATH" before each
mutating storage operation (pack writes, commits, deletions, pack sweeps).
"""

from __future__ import annotations

import os
import sys

import torch

import savegame
from savegame.storage import LocalStorage


def say(line: str) -> None:
    os.write(1, f"{line}\n".encode())


class Announcing(LocalStorage):
    def create(self, path: str):  # type: ignore[no-untyped-def]
        say(f"op create {path}")
        return super().create(path)

    def rename(self, src: str, dst: str) -> None:
        say(f"op rename {src}")
        super().rename(src, dst)

    def remove(self, path: str) -> None:
        say(f"op remove {path}")
        super().remove(path)

    def remove_tree(self, path: str) -> None:
        say(f"op remove_tree {path}")
        super().remove_tree(path)


def main(run_dir: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    backbone = torch.nn.Linear(256, 512)  # frozen, 512 KiB: stored once
    backbone.requires_grad_(False)
    head = torch.nn.Linear(64, 64)
    ckpt = savegame.Checkpointer(run_dir, {"backbone": backbone, "head": head}, keep_last=2, incremental=True,
                                 storage=Announcing(run_dir))
    info = ckpt.restore()
    start = info.step if info else 0
    say(f"resumed {start}")
    for step in range(start + 1, start + 10_000):
        with torch.no_grad():
            head.weight.fill_(float(step))
        ckpt.save(step)
        say(f"saved {step}")


if __name__ == "__main__":
    main(sys.argv[1])
