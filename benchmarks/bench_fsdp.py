"""Distributed benchmark: savegame against torch.distributed.checkpoint in a 2-rank FSDP2 job on the CPU.

The script starts its own job: two ranks of itself as subprocesses (gloo, as torchrun
would), each holding half of a stack of Linear layers sharded with FSDP2's
``fully_shard`` (every layer and the root) and its AdamW state after one step. In
the same run, on the same state and the same disk, it measures:

- savegame ``Checkpointer.save()`` (``async_save=True``): *blocked*, the time ``save()``
  takes to return, and *durable*, ``save()`` + ``wait()`` (committed: renamed into place);
- ``torch.distributed.checkpoint.save`` (``FileSystemWriter``, which fsyncs its files)
  and ``async_save`` on its own gloo process group (blocked: until the future is
  returned; durable: until it is done), each from ``get_state_dict`` on, plus an fsync
  of the checkpoint directory;
- restoring into the FSDP2 model and optimizer: savegame ``restore()`` against
  ``get_state_dict`` + ``dcp.load`` + ``set_state_dict``, both from a warm page cache.

Every timed region starts and ends with a barrier; each rank times itself and the
figure is the maximum over ranks, then the median over repetitions. Each save starts
from a clean page cache (``os.sync()`` first, untimed) in a directory of its own; the
methods' order alternates between repetitions (the disk's speed drifts, and a writer
inherits the previous one's dirty pages). Between a save and its restore the live
state is zeroed (untimed) and checked afterwards, so a restore that loads nothing fails.
savegame checksums every byte it writes and reads and commits atomically; DCP does neither.

    python benchmarks/bench_fsdp.py            # ~300 MB of parameters + AdamW state (make bench)
    python benchmarks/bench_fsdp.py --small    # ~20 MB, seconds (run in CI)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import savegame

WORLD = 2
SAVES = ("savegame save", "dcp.save", "dcp.async_save")
RESTORES = ("savegame restore", "dcp.load")


# ---- the job's state ----------------------------------------------------------------------------
def build(width: int, depth: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A stack of Linear layers, every layer and the root ``fully_shard``-ed, after one AdamW step."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(depth)])
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(8, width)).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def local_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """This rank's shards of every parameter and optimizer state tensor, as the live objects hold them."""
    out = [p.detach().to_local() if hasattr(p, "to_local") else p.detach() for p in model.parameters()]
    for state in opt.state.values():
        out += [v.to_local() if hasattr(v, "to_local") else v for v in state.values() if torch.is_tensor(v)]
    return out


def zero(tensors: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for t in tensors:
            t.zero_()


# ---- timing: barrier, this rank's clock, barrier ------------------------------------------------
def timed(action: Callable[[], float | None]) -> tuple[float, float]:
    """(first, total) seconds of ``action`` between two barriers; ``first`` is what it returns (the
    blocked part of an async save, measured from the same start) or the total."""
    dist.barrier()
    t0 = time.perf_counter()
    first = action()
    total = time.perf_counter() - t0
    dist.barrier()
    return (total if first is None else first - t0), total


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Methods:
    """The three saves and two restores of one rank, on one model and optimizer."""

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, workdir: Path) -> None:
        self.model, self.opt, self.workdir = model, opt, workdir
        self.ckpt = savegame.Checkpointer(workdir / "savegame", {"model": model, "optimizer": opt},
                                          collective_timeout=120)
        self.async_group = dist.new_group(backend="gloo")  # DCP's async save must not share the job's group
        self.step = 0

    def savegame_save(self) -> float:
        self.step += 1
        self.ckpt.save(self.step)
        blocked = time.perf_counter()
        self.ckpt.wait()
        return blocked

    def dcp_save(self, target: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(self.model, self.opt)
        dcp.save({"model": msd, "optim": osd}, storage_writer=dcp.FileSystemWriter(target))
        if dist.get_rank() == 0:
            fsync_dir(target)

    def dcp_async_save(self, target: Path) -> float:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(self.model, self.opt)
        future = dcp.async_save({"model": msd, "optim": osd}, storage_writer=dcp.FileSystemWriter(target),
                                process_group=self.async_group)
        blocked = time.perf_counter()
        future.result()
        if dist.get_rank() == 0:
            fsync_dir(target)
        return blocked

    def savegame_restore(self) -> None:
        self.ckpt.restore(self.step)

    def dcp_load(self, target: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(self.model, self.opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, storage_reader=dcp.FileSystemReader(target))
        set_state_dict(self.model, self.opt, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def close(self) -> None:
        self.ckpt.close()


def clean_page_cache() -> None:
    if dist.get_rank() == 0:
        os.sync()
    dist.barrier()


def run_rep(m: Methods, rep: int, expect: list[torch.Tensor]) -> dict[str, dict[str, float]]:
    """One repetition on this rank: every save, then every restore, in alternating order."""
    out: dict[str, dict[str, float]] = {}
    target = {"dcp.save": m.workdir / f"dcp-{rep}", "dcp.async_save": m.workdir / f"dcp-async-{rep}"}
    saves: dict[str, Callable[[], float | None]] = {
        "savegame save": m.savegame_save, "dcp.save": lambda: m.dcp_save(target["dcp.save"]),
        "dcp.async_save": lambda: m.dcp_async_save(target["dcp.async_save"])}
    restores: dict[str, Callable[[], None]] = {
        "savegame restore": m.savegame_restore, "dcp.load": lambda: m.dcp_load(target["dcp.save"])}
    for name in (SAVES if rep % 2 == 0 else SAVES[::-1]):
        clean_page_cache()
        blocked, durable = timed(saves[name])
        out[name] = {"blocked_s": blocked, "durable_s": durable}
    for name in (RESTORES if rep % 2 == 0 else RESTORES[::-1]):
        restores[name]()  # warm the page cache (both methods read from it), untimed
        zero(local_tensors(m.model, m.opt))
        _, seconds = timed(restores[name])
        if not all(torch.equal(a, b) for a, b in zip(local_tensors(m.model, m.opt), expect, strict=True)):
            raise RuntimeError(f"{name} did not bring back the saved state")
        out[name] = {"restore_s": seconds}
    dist.barrier()
    if dist.get_rank() == 0:  # untimed: keep the disk from filling up
        for old in [*target.values(), *(m.workdir / "savegame").glob("step-*")]:
            if old.name != f"step-{m.step:010d}":
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return out


def worker(args: argparse.Namespace) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    rank = dist.get_rank()
    model, opt = build(args.width, args.depth)
    expect = [t.clone() for t in local_tensors(model, opt)]
    nbytes = [0] * dist.get_world_size()
    dist.all_gather_object(nbytes, sum(t.nbytes for t in expect))
    workdir = Path(args.dir)
    m = Methods(model, opt, workdir)
    run_rep(m, -1, expect)  # warm-up, untimed: first-call costs (planner caches, imports, allocator)
    samples = []
    for rep in range(args.reps):
        samples.append(run_rep(m, rep, expect))
        if rank == 0:
            print(f"# repetition {rep + 1}/{args.reps}: done", flush=True)
    m.close()
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, samples)
    if rank == 0:
        Path(args.result).write_text(json.dumps({"bytes": sum(nbytes), "tensors": len(expect), "ranks": every}))
    dist.destroy_process_group()


# ---- the launcher: starts the ranks, reduces and prints -----------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(args: argparse.Namespace, workdir: Path, result: Path) -> None:
    port, procs, logs = str(free_port()), [], []
    argv = [sys.executable, __file__, "--worker", "--dir", str(workdir), "--result", str(result),
            "--width", str(args.width), "--depth", str(args.depth), "--reps", str(args.reps)]
    for rank in range(WORLD):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        log = open(workdir / f"rank{rank}.log", "w")  # noqa: SIM115 (closed below)
        logs.append(log)
        procs.append(subprocess.Popen(argv, env=env, stdout=None if rank == 0 else log, stderr=log))
    try:
        for p in procs:
            p.wait(timeout=args.timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    for rank, p in enumerate(procs):
        if p.returncode != 0:
            tail = (workdir / f"rank{rank}.log").read_text()[-4000:]
            raise SystemExit(f"rank {rank} exited {p.returncode}:\n{tail}")


def reduce(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per method and figure: the max over ranks of each repetition, then the median (and the spread)."""
    ranks = raw["ranks"]
    figures: dict[str, dict[str, Any]] = {}
    for method in (*SAVES, *RESTORES):
        figures[method] = {}
        for key in ranks[0][0][method]:
            per_rep = [max(rank[rep][method][key] for rank in ranks) for rep in range(len(ranks[0]))]
            figures[method][key] = statistics.median(per_rep)
            figures[method][key + "_reps"] = per_rep
    return figures


def targets(f: dict[str, dict[str, Any]]) -> list[tuple[str, str, float, float, bool]]:
    """(figure, target, ratio of the medians, median of the per-repetition ratios, met) for the issue's
    distributed targets. A repetition's methods ran back to back, so its ratio shares the disk's mood of
    the moment; the target is judged on the ratio of the medians."""
    def ratio(a: tuple[str, str], b: tuple[str, str], wanted: float, figure: str) -> tuple[str, str, float, float,
                                                                                           bool]:
        mine, theirs = f[a[0]], f[b[0]]
        of_medians = mine[a[1]] / theirs[b[1]]
        paired = statistics.median(x / y for x, y in zip(mine[a[1] + "_reps"], theirs[b[1] + "_reps"], strict=True))
        return figure, f"<= {wanted:g}x", of_medians, paired, of_medians <= wanted
    return [ratio(("savegame save", "blocked_s"), ("dcp.save", "durable_s"), 0.2, "save() blocked vs dcp.save"),
            ratio(("savegame save", "durable_s"), ("dcp.save", "durable_s"), 1.1, "time to durable vs dcp.save"),
            ratio(("savegame restore", "restore_s"), ("dcp.load", "restore_s"), 1.1, "restore() vs dcp.load")]


def print_tables(f: dict[str, dict[str, Any]], checks: list[tuple[str, str, float, float, bool]]) -> None:
    save = f["dcp.save"]["durable_s"]
    print("\n| method | blocked s | durable s | blocked vs dcp.save | durable vs dcp.save | reps (durable) |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for method in SAVES:
        r = f[method]
        reps = ", ".join(f"{x:.3f}" for x in r["durable_s_reps"])
        print(f"| {method} | {r['blocked_s']:.3f} | {r['durable_s']:.3f} | {r['blocked_s'] / save:.2f}x | "
              f"{r['durable_s'] / save:.2f}x | {reps} |")
    load = f["dcp.load"]["restore_s"]
    print("\n| method | restore s | vs dcp.load | reps |\n| --- | ---: | ---: | --- |")
    for method in RESTORES:
        r = f[method]
        reps = ", ".join(f"{x:.3f}" for x in r["restore_s_reps"])
        print(f"| {method} | {r['restore_s']:.3f} | {r['restore_s'] / load:.2f}x | {reps} |")
    print("\n| target | wanted | measured (ratio of medians) | median of per-repetition ratios | met |")
    print("| --- | --- | ---: | ---: | --- |")
    for figure, wanted, ratio, paired, met in checks:
        print(f"| {figure} | {wanted} | {ratio:.2f}x | {paired:.2f}x | {'yes' if met else 'NO'} |")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="~20 MB for CI")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--width", type=int, default=None, help="features of each Linear layer")
    parser.add_argument("--depth", type=int, default=None, help="number of Linear layers")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir next to the repo)")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before the ranks are killed")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.width = args.width or (256 if args.small else 1024)
    args.depth = args.depth or 24
    args.reps = args.reps or (2 if args.small else 5)
    if args.worker:
        worker(args)
        return
    workdir = Path(tempfile.mkdtemp(prefix="savegame-bench-fsdp-", dir=args.dir or Path(__file__).resolve().parents[1]))
    try:
        print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, python "
              f"{platform.python_version()}, torch {torch.__version__}, savegame {savegame.__version__}, "
              f"{time.strftime('%Y-%m-%d')}, {WORLD} ranks (gloo, FSDP2), {args.depth} x Linear({args.width}, "
              f"{args.width}) + AdamW, {args.reps} repetitions (max over ranks, medians), disk {workdir}", flush=True)
        result = workdir / "result.json"
        launch(args, workdir, result)
        raw = json.loads(result.read_text())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    figures = reduce(raw)
    checks = targets(figures)
    print(f"# state: {raw['bytes'] / 2**20:.0f} MB over {WORLD} ranks ({raw['tensors']} local tensors a rank)")
    print_tables(figures, checks)
    if args.out:
        Path(args.out).write_text(json.dumps({"bytes": raw["bytes"], "ranks": WORLD, "width": args.width,
                                              "depth": args.depth, "reps": args.reps, "figures": figures,
                                              "targets": checks}, indent=1))


if __name__ == "__main__":
    main()
