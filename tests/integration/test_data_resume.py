"""Bit-exact training across SIGKILL with savegame.DataLoader: a resumed run equals one never stopped.

The child (this file run as a script) trains a small model with dropout on a
shuffled map-style dataset whose samples get random augmentation where they are
read (in workers, or in the main process), adds input noise in the main process,
saves every step through savegame.Checkpointer and prints "saved N" once the save
is durable. The test kills it with SIGKILL right after chosen saves, resumes, and
compares every step's loss and the final weights with an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TOTAL = 16           # 40 samples / batch 8 = 5 steps an epoch: epochs 0..3
try:
    import savegame
    HAVE_CHECKPOINTER = hasattr(savegame, "Checkpointer")
except ImportError:  # pragma: no cover - the core is written in parallel
    HAVE_CHECKPOINTER = False

pytestmark = pytest.mark.skipif(not HAVE_CHECKPOINTER, reason="savegame.Checkpointer cannot be imported yet")


def child(run_dir: str, log_path: str, workers: int, persistent: bool) -> None:
    import savegame
    from savegame.data import DataLoader

    class Noisy(torch.utils.data.Dataset):
        def __init__(self) -> None:
            gen = torch.Generator().manual_seed(1)
            self.x, self.y = torch.randn(40, 6, generator=gen), torch.randint(0, 2, (40,), generator=gen)

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return self.x[i] + 0.1 * torch.randn(6), self.y[i]      # augmentation where the sample is read

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loader = DataLoader(Noisy(), batch_size=8, shuffle=True, num_workers=workers, persistent_workers=persistent)
    ckpt = savegame.Checkpointer(run_dir, state={"model": model, "optimizer": opt, "loader": loader}, keep_last=2)
    info = ckpt.restore()
    step = info.step if info else 0
    with open(log_path, "a") as log:
        while step < TOTAL:
            for x, y in loader:
                x = x + 0.01 * torch.randn_like(x)                 # noise drawn in the main process
                loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                log.write(json.dumps([step, loss.item().hex(), loader.epoch]) + "\n")
                log.flush()
                ckpt.save(step, epoch=loader.epoch)
                ckpt.wait()
                print(f"saved {step}", flush=True)
                if step == TOTAL:
                    break
    ckpt.close()


def losses(path: Path) -> dict[int, list]:
    out: dict[int, list] = {}
    for line in path.read_text().splitlines():
        step, *rest = json.loads(line)
        assert out.setdefault(step, rest) == rest, f"step {step} was redone differently: {out[step]} vs {rest}"
    return out


def train(run_dir: Path, log: Path, workers: int, persistent: bool = False, kill_at: int | None = None) -> int:
    """Run the child; SIGKILL its whole process group (trainer and data workers) after ``saved kill_at``.

    The group is killed, as a scheduler preempting a job does: data workers
    orphaned by a kill of the trainer alone would live on for a few seconds.
    """
    from tests.integration.procs import child_env

    args = [sys.executable, __file__, str(run_dir), str(log), str(workers), str(int(persistent))]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=child_env(), start_new_session=True)
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            if kill_at is not None and line.strip() == f"saved {kill_at}":
                os.killpg(proc.pid, signal.SIGKILL)
                break
        return proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[int, list], dict[str, torch.Tensor]]:
    base = tmp_path_factory.mktemp("reference")
    assert train(base / "run", base / "losses", workers=0) == 0
    return losses(base / "losses"), savegame.load(base / "run")["state"]["model"]


# name: (num_workers, persistent_workers, kill after these saves, num_workers of the final resumed run)
SCENARIOS = {
    "no-workers-mid-epoch": (0, False, [3], 0),
    "persistent-workers-at-epoch-end": (2, True, [5], 2),
    "persistent-workers-two-kills-mid-epoch": (2, True, [3, 8], 2),
    "workers-two-kills-then-no-workers": (2, False, [2, 11], 0),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_killed_and_resumed_training_is_bit_identical(tmp_path: Path, reference: tuple, scenario: str) -> None:
    workers, persistent, kills, resume_workers = SCENARIOS[scenario]
    ref_losses, ref_model = reference
    run_dir, log = tmp_path / "run", tmp_path / "losses"
    for kill_at in kills:
        assert train(run_dir, log, workers, persistent, kill_at=kill_at) == -signal.SIGKILL
        assert max(losses(log)) >= kill_at
    assert train(run_dir, log, resume_workers, persistent and resume_workers > 0) == 0
    assert losses(log) == ref_losses
    model = savegame.load(run_dir)["state"]["model"]
    assert list(model) == list(ref_model) and all(torch.equal(model[k], ref_model[k]) for k in model)


if __name__ == "__main__":
    sys.path[:0] = [str(ROOT / "src"), str(ROOT)]
    child(sys.argv[1], sys.argv[2], int(sys.argv[3]), bool(int(sys.argv[4])))
