"""Save/restore benchmark: savegame against torch.save, safetensors and torch.distributed.checkpoint.

One run, the same states, the same disk. For each method and state it reports
the time the caller is blocked, the time until the checkpoint is durable, the
peak extra memory (RSS sampled every millisecond above the level before the
call), throughput relative to a raw write+fsync of the same number of bytes
(the disk's limit, measured in the same run), and the restore time from a warm
page cache. Medians of --reps repetitions.

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

import torch

import savegame

PAGE = os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples resident memory in a thread; ``peak`` is the maximum above the level at start."""

    def __enter__(self) -> PeakRSS:
        self.base = self.peak_abs = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.peak_abs = max(self.peak_abs, _rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_abs = max(self.peak_abs, _rss())

    @property
    def peak(self) -> int:
        return self.peak_abs - self.base


def _rss() -> int:
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


# ---- states ---------------------------------------------------------------------------------
def state_big(total_bytes: int, count: int) -> dict:
    per = total_bytes // count // 4
    return {"model": torch.nn.ParameterDict({f"p{i}": torch.nn.Parameter(torch.randn(per)) for i in range(count)})}


def state_tiny(count: int) -> dict:
    return {"model": torch.nn.ParameterDict({f"p{i}": torch.nn.Parameter(torch.randn(4)) for i in range(count)})}


def state_model(width: int, depth: int) -> dict:
    layers = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, 4 * width), torch.nn.GELU(), torch.nn.Linear(4 * width, width),
                   torch.nn.LayerNorm(width)]
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, width)).sum().backward()
    opt.step()
    return {"model": model, "optimizer": opt}


def tensors_of(state: dict) -> dict[str, torch.Tensor]:
    """A flat dict of every tensor (what torch.save / safetensors / DCP are given)."""
    out = {f"model.{k}": v for k, v in state["model"].state_dict().items()}
    if "optimizer" in state:
        for pid, s in state["optimizer"].state_dict()["state"].items():
            for k, v in s.items():
                if isinstance(v, torch.Tensor):
                    out[f"opt.{pid}.{k}"] = v
    return out


def nbytes(flat: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in flat.values())


# ---- methods: each returns (blocked s, durable s, peak extra bytes) ---------------------------
def m_raw(state: dict, flat: dict, target: Path) -> tuple[float, float, int]:
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        for t in flat.values():
            os.write(fd, memoryview(t.detach().reshape(-1).view(torch.uint8).numpy()))
        os.fsync(fd)
        os.close(fd)
        dt = time.perf_counter() - t0
    return dt, dt, mem.peak


def m_savegame(async_save: bool) -> Callable[[dict, dict, Path], tuple[float, float, int]]:
    def run(state: dict, flat: dict, target: Path) -> tuple[float, float, int]:
        ckpt = savegame.Checkpointer(target, state, async_save=async_save)
        ckpt.save(0)  # warm-up: staging buffers are allocated once per run, then reused
        ckpt.wait()
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            ckpt.save(1)
            blocked = time.perf_counter() - t0
            ckpt.wait()
            durable = time.perf_counter() - t0
        ckpt.close()
        return blocked, durable, mem.peak
    return run


def m_torch_save(state: dict, flat: dict, target: Path) -> tuple[float, float, int]:
    obj = {k: v.state_dict() for k, v in state.items()}
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        torch.save(obj, target)
        fsync_path(target)
        dt = time.perf_counter() - t0
    return dt, dt, mem.peak


def m_safetensors(state: dict, flat: dict, target: Path) -> tuple[float, float, int]:
    from safetensors.torch import save_file

    contiguous = {k: v.detach().contiguous() for k, v in flat.items()}
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        save_file(contiguous, str(target))
        fsync_path(target)
        dt = time.perf_counter() - t0
    return dt, dt, mem.peak


def m_dcp(async_mode: bool) -> Callable[[dict, dict, Path], tuple[float, float, int]]:
    def run(state: dict, flat: dict, target: Path) -> tuple[float, float, int]:
        import torch.distributed.checkpoint as dcp

        sd = {k: v.detach() for k, v in flat.items()}
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            if async_mode:
                future = dcp.async_save(sd, checkpoint_id=str(target))
                blocked = time.perf_counter() - t0
                future.result()
            else:
                dcp.save(sd, checkpoint_id=str(target))
                blocked = None
            fsync_path(target)
            durable = time.perf_counter() - t0
        return (blocked if blocked is not None else durable), durable, mem.peak
    return run


# ---- restores: each returns seconds ---------------------------------------------------------
def r_savegame(state: dict, target: Path) -> float:
    with savegame.Checkpointer(target, state) as ckpt:
        t0 = time.perf_counter()
        ckpt.restore()
        return time.perf_counter() - t0


def r_torch_load(state: dict, target: Path) -> float:
    t0 = time.perf_counter()
    obj = torch.load(target, weights_only=True)
    for k, v in state.items():
        v.load_state_dict(obj[k])
    return time.perf_counter() - t0


def r_safetensors(state: dict, target: Path) -> float:
    from safetensors.torch import load_file

    t0 = time.perf_counter()
    loaded = load_file(str(target))
    state["model"].load_state_dict({k[6:]: v for k, v in loaded.items() if k.startswith("model.")})
    return time.perf_counter() - t0


def r_dcp(state: dict, target: Path) -> float:
    import torch.distributed.checkpoint as dcp

    sd = {k: torch.empty_like(v) for k, v in tensors_of(state).items()}
    t0 = time.perf_counter()
    dcp.load(sd, checkpoint_id=str(target))
    state["model"].load_state_dict({k[6:]: v for k, v in sd.items() if k.startswith("model.")}, strict=False)
    return time.perf_counter() - t0


METHODS = {
    "raw write+fsync": (m_raw, None),
    "savegame async": (m_savegame(True), r_savegame),
    "savegame sync": (m_savegame(False), None),
    "torch.save+fsync": (m_torch_save, r_torch_load),
    "safetensors+fsync": (m_safetensors, r_safetensors),
    "dcp.save": (m_dcp(False), r_dcp),
    "dcp.async_save": (m_dcp(True), None),
}


def bench_state(name: str, state: dict, reps: int, workdir: Path, methods: list[str]) -> list[dict]:
    flat = tensors_of(state)
    size = nbytes(flat)
    rows = []
    for method in methods:
        save_fn, restore_fn = METHODS[method]
        blocked, durable, peak, restore = [], [], [], []
        for rep in range(reps):
            target = workdir / f"{method.replace(' ', '_').replace('+', '_')}-{rep}"
            try:
                b, d, p = save_fn(state, flat, target)
                blocked.append(b)
                durable.append(d)
                peak.append(p)
                if restore_fn is not None:
                    restore.append(restore_fn(state, target))
            finally:
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        row = {"state": name, "method": method, "bytes": size, "tensors": len(flat),
               "blocked_s": statistics.median(blocked), "durable_s": statistics.median(durable),
               "peak_extra_bytes": int(statistics.median(peak)),
               "restore_s": statistics.median(restore) if restore else None}
        rows.append(row)
        print(json.dumps(row), flush=True)
    raw = next((r for r in rows if r["method"] == "raw write+fsync"), None)
    for row in rows:
        row["throughput_vs_raw"] = raw["durable_s"] / row["durable_s"] if raw else None
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny sizes for CI")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir next to the repo)")
    parser.add_argument("--out", default=None, help="write all rows as JSON here")
    parser.add_argument("--no-dcp", action="store_true", help="skip torch.distributed.checkpoint")
    args = parser.parse_args()
    torch.manual_seed(0)
    reps = args.reps or (1 if args.small else 3)
    if args.small:
        states = {"big": lambda: state_big(8 << 20, 20), "tiny": lambda: state_tiny(500),
                  "model+adamw": lambda: state_model(64, 2)}
    else:
        states = {"1 GB / 200 tensors": lambda: state_big(1 << 30, 200), "50,000 tiny tensors": lambda: state_tiny(50_000),
                  "model+AdamW": lambda: state_model(1024, 6)}
    methods = [m for m in METHODS if not (args.no_dcp and m.startswith("dcp"))]
    workdir = Path(tempfile.mkdtemp(prefix="savegame-bench-", dir=args.dir or Path(__file__).resolve().parents[1]))
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, python "
          f"{platform.python_version()}, torch {torch.__version__}, savegame {savegame.__version__}, "
          f"{time.strftime('%Y-%m-%d')}, disk {workdir}", flush=True)
    rows = []
    try:
        for name, build in states.items():
            rows += bench_state(name, build(), reps, workdir, methods)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print_table(rows)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


def print_table(rows: list[dict]) -> None:
    print(f"\n| state | method | blocked s | durable s | vs raw write | peak extra MB | restore s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        restore = f"{r['restore_s']:.3f}" if r["restore_s"] is not None else "-"
        print(f"| {r['state']} | {r['method']} | {r['blocked_s']:.3f} | {r['durable_s']:.3f} | "
              f"{r['throughput_vs_raw']:.2f}x | {r['peak_extra_bytes'] / 2**20:.0f} | {restore} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
