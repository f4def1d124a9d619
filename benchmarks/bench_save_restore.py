"""Save/restore benchmark: savegame against torch.save, safetensors and torch.distributed.checkpoint.

One run, the same states, the same disk. For each method and state it reports
the time the caller is blocked, the time until the checkpoint is durable, the
peak extra memory (RSS sampled every millisecond above the level before the
method's first save, so savegame's reusable staging buffers count), throughput
relative to a raw write+fsync of the same bytes (the disk's limit, measured in
the same run), and the time to restore every tensor into the live objects from
a warm page cache. Methods are interleaved within each repetition (the disk's
speed drifts), each save starts from a clean page cache (``os.sync()`` first,
untimed: dirty pages left by the previous writer throttle the next one), and
medians are reported.

    python benchmarks/bench_save_restore.py            # full sizes (make bench)
    python benchmarks/bench_save_restore.py --small    # tiny sizes, seconds (run in CI)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import savegame

PAGE = os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples resident memory in a thread; ``peak`` is the maximum above ``base``."""

    def __init__(self, base: int) -> None:
        self.base = base

    def __enter__(self) -> PeakRSS:
        self.peak_abs = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.peak_abs = max(self.peak_abs, rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_abs = max(self.peak_abs, rss())

    @property
    def peak(self) -> int:
        return max(0, self.peak_abs - self.base)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def fsync_path(path: Path) -> None:
    paths = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    fd = os.open(path.parent if path.is_file() else path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


# ---- states: {name: Stateful}; every method saves and restores the same tensors ----------------
class TensorDict:
    """A Stateful holding a flat dict of tensors that adopts what it is given, as optimizers do."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.tensors

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.tensors = dict(state)


def state_big(total_bytes: int, count: int) -> dict[str, Any]:
    per = total_bytes // count // 4
    return {"model": torch.nn.ParameterDict({f"p{i}": torch.nn.Parameter(torch.randn(per)) for i in range(count)})}


def state_tiny(count: int) -> dict[str, Any]:
    return {"tensors": TensorDict({f"t{i}": torch.randn(4) for i in range(count)})}


def state_tiny_module(count: int) -> dict[str, Any]:
    return {"model": torch.nn.ParameterDict({f"p{i}": torch.nn.Parameter(torch.randn(4)) for i in range(count)})}


def state_model(width: int, depth: int) -> dict[str, Any]:
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, 4 * width), torch.nn.GELU(), torch.nn.Linear(4 * width, width),
                   torch.nn.LayerNorm(width)]
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, width)).sum().backward()
    opt.step()
    return {"model": model, "optimizer": opt}


def live_tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor of the state, flat, as the live objects hold them (what peers save and restore)."""
    out: dict[str, torch.Tensor] = {}
    for name, obj in state.items():
        if isinstance(obj, torch.optim.Optimizer):
            for pid, s in obj.state_dict()["state"].items():
                out.update({f"{name}.{pid}.{k}": v for k, v in s.items() if isinstance(v, torch.Tensor)})
        elif isinstance(obj, torch.nn.Module):
            out.update({f"{name}.{k}": v.detach() for k, v in obj.state_dict().items()})
        else:
            out.update({f"{name}.{k}": v for k, v in obj.state_dict().items()})
    return out


def copy_into(live: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for key, value in loaded.items():
            live[key].copy_(value)


# ---- methods ------------------------------------------------------------------------------------
class Method:
    """save(target) -> (blocked s, durable s); restore(target) -> s. Peers restore into the live tensors."""

    restores = True

    def __init__(self, state: dict[str, Any], workdir: Path) -> None:
        self.state, self.live, self.workdir = state, live_tensors(state), workdir

    def setup(self) -> None:
        """Allocations a method makes once per run (savegame's staging): done before timing."""

    def cleanup(self) -> None:
        """Remove what the last save wrote, outside the timings."""

    def close(self) -> None:
        pass


class Raw(Method):
    restores = False

    def save(self, target: Path) -> tuple[float, float]:
        t0 = time.perf_counter()
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        for t in self.live.values():
            view = memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
            while view.nbytes:
                view = view[os.write(fd, view):]
        os.fsync(fd)
        os.close(fd)
        dt = time.perf_counter() - t0
        return dt, dt


class Savegame(Method):
    def __init__(self, state: dict[str, Any], workdir: Path, async_save: bool) -> None:
        super().__init__(state, workdir)
        run_dir = Path(tempfile.mkdtemp(prefix=f"run-{'async' if async_save else 'sync'}-", dir=workdir))
        # No retention: peers delete nothing inside their timings; old checkpoints are removed between reps.
        self.run_dir, self.ckpt = run_dir, savegame.Checkpointer(run_dir, state, async_save=async_save)
        self.step = 0

    def setup(self) -> None:
        self.ckpt.save(self.step)  # staging buffers are allocated once per run, then reused
        self.ckpt.wait()

    def save(self, target: Path) -> tuple[float, float]:
        self.step += 1
        t0 = time.perf_counter()
        self.ckpt.save(self.step)
        blocked = time.perf_counter() - t0
        self.ckpt.wait()
        return blocked, time.perf_counter() - t0

    def restore(self, target: Path) -> float:
        t0 = time.perf_counter()
        self.ckpt.restore(self.step)
        return time.perf_counter() - t0

    def cleanup(self) -> None:
        for old in self.run_dir.glob("step-*"):
            if old.name != f"step-{self.step:010d}":
                shutil.rmtree(old)

    def close(self) -> None:
        self.ckpt.close()


class TorchSave(Method):
    def save(self, target: Path) -> tuple[float, float]:
        t0 = time.perf_counter()
        torch.save({k: v.state_dict() for k, v in self.state.items()}, target)
        fsync_path(target)
        dt = time.perf_counter() - t0
        return dt, dt

    def restore(self, target: Path) -> float:
        t0 = time.perf_counter()
        obj = torch.load(target, weights_only=True)
        for name, value in self.state.items():
            value.load_state_dict(obj[name])
        return time.perf_counter() - t0


class Safetensors(Method):
    def save(self, target: Path) -> tuple[float, float]:
        from safetensors.torch import save_file

        t0 = time.perf_counter()
        save_file({k: v.contiguous() for k, v in self.live.items()}, str(target))
        fsync_path(target)
        dt = time.perf_counter() - t0
        return dt, dt

    def restore(self, target: Path) -> float:
        from safetensors.torch import load_file

        t0 = time.perf_counter()
        copy_into(self.live, load_file(str(target)))
        return time.perf_counter() - t0


class DCP(Method):
    def __init__(self, state: dict[str, Any], workdir: Path, async_mode: bool) -> None:
        super().__init__(state, workdir)
        self.async_mode = async_mode
        self.restores = not async_mode

    def save(self, target: Path) -> tuple[float, float]:
        import torch.distributed.checkpoint as dcp

        t0 = time.perf_counter()
        if self.async_mode:
            future = dcp.async_save(dict(self.live), checkpoint_id=str(target))
            blocked = time.perf_counter() - t0
            future.result()
        else:
            dcp.save(dict(self.live), checkpoint_id=str(target))
            blocked = -1.0
        fsync_path(target)
        durable = time.perf_counter() - t0
        return (blocked if blocked >= 0 else durable), durable

    def restore(self, target: Path) -> float:
        import torch.distributed.checkpoint as dcp

        t0 = time.perf_counter()
        dcp.load(self.live, checkpoint_id=str(target))  # loads in place into the live tensors
        return time.perf_counter() - t0


METHODS: dict[str, Callable[[dict[str, Any], Path], Method]] = {
    "raw write+fsync": Raw,
    "savegame async": lambda s, w: Savegame(s, w, True),
    "savegame sync": lambda s, w: Savegame(s, w, False),
    "torch.save+fsync": TorchSave,
    "safetensors+fsync": Safetensors,
    "dcp.save": lambda s, w: DCP(s, w, False),
    "dcp.async_save": lambda s, w: DCP(s, w, True),
}


def bench_state(name: str, state: dict[str, Any], reps: int, workdir: Path, methods: list[str]) -> list[dict[str, Any]]:
    live = live_tensors(state)
    size, count = sum(t.nbytes for t in live.values()), len(live)
    samples: dict[str, dict[str, list[float]]] = {m: {"blocked": [], "durable": [], "peak": [], "restore": []}
                                                  for m in methods}
    runners, retained = {}, {}
    for method in methods:
        before = rss()
        runners[method] = METHODS[method](state, workdir)
        runners[method].setup()
        retained[method] = max(0, rss() - before)  # kept between saves (savegame's staging buffers)
    for rep in range(reps):
        for method in methods:
            runner, target = runners[method], workdir / f"{method.replace(' ', '_').replace('+', '_')}-{rep}"
            os.sync()  # start from a clean page cache: the previous writer's dirty pages throttle the next one
            with PeakRSS(rss() - retained[method]) as mem:
                blocked, durable = runner.save(target)
            got = samples[method]
            got["blocked"].append(blocked)
            got["durable"].append(durable)
            got["peak"].append(mem.peak)
            if runner.restores:
                runner.restore(target)  # warm the page cache, then time
                got["restore"].append(runner.restore(target))
            _remove(target)
            runner.cleanup()
    for runner in runners.values():
        runner.close()
    return [_row(name, method, size, count, samples[method]) for method in methods]


def _row(state: str, method: str, size: int, count: int, got: dict[str, list[float]]) -> dict[str, Any]:
    med = {k: statistics.median(v) if v else None for k, v in got.items()}
    return {"state": state, "method": method, "bytes": size, "tensors": count, "blocked_s": med["blocked"],
            "durable_s": med["durable"], "peak_extra_bytes": int(med["peak"] or 0), "restore_s": med["restore"]}


def _remove(target: Path) -> None:
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()


def add_ratios(rows: list[dict[str, Any]]) -> None:
    for state in {r["state"] for r in rows}:
        mine = [r for r in rows if r["state"] == state]
        raw = next((r for r in mine if r["method"] == "raw write+fsync"), None)
        st = next((r for r in mine if r["method"] == "safetensors+fsync"), None)
        for row in mine:
            row["throughput_vs_raw"] = raw["durable_s"] / row["durable_s"] if raw else None
            row["restore_vs_safetensors"] = (st["restore_s"] / row["restore_s"]
                                             if st and st["restore_s"] and row["restore_s"] else None)
            row["us_per_tensor_save"] = row["durable_s"] / row["tensors"] * 1e6
            row["us_per_tensor_restore"] = row["restore_s"] / row["tensors"] * 1e6 if row["restore_s"] else None
            row["peak_vs_state"] = row["peak_extra_bytes"] / row["bytes"]


def targets(rows: list[dict[str, Any]], big: str, tiny: str) -> list[tuple[str, str, str, bool]]:
    """(figure, target, measured, met) for the issue's CPU targets."""
    def get(state: str, method: str) -> dict[str, Any]:
        return next(r for r in rows if r["state"] == state and r["method"] == method)
    sg, ts = get(big, "savegame async"), get(big, "torch.save+fsync")
    tiny_sg = get(tiny, "savegame async")
    out = [
        ("1 GB: time to durable vs torch.save+fsync", "<= 1.0x",
         f"{sg['durable_s'] / ts['durable_s']:.2f}x", sg["durable_s"] <= ts["durable_s"]),
        ("1 GB: throughput vs raw write+fsync", ">= 0.9x", f"{sg['throughput_vs_raw']:.2f}x",
         sg["throughput_vs_raw"] >= 0.9),
        ("1 GB: save() blocks vs torch.save+fsync", "<= 0.1x", f"{sg['blocked_s'] / ts['durable_s']:.3f}x",
         sg["blocked_s"] <= 0.1 * ts["durable_s"]),
        ("tiny tensors: save, us/tensor (durable)", "<= 5", f"{tiny_sg['us_per_tensor_save']:.1f}",
         tiny_sg["us_per_tensor_save"] <= 5),
        ("tiny tensors: restore, us/tensor", "<= 5", f"{tiny_sg['us_per_tensor_restore']:.1f}",
         tiny_sg["us_per_tensor_restore"] <= 5),
        ("1 GB: restore vs safetensors (warm cache)", ">= 0.9x", f"{sg['restore_vs_safetensors']:.2f}x",
         sg["restore_vs_safetensors"] >= 0.9),
        ("1 GB: peak extra memory vs state size", "<= 1.1x", f"{sg['peak_vs_state']:.2f}x", sg["peak_vs_state"] <= 1.1),
    ]
    return out


def print_tables(rows: list[dict[str, Any]], checks: list[tuple[str, str, str, bool]]) -> None:
    print("\n| state | method | blocked s | durable s | vs raw write | peak extra MB | restore s | restore vs safetensors "
          "| us/tensor save / restore |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        restore = f"{r['restore_s']:.3f}" if r["restore_s"] is not None else "-"
        vs_st = f"{r['restore_vs_safetensors']:.2f}x" if r["restore_vs_safetensors"] else "-"
        per = f"{r['us_per_tensor_save']:.1f} / {r['us_per_tensor_restore']:.1f}" if r["us_per_tensor_restore"] \
            else f"{r['us_per_tensor_save']:.1f} / -"
        print(f"| {r['state']} | {r['method']} | {r['blocked_s']:.3f} | {r['durable_s']:.3f} | "
              f"{r['throughput_vs_raw']:.2f}x | {r['peak_extra_bytes'] / 2**20:.0f} | {restore} | {vs_st} | {per} |")
    print("\n| target | wanted | measured | met |\n| --- | --- | ---: | --- |")
    for figure, wanted, measured, met in checks:
        print(f"| {figure} | {wanted} | {measured} | {'yes' if met else 'NO'} |")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny sizes for CI")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir next to the repo)")
    parser.add_argument("--out", default=None, help="write all rows as JSON here")
    parser.add_argument("--no-dcp", action="store_true", help="skip torch.distributed.checkpoint")
    parser.add_argument("--states", default=None, help="comma-separated state numbers to run (default: all)")
    args = parser.parse_args()
    torch.manual_seed(0)
    reps = args.reps or (1 if args.small else 5)
    if args.small:
        names = ("big", "tiny", "tiny module", "model+adamw")
        states = {names[0]: lambda: state_big(8 << 20, 20), names[1]: lambda: state_tiny(500),
                  names[2]: lambda: state_tiny_module(500), names[3]: lambda: state_model(64, 2)}
    else:
        names = ("1 GB / 200 tensors", "50,000 tiny tensors", "50,000 tiny parameters (nn.ParameterDict)",
                 "model + AdamW")
        states = {names[0]: lambda: state_big(1 << 30, 200), names[1]: lambda: state_tiny(50_000),
                  names[2]: lambda: state_tiny_module(50_000), names[3]: lambda: state_model(1024, 6)}
    methods = [m for m in METHODS if not (args.no_dcp and m.startswith("dcp"))]
    if args.states:
        chosen = {names[int(i)] for i in args.states.split(",")}
        states = {k: v for k, v in states.items() if k in chosen}
    workdir = Path(tempfile.mkdtemp(prefix="savegame-bench-", dir=args.dir or Path(__file__).resolve().parents[1]))
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, python {platform.python_version()}, "
          f"torch {torch.__version__}, savegame {savegame.__version__}, {time.strftime('%Y-%m-%d')}, "
          f"{reps} repetitions (medians), disk {workdir}", flush=True)
    rows: list[dict[str, Any]] = []
    try:
        for name, build in states.items():
            rows += bench_state(name, build(), reps, workdir, methods)
            print(f"# {name}: done", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    add_ratios(rows)
    checks = targets(rows, names[0], names[1]) if {names[0], names[1]} <= set(states) else []
    print_tables(rows, checks)
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "targets": checks}, indent=1))


if __name__ == "__main__":
    main()
