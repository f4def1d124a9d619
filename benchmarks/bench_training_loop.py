"""How much a checkpoint costs a training loop, on the GPU when there is one (else on the CPU).

1. Blocked time of ``save()`` for a state living on the device, against the
   floor: one copy of the same bytes from the device into a preallocated host
   buffer (pinned on CUDA), measured in the same run. torch.save (without
   fsync) and torch.distributed.checkpoint's async_save are measured beside it.
2. A real training loop (an MLP with AdamW), saving asynchronously every 50
   steps, against the same loop without checkpoints: the mean step time,
   stalls included, and the slowdown.

    python benchmarks/bench_training_loop.py              # 8 GB state on CUDA, 1 GB on CPU
    python benchmarks/bench_training_loop.py --small      # seconds (run in CI)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import savegame


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def big_state(nbytes: int, count: int, device: torch.device) -> dict[str, Any]:
    per = nbytes // count // 4
    return {"model": torch.nn.ParameterDict(
        {f"p{i}": torch.nn.Parameter(torch.randn(per, device=device)) for i in range(count)})}


def copy_floor(state: dict[str, Any], device: torch.device, reps: int) -> float:
    """One copy of every tensor's bytes into a preallocated host buffer (pinned for CUDA sources)."""
    tensors = [p.detach() for p in state["model"].parameters()]
    total = sum(t.nbytes for t in tensors)
    host = torch.empty(total, dtype=torch.uint8, pin_memory=device.type == "cuda")
    times = []
    for _ in range(reps + 1):
        sync(device)
        t0, offset = time.perf_counter(), 0
        for t in tensors:
            host[offset:offset + t.nbytes].view(t.dtype).copy_(t.reshape(-1), non_blocking=True)
            offset += t.nbytes
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def blocked_times(state: dict[str, Any], device: torch.device, workdir: Path, reps: int) -> dict[str, float]:
    out = {}
    with savegame.Checkpointer(workdir / "blocked", state, keep_last=1) as ckpt:
        ckpt.save(0)  # staging buffers are allocated once, then reused
        ckpt.wait()
        times = []
        for step in range(1, reps + 1):
            sync(device)
            t0 = time.perf_counter()
            ckpt.save(step)
            times.append(time.perf_counter() - t0)
            ckpt.wait()
        out["savegame_blocked_s"] = statistics.median(times)
    sd = {k: v.detach() for k, v in state["model"].state_dict().items()}
    t0 = time.perf_counter()
    torch.save(sd, workdir / "torch.pt")
    out["torch_save_blocked_s"] = time.perf_counter() - t0
    os.remove(workdir / "torch.pt")
    try:
        import torch.distributed.checkpoint as dcp

        t0 = time.perf_counter()
        future = dcp.async_save(sd, checkpoint_id=str(workdir / "dcp"))
        out["dcp_async_save_blocked_s"] = time.perf_counter() - t0
        future.result()
    except Exception as exc:  # reported, not fatal: DCP's single-process support varies by version
        out["dcp_async_save_error"] = repr(exc)  # type: ignore[assignment]
    return out


def training_loop(device: torch.device, width: int, depth: int, steps: int, every: int, batch: int,
                  run_dir: Path | None) -> tuple[float, int]:
    """Mean seconds per step (stalls included) of an MLP + AdamW, saving every ``every`` steps if ``run_dir``."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU())
                                  for _ in range(depth)]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ckpt = savegame.Checkpointer(run_dir, {"model": model, "optimizer": opt}, keep_last=2) if run_dir else None
    x = torch.randn(batch, width, device=device)
    saves = 0
    for step in range(steps + 5):
        if step == 5:  # warm-up steps (allocator, first optimizer state) are not timed
            sync(device)
            t0 = time.perf_counter()
        loss = model(x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ckpt is not None and step >= 5 and (step - 5) % every == every - 1:
            ckpt.save(step)
            saves += 1
    sync(device)
    elapsed = time.perf_counter() - t0
    if ckpt is not None:
        ckpt.close()
    return elapsed / steps, saves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny sizes for CI")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--gb", type=float, default=None, help="state size for the blocked-time part")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    gb = args.gb or (0.01 if args.small else 8.0 if device.type == "cuda" else 1.0)
    width, depth, steps, batch = (64, 2, 100, 16) if args.small else \
        (4096, 16, 300, 256) if device.type == "cuda" else (1024, 8, 200, 64)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"# {name}, torch {torch.__version__}, savegame {savegame.__version__}, {time.strftime('%Y-%m-%d')}",
          flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="savegame-loop-", dir=args.dir or Path(__file__).resolve().parents[1]))
    saves = 0
    try:
        state = big_state(int(gb * 2**30), 100, device)
        result: dict[str, Any] = {"device": device.type, "device_name": name, "state_bytes": int(gb * 2**30),
                                  "copy_floor_s": copy_floor(state, device, args.reps)}
        result.update(blocked_times(state, device, workdir, args.reps))
        del state
        runs: dict[bool, list[float]] = {False: [], True: []}
        for attempt in range(2):  # alternate, keep each variant's best: the machine's speed drifts
            for saving in (False, True):
                mean, count = training_loop(device, width, depth, steps, 50, batch,
                                            workdir / f"loop{attempt}" if saving else None)
                runs[saving].append(mean)
                if saving:
                    saves = count
        without, with_ckpt = min(runs[False]), min(runs[True])
        result.update(step_s_without=without, step_s_with=with_ckpt, saves=saves, steps=steps,
                      slowdown=with_ckpt / without - 1)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"state {gb:g} GB on {device.type}: one copy to host {result['copy_floor_s']:.3f} s, savegame save() blocks "
          f"{result['savegame_blocked_s']:.3f} s ({result['savegame_blocked_s'] / result['copy_floor_s']:.2f}x the copy)"
          f", torch.save {result['torch_save_blocked_s']:.3f} s, dcp.async_save "
          f"{result.get('dcp_async_save_blocked_s', float('nan')):.3f} s")
    print(f"training loop ({steps} steps, save every 50, {saves} saves): {without * 1e3:.2f} ms/step without, "
          f"{with_ckpt * 1e3:.2f} ms/step with checkpoints: slowdown {result['slowdown'] * 100:+.1f}%")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
