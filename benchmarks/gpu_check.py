"""The GPU check of issue 14, in one run of a few minutes on one machine with a CUDA device.

1. ``pytest -m cuda``: every CUDA test (they skip without a GPU, so here they must run).
2. Save: a state of ``--gb`` GB on the GPU. ``save()`` blocked time against the floor,
   one device-to-host copy of the same bytes into page-locked memory in the same run
   (target: at most 1.5x), and the GPU memory the save used beyond the state.
3. Restore: the same checkpoint read back into the live GPU tensors (``restore()``), and
   ``restore(map_location="cuda")`` of a model plus Adam, against two floors measured in
   the same run: a host-to-device copy of the same bytes from page-locked memory, and a
   read of the checkpoint files into host memory (page cache warm: it was just written).
   Restore speed should approach the lower of the two. Peak GPU memory is reported
   against the state's size.
4. A training loop (MLP + AdamW) saving every 50 steps against the same loop without
   checkpoints: the step-time cost (target: at most 3%).

Figures go to stdout and, as JSON, to ``--out`` (default ``$OUT/gpu_check.json`` when
``$OUT`` is set, else ``gpu_check.json``). ``--budget`` seconds bounds the whole run:
parts that would start after it are skipped and listed under ``skipped``.

    python benchmarks/gpu_check.py                       # on the GPU machine (~6 min on an H200)
    python benchmarks/gpu_check.py --small --device cpu --no-tests   # the logic, in seconds, anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_training_loop import sync, training_loop  # the same loop the CPU rows time

import savegame
from savegame.engine.pinned import HostBuffer, cuda_pinner

MB = 1 << 20


def host_buffer(nbytes: int, device: torch.device) -> tuple[torch.Tensor, object]:
    """Page-locked on CUDA (savegame's own kind, so floor and savegame use the same memory); keep the 2nd item."""
    if device.type == "cuda":
        pinned = HostBuffer(nbytes, cuda_pinner())  # unregistered when collected: the caller keeps it
        return pinned.tensor, pinned
    return torch.empty(nbytes, dtype=torch.uint8), None


def make_state(nbytes: int, count: int, device: torch.device) -> torch.nn.ParameterDict:
    """A module, so a restore reads straight into its parameters (the GPU streaming path)."""
    per = max(nbytes // count // 4, 1)
    return torch.nn.ParameterDict({f"p{i}": torch.nn.Parameter(torch.randn(per, device=device), requires_grad=False)
                                   for i in range(count)})


def timed(fn: Any, device: torch.device, reps: int) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after one untimed warm-up."""
    times = []
    for rep in range(reps + 1):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if rep:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_tests(timeout: float) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), str(ROOT),
                                                                      os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    try:
        out = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider",
                              str(ROOT / "tests")], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=timeout, check=False)
        text, rc = out.stdout + out.stderr, out.returncode
    except subprocess.TimeoutExpired as exc:
        text, rc = f"timed out after {timeout:.0f} s: {exc.stdout!r}"[-4000:], 124
    print(text[-6000:], flush=True)
    return {"rc": rc, "seconds": round(time.perf_counter() - t0, 1), "summary": text.strip().splitlines()[-1:]}


def save_rows(state: torch.nn.ParameterDict, device: torch.device, workdir: Path, reps: int) -> dict[str, Any]:
    tensors = [p.detach() for p in state.values()]
    total = sum(t.nbytes for t in tensors)
    host, keep = host_buffer(total, device)

    def floor() -> None:
        offset = 0
        for t in tensors:
            host[offset:offset + t.nbytes].view(t.dtype).copy_(t, non_blocking=True)
            offset += t.nbytes

    out: dict[str, Any] = {"state_bytes": total, "d2h_floor_s": timed(floor, device, reps)}
    host = torch.empty(0)  # the floor's page-locked memory goes before savegame's own is measured
    del keep
    with savegame.Checkpointer(workdir / "save", {"m": state}, keep_last=1) as ckpt:
        t0 = time.perf_counter()
        ckpt.save(0)  # allocates and page-locks the staging buffers once
        out["first_save_blocked_s"] = time.perf_counter() - t0
        ckpt.wait()
        times, extra = [], []
        for step in range(1, reps + 1):
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            t0 = time.perf_counter()
            ckpt.save(step)
            times.append(time.perf_counter() - t0)
            if device.type == "cuda":
                extra.append(torch.cuda.max_memory_allocated(device) - before)
            ckpt.wait()
        staging = ckpt._staging
        out["pinned_bytes"] = staging.pinned_bytes if staging is not None else 0
    out["save_blocked_s"] = statistics.median(times)
    out["save_vs_floor"] = out["save_blocked_s"] / out["d2h_floor_s"]
    out["save_gpu_temporaries_bytes"] = max(extra, default=0)
    return out


def restore_rows(state: torch.nn.ParameterDict, device: torch.device, workdir: Path, reps: int) -> dict[str, Any]:
    total = sum(p.nbytes for p in state.values())
    host, keep = host_buffer(total, device)
    targets = torch.nn.ParameterDict({k: torch.nn.Parameter(torch.empty_like(v), requires_grad=False)
                                      for k, v in state.items()})

    def h2d() -> None:
        offset = 0
        for t in (p.detach() for p in targets.values()):
            t.copy_(host[offset:offset + t.nbytes].view(t.dtype), non_blocking=True)
            offset += t.nbytes

    out: dict[str, Any] = {"h2d_floor_s": timed(h2d, device, reps)}
    host = torch.empty(0)  # the floor's page-locked memory goes before savegame's own is measured
    del keep
    files = sorted((workdir / "save").glob("step-*/tensors-*.safetensors"))
    sink = bytearray(max((f.stat().st_size for f in files), default=1))

    def read_files() -> None:
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                fh.readinto(sink)

    out["read_floor_s"] = timed(read_files, device, reps)
    sink = bytearray()
    with savegame.Checkpointer(workdir / "save", {"m": targets}, keep_last=1) as ckpt:
        out["restore_s"] = timed(lambda: ckpt.restore(), device, reps)
    out["restore_GBps"] = total / out["restore_s"] / 1e9
    out["h2d_floor_GBps"] = total / out["h2d_floor_s"] / 1e9
    out["read_floor_GBps"] = total / out["read_floor_s"] / 1e9
    out["restore_vs_floor"] = out["restore_s"] / max(out["h2d_floor_s"], out["read_floor_s"])
    assert all(torch.equal(targets[k], v) for k, v in state.items()), "restored values differ"
    out["restored_into_the_parameters"] = True
    return out


def adam_restore_rows(device: torch.device, workdir: Path, width: int, depth: int) -> dict[str, Any]:
    """restore(map_location=...) of a model + Adam: time and peak device memory against the new state."""
    def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(depth)]).to(device)
        return model, torch.optim.Adam(model.parameters())

    model, opt = build()
    model(torch.randn(4, width, device=device)).sum().backward()
    opt.step()
    with savegame.Checkpointer(workdir / "adam", {"model": model, "opt": opt}) as ckpt:
        ckpt.save(1)
    params = sum(p.nbytes for p in model.parameters())
    del model, opt
    fresh, fresh_opt = build()
    sync(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    with savegame.Checkpointer(workdir / "adam", {"model": fresh, "opt": fresh_opt}) as ckpt:
        ckpt.restore(map_location=str(device))
    sync(device)
    out: dict[str, Any] = {"adam_restore_s": time.perf_counter() - t0, "adam_state_bytes": 3 * params,
                           "adam_new_bytes": 2 * params}
    if device.type == "cuda":
        out["adam_restore_peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device) - before
        out["adam_restore_peak_vs_new_state"] = out["adam_restore_peak_gpu_bytes"] / out["adam_new_bytes"]
    out["adam_step_on_cpu"] = all(s["step"].is_cpu for s in fresh_opt.state.values())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny sizes: checks the script, measures nothing")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--gb", type=float, default=None, help="state size of the save/restore rows (default 8)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--budget", type=float, default=450.0, help="seconds; later parts are skipped past it")
    parser.add_argument("--no-tests", action="store_true", help="skip pytest -m cuda")
    parser.add_argument("--dir", default=None, help="where checkpoints are written (default: next to the repo)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    start = time.perf_counter()
    gb = args.gb or (0.005 if args.small else 8.0)
    width, depth, steps, batch = (64, 2, 100, 16) if args.small else (4096, 16, 200, 4096)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out_path = Path(args.out or Path(os.environ.get("OUT", ".")) / "gpu_check.json")
    result: dict[str, Any] = {"device": name, "torch": torch.__version__, "savegame": savegame.__version__,
                              "state_gb": gb, "skipped": []}
    print(f"# {name}, torch {torch.__version__}, savegame {savegame.__version__}", flush=True)

    def within(part: str, cost: float) -> bool:
        if time.perf_counter() - start + cost > args.budget:
            result["skipped"].append(part)
            print(f"skipped {part}: past the {args.budget:.0f} s budget", flush=True)
            return False
        return True

    workdir = Path(tempfile.mkdtemp(prefix="savegame-gpu-check-", dir=args.dir or ROOT))
    try:
        if not args.no_tests:
            result["tests"] = run_tests(timeout=min(240.0, args.budget / 2))
        if within("save and restore", 0 if args.small else 90):
            state = make_state(int(gb * 2**30), 32, device)
            result.update(save_rows(state, device, workdir, args.reps))
            print(f"save: {gb:g} GB, floor {result['d2h_floor_s']:.3f} s, save() blocks {result['save_blocked_s']:.3f} s"
                  f" = {result['save_vs_floor']:.2f}x (target <= 1.5x); first save {result['first_save_blocked_s']:.2f} s;"
                  f" pinned {result['pinned_bytes'] / MB:.0f} MB for {result['state_bytes'] / MB:.0f} MB;"
                  f" GPU temporaries {result['save_gpu_temporaries_bytes'] / MB:.1f} MB", flush=True)
            result.update(restore_rows(state, device, workdir, args.reps))
            print(f"restore: {result['restore_GBps']:.2f} GB/s; floors: host-to-device {result['h2d_floor_GBps']:.2f} "
                  f"GB/s, file read {result['read_floor_GBps']:.2f} GB/s; {result['restore_vs_floor']:.2f}x the slower "
                  "floor's time", flush=True)
            del state
            shutil.rmtree(workdir / "save", ignore_errors=True)
        if within("adam restore", 0 if args.small else 30):
            result.update(adam_restore_rows(device, workdir, width, max(depth // 4, 1)))
            print(f"adam restore(map_location): {result['adam_restore_s']:.3f} s, step on cpu: "
                  f"{result['adam_step_on_cpu']}, peak GPU / new state: "
                  f"{result.get('adam_restore_peak_vs_new_state', float('nan')):.3f}", flush=True)
        if within("training loop", 0 if args.small else 150):
            without, _ = training_loop(device, width, depth, steps, 50, batch, None)
            with_ckpt, saves = training_loop(device, width, depth, steps, 50, batch, workdir / "loop")
            result.update(step_s_without=without, step_s_with=with_ckpt, saves=saves, steps=steps,
                          slowdown=with_ckpt / without - 1)
            print(f"training loop ({steps} steps, save every 50, {saves} saves): {without * 1e3:.2f} ms/step without, "
                  f"{with_ckpt * 1e3:.2f} ms/step with: {result['slowdown'] * 100:+.2f}% (target <= 3%)", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        result["seconds"] = round(time.perf_counter() - start, 1)
        out_path.write_text(json.dumps(result, indent=1))
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
