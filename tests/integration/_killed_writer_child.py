"""A writer SIGKILLed in the middle of writing its second checkpoint, leaving a hidden temporary directory.

    python _killed_writer_child.py migrate RUN_DIR   # savegame migrate's writer (savegame.engine.offline.write_tree)
    python _killed_writer_child.py save RUN_DIR      # a Checkpointer's save

The kill comes from the process itself, right after the first bytes of the checkpoint's
first file are written: the same state a kill from outside leaves at that instant.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import torch

import savegame
from savegame.engine.offline import write_tree
from savegame.storage.local import LocalStorage


def die(*_: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class DyingStorage(LocalStorage):
    """Local storage whose process is killed by the first write into a checkpoint's temporary directory."""

    armed = False

    def create(self, path: str) -> Any:
        handle = super().create(path)
        if not self.armed or not path.startswith(".tmp-step-"):
            return handle

        class Dying:
            def write(self, data: memoryview) -> None:
                handle.write(data)
                die()

            def close(self) -> None:
                handle.close()

            def abort(self) -> None:
                handle.abort()

        return Dying()


def main(kind: str, run_dir: str) -> None:
    model = torch.nn.Linear(64, 64)
    if kind == "migrate":
        tree = {"state": {"model": model.state_dict()}, "rng": {}, "run": {"best": {}, "early_stopping": None}}
        write_tree(run_dir, tree, step=1)
        write_tree(run_dir, tree, step=2, progress=die)
    else:
        storage = DyingStorage(run_dir)
        with savegame.Checkpointer(run_dir, state={"model": model}, storage=storage, async_save=False) as ckpt:
            ckpt.save(1)
            storage.armed = True
            ckpt.save(2)
    sys.exit("the writer was not killed")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
