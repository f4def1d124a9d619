"""A small training run used by the kill/resume tests (run as a subprocess).

usage: python _train_child.py RUN_DIR LOSSES_FILE TOTAL_STEPS SAVE_EVERY

Shuffles with torch.randperm from the global generator each epoch, uses dropout
and input noise, saves every SAVE_EVERY steps (epoch and in-epoch position go in
a small Stateful object), prints "step N" after each step and "saved N" after a
save is durable.
"""

from __future__ import annotations

import json
import sys

import torch

import savegame


class Progress:
    """User state: where in the epoch we are and the epoch's permutation."""

    def __init__(self) -> None:
        self.epoch, self.position, self.order = 0, 0, torch.empty(0, dtype=torch.int64)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "order": self.order}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self.order = state["epoch"], state["position"], state["order"].clone()


def main(run_dir: str, losses_path: str, total: int, save_every: int) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    data = torch.randn(96, 6)
    target = (data.sum(1) > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    progress = Progress()
    ckpt = savegame.Checkpointer(run_dir, {"model": model, "optimizer": opt, "scheduler": sched, "progress": progress},
                                 keep_last=2)
    info = ckpt.restore()
    step = info.step if info else 0
    with open(losses_path, "a") as out:
        while step < total:
            if progress.position == 0:
                progress.order = torch.randperm(len(data))
            idx = progress.order[progress.position:progress.position + 8]
            x = data[idx] + 0.01 * torch.randn(len(idx), 6)
            loss = torch.nn.functional.cross_entropy(model(x), target[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            progress.position += 8
            if progress.position >= len(data):
                progress.epoch, progress.position = progress.epoch + 1, 0
            out.write(json.dumps([step, loss.item().hex()]) + "\n")
            out.flush()
            if step % save_every == 0:
                ckpt.save(step, epoch=progress.epoch)
                ckpt.wait()
                print(f"saved {step}", flush=True)
            print(f"step {step}", flush=True)
    ckpt.save(total, epoch=progress.epoch)
    ckpt.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
