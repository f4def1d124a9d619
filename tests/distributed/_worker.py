"""A rank of the distributed tests' jobs: ``python _worker.py <scenario> <run_dir> [options]``."""

from __future__ import annotations

import datetime
import json
import os
import sys

import torch
import torch.distributed as dist

import savegame


def init(backend: str = "gloo") -> tuple[int, int]:
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=float(os.environ.get("PG_TIMEOUT", "20"))))
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


def fsdp_model(world: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    net = model()
    mesh = init_device_mesh("cpu", (world,))
    for layer in net:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net, torch.optim.AdamW(net.parameters(), lr=0.01)


def full_state(net: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, list[float]]:
    """Every parameter and optimizer-state tensor, gathered whole, as flat lists (rank-independent)."""
    def whole(t: torch.Tensor) -> list[float]:
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        return [float(v) for v in t.detach().double().flatten()]
    out = {f"p.{k}": whole(v) for k, v in net.state_dict().items()}
    for pid, st in opt.state_dict()["state"].items():
        for field, v in st.items():
            out[f"o.{pid}.{field}"] = whole(v)
    return out


def fsdp_step(net: torch.nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 8, generator=g), torch.randn(8, 4, generator=g)
    loss = torch.nn.functional.mse_loss(net(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def fsdp(run_dir: str, mode: str, steps: int) -> None:
    """mode "train": train ``steps`` steps from the latest checkpoint (or scratch), save, print the state.
    mode "read": restore the latest and print the state."""
    rank, world = init()
    net, opt = fsdp_model(world)
    ckpt = savegame.Checkpointer(run_dir, {"model": net, "optimizer": opt}, collective_timeout=20)
    info = ckpt.restore()
    start = info.step if info else 0
    restored = full_state(net, opt)
    if mode == "train":
        for step in range(start, start + steps):
            fsdp_step(net, opt, step)
        ckpt.save(start + steps)
    ckpt.close()
    state = full_state(net, opt)
    print(json.dumps({"rank": rank, "step": start + (steps if mode == "train" else 0), "restored": restored,
                      "state": state}), flush=True)
    dist.destroy_process_group()


def plain(run_dir: str) -> None:
    """No process group: restore a distributed checkpoint into a plain model and optimizer."""
    net = model()
    opt = torch.optim.AdamW(net.parameters(), lr=0.01)
    with savegame.Checkpointer(run_dir, {"model": net, "optimizer": opt}) as ckpt:
        info = ckpt.restore()
    print(json.dumps({"step": info.step if info else None, "state": full_state(net, opt)}), flush=True)


def die_mid_save(run_dir: str) -> None:
    """Rank 1 dies while writing its share of the save of step 6; rank 0 reports what it saw."""
    rank, _ = init()
    net = torch.nn.parallel.DistributedDataParallel(model())
    opt = torch.optim.AdamW(net.parameters(), lr=0.01)
    ckpt = savegame.Checkpointer(run_dir, {"model": net, "optimizer": opt}, collective_timeout=10)
    ckpt.restore()
    if rank == 1:
        from savegame.distributed import dcp_storage
        original = dcp_storage.SavegameWriter._write

        def dying(self, plan, planner):  # type: ignore[no-untyped-def]
            if "step-0000000006" in self.tmp:
                os._exit(9)  # SIGKILL-like: no cleanup, no reply
            return original(self, plan, planner)
        dcp_storage.SavegameWriter._write = dying  # type: ignore[method-assign]
    for step in (3, 6):
        fsdp_step(net, opt, step)
        ckpt.save(step)
    error = None
    try:
        ckpt.wait()
    except savegame.SavegameError as exc:
        error = f"{type(exc).__name__}: {exc}"
    print(json.dumps({"rank": rank, "error": error}), flush=True)
    os._exit(0)


def signal_stop(run_dir: str) -> None:
    """Rank 1 alone gets SIGUSR1 at step 5; every rank must save that step and stop."""
    import signal
    rank, _ = init()
    net = torch.nn.parallel.DistributedDataParallel(model())
    opt = torch.optim.AdamW(net.parameters(), lr=0.01)
    ckpt = savegame.Checkpointer(run_dir, {"model": net, "optimizer": opt}, save_on_signals=[signal.SIGUSR1],
                                 every_steps=100, collective_timeout=20)
    ckpt.restore()
    stopped = None
    for step in range(1, 20):
        fsdp_step(net, opt, step)
        if rank == 1 and step == 5:
            os.kill(os.getpid(), signal.SIGUSR1)
        ckpt.maybe_save(step)
        if ckpt.should_stop:
            stopped = step
            break
    ckpt.close()
    print(json.dumps({"rank": rank, "stopped": stopped}), flush=True)
    dist.destroy_process_group()


def frozen(run_dir: str, mode: str) -> None:
    """Incremental saves of a DDP model whose first layer is frozen (512 KiB): ``train`` saves steps 1-3 and
    prints the head after each; ``read`` restores the newest and prints what it holds."""
    rank, _ = init()
    torch.manual_seed(0)
    body = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Linear(512, 4))
    body[0].requires_grad_(False)
    net = torch.nn.parallel.DistributedDataParallel(body)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    ckpt = savegame.Checkpointer(run_dir, {"model": net, "optimizer": opt}, incremental=True, keep_last=2,
                                 collective_timeout=20)
    info = ckpt.restore()
    heads = {}
    if mode == "train":
        for step in range(1, 4):
            net(torch.randn(4, 256, generator=torch.Generator().manual_seed(step))).square().mean().backward()
            opt.step()
            opt.zero_grad()
            ckpt.save(step)
            heads[step] = body[1].weight.flatten().tolist()
    ckpt.close()
    print(json.dumps({"rank": rank, "step": info.step if info else None, "heads": heads,
                      "head": body[1].weight.flatten().tolist(), "frozen": float(body[0].weight.double().sum())}),
          flush=True)
    dist.destroy_process_group()


def nccl(run_dir: str) -> None:
    """A DDP model on this rank's GPU with an NCCL group: save, change, restore; report exactness."""
    rank, _ = init("nccl")
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    net = torch.nn.parallel.DistributedDataParallel(model().to(device), device_ids=[rank])
    opt = torch.optim.AdamW(net.parameters(), lr=0.01)
    ckpt = savegame.Checkpointer(run_dir, {"model": net, "optimizer": opt}, collective_timeout=20)
    for step in range(3):
        loss = net(torch.randn(4, 8, device=device)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    ckpt.save(3)
    ckpt.wait()
    expected = full_state(net.module, opt)
    cuda_rng = torch.cuda.get_rng_state().clone()
    torch.randn(10, device=device)
    for p in net.parameters():
        p.data.add_(1.0)
    info = ckpt.restore()
    ckpt.close()
    print(json.dumps({"rank": rank, "step": info.step if info else None,
                      "exact": full_state(net.module, opt) == expected,
                      "cuda_rng": bool(torch.equal(torch.cuda.get_rng_state(), cuda_rng)),
                      "on_gpu": all(p.is_cuda for p in net.parameters())}), flush=True)
    dist.destroy_process_group()


def golden(run_dir: str) -> None:
    """The v3 golden checkpoint: an FSDP2 model and AdamW after one step, per-rank samplers part-way."""
    rank, world = init()
    torch.manual_seed(1234 + rank)
    net, opt = fsdp_model(world)
    fsdp_step(net, opt, 0)
    sampler = savegame.ResumableSampler(10, seed=5)
    for _, _ in zip(range(2 + rank), iter(sampler), strict=False):
        pass
    with savegame.Checkpointer(run_dir, {"model": net, "optimizer": opt, "sampler": sampler}) as ckpt:
        ckpt.save(7, epoch=1, metrics={"loss": 0.25}, extra={"golden": True})
    dist.destroy_process_group()


if __name__ == "__main__":
    scenario, *rest = sys.argv[1:]
    if scenario == "ddp":
        ddp(rest[0], int(rest[1]), int(rest[2]))
    elif scenario == "plain":
        plain(rest[0])
    elif scenario == "die_mid_save":
        die_mid_save(rest[0])
    elif scenario == "signal":
        signal_stop(rest[0])
    elif scenario == "golden":
        golden(rest[0])
    elif scenario == "nccl":
        nccl(rest[0])
    elif scenario == "fsdp":
        fsdp(rest[0], rest[1], int(rest[2]))
    elif scenario == "frozen":
        frozen(rest[0], rest[1])
    else:
        raise SystemExit(f"unknown scenario {scenario}")
