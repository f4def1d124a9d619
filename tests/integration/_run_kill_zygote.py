"""A process that imports torch and savegame once, then forks save loops to be SIGKILLed.

Started by test_run_kills.py. Forking a ready process makes each kill cost
milliseconds instead of a fresh interpreter, so a test can kill many times. The
zygote itself never runs a torch operation or starts a thread, so forking it is safe.

stdin, one line per run:  RUN_DIR
stdout, from the forked child:  "child PID", "resumed STEP", then per step "saved STEP"
(save() returned), "durable STEP" (that step is durable: the next save() or wait()
returned), and "op NAME PATH" before each mutating storage operation; from the
zygote after the child ended:  "exit STATUS".
"""

from __future__ import annotations

import os
import sys
import traceback

import torch

import savegame
from savegame.storage import LocalStorage


def say(line: str) -> None:
    """One write(2) per line: lines from the training and the writer thread never interleave."""
    os.write(1, f"{line}\n".encode())


class Announcing(LocalStorage):
    """Local storage that says which operation it is about to do, so the parent can kill right then."""

    def _say(self, op: str, path: str) -> None:
        say(f"op {op} {path}")

    def create(self, path: str):  # type: ignore[no-untyped-def]
        self._say("create", path)
        return super().create(path)

    def rename(self, src: str, dst: str) -> None:
        self._say("rename", src)
        super().rename(src, dst)

    def remove_tree(self, path: str) -> None:
        self._say("remove_tree", path)
        super().remove_tree(path)

    def fsync_dir(self, path: str) -> None:
        self._say("fsync_dir", path)
        super().fsync_dir(path)

    def append(self, path: str, data: bytes) -> None:
        self._say("append", path)
        super().append(path, data)


def loss(step: int) -> float:
    """Up and down, so the best checkpoint is usually an old one that only best tracking keeps."""
    return (step * 7919 % 97 + 1) / 97


def child(run_dir: str) -> None:
    torch.set_num_threads(1)
    say(f"child {os.getpid()}")
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.Linear(1024, 256))  # ~2 MB
    ckpt = savegame.Checkpointer(run_dir, {"model": model}, keep_last=3, keep_every=10, best="loss",
                                 storage=Announcing(run_dir))
    info = ckpt.restore()
    start = info.step if info else 0
    say(f"resumed {start}")
    for step in range(start + 1, start + 100_000):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(step))
        ckpt.save(step, metrics={"loss": loss(step)})
        say(f"saved {step}")
        if step > start + 1:
            say(f"durable {step - 1}")  # save() returned: the previous save is durable
        if step % 4 == 0:
            ckpt.wait()
            say(f"durable {step}")


def main() -> None:
    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            try:
                child(line.strip())
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        say(f"exit {code}")


if __name__ == "__main__":
    main()
