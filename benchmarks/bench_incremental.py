"""Incremental checkpoints (``Checkpointer(..., incremental=True)``) against plain ones, same run, same disk.

1. Frozen backbone, small trained head, AdamW on the head: bytes of 5 checkpoints of
   model + optimizer, against one full checkpoint + 1.1x the changed bytes (the target).
2. Full training (every tensor changes, AdamW on everything): bytes, durable save time
   (``save()`` then ``wait()``) and restore time, incremental against plain; methods
   interleaved within each repetition, medians.
3. The same with 50,000 tiny tensors (the per-tensor cost of the change detection).

    python benchmarks/bench_incremental.py            # 256 MB states
    python benchmarks/bench_incremental.py --small    # seconds (run in CI)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import savegame


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()
               and (f.parent.name == "data" or f.parent.name.startswith("step-")))


def frozen_model(mb: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    width = 1024
    layers = max(1, (mb << 20) // (width * width * 4))
    backbone = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    backbone.requires_grad_(False)
    model = torch.nn.Sequential(backbone, torch.nn.Linear(width, 256))
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, width: int) -> None:
    model(torch.randn(8, width)).square().mean().backward()
    opt.step()
    opt.zero_grad()


def frozen_backbone(root: Path, mb: int) -> dict[str, Any]:
    model, opt = frozen_model(mb)
    step(model, opt, 1024)
    with savegame.Checkpointer(root / "full", {"model": model, "opt": opt}) as ckpt:
        ckpt.save(0)
    one_full = disk_bytes(root / "full")
    changed, before = 0, None
    with savegame.Checkpointer(root / "inc", {"model": model, "opt": opt}, incremental=True) as ckpt:
        for s in range(5):
            step(model, opt, 1024)
            ckpt.save(s)
            now = [t.clone() for t in (*model.state_dict().values(),
                                       *(v for st in opt.state.values() for v in st.values()))]
            if before is not None:
                changed += sum(a.nbytes for a, b in zip(now, before, strict=True) if not torch.equal(a, b))
                changed += torch.get_rng_state().nbytes
            before = now
    total = disk_bytes(root / "inc")
    return {"one_full": one_full, "changed": changed, "five_incremental": total, "five_plain": 5 * one_full,
            "bound": one_full + 1.1 * changed, "within_bound": total <= one_full + 1.1 * changed}


def full_training(root: Path, mb: int, count: int, reps: int) -> dict[str, Any]:
    torch.manual_seed(0)
    per = max(1, (mb << 20) // 3 // count // 4)  # model + two AdamW moments
    params = torch.nn.ParameterDict({f"p{i}": torch.nn.Parameter(torch.randn(per)) for i in range(count)})
    opt = torch.optim.AdamW(params.parameters(), lr=1e-3)
    state = {"model": params, "opt": opt}
    times: dict[str, list[float]] = {"plain": [], "incremental": []}
    cpu: dict[str, list[float]] = {"plain": [], "incremental": []}  # process CPU seconds: less noisy than wall
    restores: dict[str, list[float]] = {"plain": [], "incremental": []}
    sizes = {}
    ckpts = {m: savegame.Checkpointer(root / m, state, incremental=m == "incremental", keep_last=2)
             for m in times}
    for rep in range(reps + 1):
        order = list(ckpts.items()) if rep % 2 else list(ckpts.items())[::-1]  # alternate which goes first
        for method, ckpt in order:
            for p in params.values():
                p.grad = torch.ones_like(p)
            opt.step()  # every tensor changes
            os.sync()
            t0, c0 = time.perf_counter(), time.process_time()
            ckpt.save(rep)
            ckpt.wait()
            if rep:  # the first save of each warms the staging buffers
                times[method].append(time.perf_counter() - t0)
                cpu[method].append(time.process_time() - c0)
            sizes[method] = disk_bytes(root / method) / 2 if rep else None
    for ckpt in ckpts.values():
        ckpt.close()
    for method in times:  # warm page cache for both, as in bench_save_restore.py
        savegame.load(root / method)
    for _ in range(reps):
        for method in times:
            t0 = time.perf_counter()
            savegame.load(root / method)
            restores[method].append(time.perf_counter() - t0)
    paired = [i / p for i, p in zip(times["incremental"], times["plain"], strict=True)]  # same rep, same state
    med = {m: statistics.median(v) for m, v in times.items()}
    med_cpu = {m: statistics.median(v) for m, v in cpu.items()}
    rest = {m: statistics.median(v) for m, v in restores.items()}
    return {"tensors": count * 3, "bytes_plain": sizes["plain"], "bytes_incremental": sizes["incremental"],
            "bytes_ratio": sizes["incremental"] / sizes["plain"], "save_plain_s": med["plain"],
            "save_incremental_s": med["incremental"], "save_ratio": med["incremental"] / med["plain"],
            "save_cpu_ratio": med_cpu["incremental"] / med_cpu["plain"],
            "save_paired_ratio": statistics.median(paired), "save_paired_spread": _quartiles(paired),
            "save_times": times, "save_cpu": cpu,
            "restore_plain_s": rest["plain"], "restore_incremental_s": rest["incremental"],
            "restore_ratio": rest["incremental"] / rest["plain"]}


def _quartiles(values: list[float]) -> tuple[float, float]:
    """The 25th and 75th percentiles (both the median for fewer than two values)."""
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="sg-inc-", dir=args.dir))
    mb = 4 if args.small else 256
    reps = 1 if args.small else args.reps
    try:
        result = {"frozen": frozen_backbone(root / "frozen", mb),
                  "full_big": full_training(root / "big", mb, 60, reps),
                  "full_tiny": full_training(root / "tiny", 2 if args.small else 20,
                                             300 if args.small else 16_667, reps)}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    f = result["frozen"]
    print("| frozen backbone | one full | changed | 5 incremental | 5 plain | bound | within |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    print(f"| {mb} MB | {f['one_full']:,} | {f['changed']:,} | {f['five_incremental']:,} | {f['five_plain']:,} | "
          f"{f['bound']:,.0f} | {f['within_bound']} |")
    print("| full training | tensors | bytes incr/plain | save s plain | save s incr | ratio of medians |"
          " paired ratio, median (IQR) | CPU ratio | restore ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for key in ("full_big", "full_tiny"):
        r = result[key]
        low, high = r["save_paired_spread"]
        print(f"| {key} | {r['tensors']:,} | {r['bytes_ratio']:.4f} | {r['save_plain_s']:.3f} | "
              f"{r['save_incremental_s']:.3f} | {r['save_ratio']:.3f} | {r['save_paired_ratio']:.3f} "
              f"({low:.3f}-{high:.3f}) | {r['save_cpu_ratio']:.3f} | {r['restore_ratio']:.3f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
