"""A rank of the distributed tests' jobs: ``python _worker.py <scenario> <run_dir> [options]``."""

from __future__ import annotations

import datetime
import json
import os
import sys

import torch
import torch.distributed as dist

import savegame


def init() -> tuple[int, int]:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=float(os.environ.get("PG_TIMEOUT", "20"))))
    return dist.get_rank(), dist.get_world_size()


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def digest(m: torch.nn.Module, opt: torch.optim.Optimizer) -> list[float]:
    vals = [float(p.double().sum()) for p in m.parameters()]
    vals += [float(v.double().sum()) for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    return vals


def ddp(run_dir: str, stop_at: int, total: int) -> None:
    rank, world = init()
    net = torch.nn.parallel.DistributedDataParallel(model())
    opt = torch.optim.AdamW(net.parameters(), lr=0.01)
    data = torch.utils.data.TensorDataset(torch.randn(64, 8, generator=torch.Generator().manual_seed(1)),
                                          torch.randn(64, 4, generator=torch.Generator().manual_seed(2)))
    loader = savegame.DataLoader(data, batch_size=4, sampler=savegame.ResumableSampler(len(data), seed=3))
    torch.manual_seed(100 + rank)  # per-rank RNG streams that differ
    ckpt = savegame.Checkpointer(run_dir, {"model": net, "optimizer": opt, "loader": loader},
                                 keep_last=3, collective_timeout=20)
    info = ckpt.restore()
    step = info.step if info else 0
    losses = []
    it = iter(loader)
    while step < total:
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        noise = torch.randn(()) * 1e-3  # consumes the per-rank torch RNG
        loss = torch.nn.functional.mse_loss(net(x), y) + noise
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        losses.append(float(loss))
        if step % 3 == 0:
            ckpt.save(step, metrics={"loss": float(loss)})
        if step == stop_at:
            ckpt.wait()
            print(json.dumps({"rank": rank, "stopped": step}), flush=True)
            os._exit(0)  # as if killed: no close(), no atexit
    ckpt.close()
    print(json.dumps({"rank": rank, "resumed_from": info.step if info else None, "losses": losses,
                      "digest": digest(net.module, opt), "rng": float(torch.rand(()))}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    scenario, *rest = sys.argv[1:]
    if scenario == "ddp":
        ddp(rest[0], int(rest[1]), int(rest[2]))
    else:
        raise SystemExit(f"unknown scenario {scenario}")
