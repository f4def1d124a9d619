"""Hits the file size limit (RLIMIT_FSIZE -> EFBIG) in the middle of a save, then goes on training.

usage: python _fsize_child.py RUN_DIR
Prints "error <ExceptionClass>: <message>" for the failed save and "ok <step>" for saves that succeeded.
"""

from __future__ import annotations

import resource
import sys

import torch

import savegame
from savegame.errors import SavegameError


def main(run_dir: str) -> None:
    small = torch.nn.Linear(10, 10)
    big = torch.nn.Linear(1024, 1024)  # 4 MB
    ckpt = savegame.Checkpointer(run_dir, {"small": small, "big": big})
    ckpt.save(1)
    ckpt.wait()
    print("ok 1", flush=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))  # 1 MiB per file from now on (soft limit)
    with torch.no_grad():
        big.weight.fill_(2.0)
    try:
        ckpt.save(2)
        ckpt.wait()
        print("ok 2", flush=True)
    except SavegameError as exc:
        print(f"error {type(exc).__name__}: {exc}", flush=True)
    ckpt.close()
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    ckpt = savegame.Checkpointer(run_dir, {"small": small, "big": big})  # training goes on
    ckpt.restore()
    ckpt.save(3)
    ckpt.close()
    print("ok 3", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
