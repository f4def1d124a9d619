"""Lossless compression (zstd, optionally after byte grouping) for checkpoints: codec figures and end to end.

Part 1, the codec alone: for fp32 and bf16 weights (a trained-like init, N(0, 0.02)),
AdamW moments after 50 steps of random gradients, and an int64 token buffer: the
compression ratio and single-core compress / decompress speed of zstd levels 1 and 3, on
the raw bytes and after byte grouping (byte k of every element together, which puts the
exponent bytes side by side), against writing the raw bytes to this disk with fsync.
"end to end" is (compress + write the compressed bytes) / (write the raw bytes): below 1 pays.

Part 2, ``Checkpointer.save()`` itself: a model of fp32 (or bf16) weights with its AdamW
state, saved with ``compression=None`` and ``compression="zstd"`` in the same run: the
time until the save is durable (``save()`` + ``wait()``), the bytes on disk, and the time
of ``restore()`` (the files are in the page cache: the cost of reading is decompression).

    python benchmarks/bench_zstd.py            # 64 MB per kind, models of 64 MB of weights
    python benchmarks/bench_zstd.py --small    # 1 MB per kind (run in CI)

Needs ``zstandard`` (``pip install savegame[zstd]``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zstandard


def kinds(mb: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    n = (mb << 20) // 4
    weights = torch.randn(n) * 0.02
    p = torch.nn.Parameter(weights.clone())
    opt = torch.optim.AdamW([p], lr=1e-3)
    for _ in range(50):  # gradients of a shrinking scale, as training goes
        p.grad = torch.randn_like(p) * 1e-3
        opt.step()
    state = opt.state[p]
    return {"fp32 weights": weights, "bf16 weights": (torch.randn(2 * n) * 0.02).to(torch.bfloat16),
            "AdamW exp_avg (fp32)": state["exp_avg"], "AdamW exp_avg_sq (fp32)": state["exp_avg_sq"],
            "int64 token ids": torch.randint(0, 50_000, (n // 2,))}


def grouped(raw: np.ndarray, itemsize: int) -> bytes:
    return raw.reshape(-1, itemsize).T.copy().tobytes()


def timed(fn: Any, reps: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def disk_write(path: Path, data: bytes, reps: int) -> float:
    def write() -> None:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    seconds, _ = timed(write, reps)
    path.unlink()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    mb, reps = (1, 1) if args.small else (64, args.reps)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for kind, tensor in kinds(mb).items():
            raw_np = tensor.contiguous().view(torch.uint8).numpy()
            raw = raw_np.tobytes()
            write_s = disk_write(Path(tmp) / "raw", raw, reps)
            for group in (False, True):
                data = grouped(raw_np, tensor.element_size()) if group else raw
                for level in (1, 3):
                    c = zstandard.ZstdCompressor(level=level)
                    d = zstandard.ZstdDecompressor()
                    comp_s, packed = timed(lambda: c.compress(data), reps)
                    dec_s, _ = timed(lambda: d.decompress(packed), reps)
                    group_s = timed(lambda: grouped(raw_np, tensor.element_size()), reps)[0] if group else 0.0
                    small_write = disk_write(Path(tmp) / "z", packed, reps)
                    rows.append({"kind": kind, "grouped": group, "level": level, "ratio": len(raw) / len(packed),
                                 "compress_MBps": len(raw) / (comp_s + group_s) / 1e6,
                                 "decompress_MBps": len(raw) / dec_s / 1e6, "disk_MBps": len(raw) / write_s / 1e6,
                                 "end_to_end": (comp_s + group_s + small_write) / write_s})
    print("| data | byte grouping | level | ratio | compress MB/s | decompress MB/s | disk MB/s | end to end |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['kind']} | {'yes' if r['grouped'] else 'no'} | {r['level']} | {r['ratio']:.3f} | "
              f"{r['compress_MBps']:.0f} | {r['decompress_MBps']:.0f} | {r['disk_MBps']:.0f} | {r['end_to_end']:.2f}x |")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        saves = [end_to_end(Path(tmp), kind, dtype, mb, reps) for kind, dtype in
                 (("fp32 weights + AdamW", torch.float32), ("bf16 weights + AdamW", torch.bfloat16))]
    print()
    print("| state | MB raw | size on disk (zstd / off) | durable save (zstd / off) | restore (zstd / off) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in saves:
        print(f"| {r['kind']} | {r['raw_MB']:.0f} | {r['bytes_zstd'] / r['bytes_off']:.3f} "
              f"({r['bytes_off'] / r['bytes_zstd']:.2f}x smaller) | {r['save_s_zstd']:.2f} s / {r['save_s_off']:.2f} s = "
              f"{r['save_s_zstd'] / r['save_s_off']:.2f}x | {r['restore_s_zstd']:.2f} s / {r['restore_s_off']:.2f} s = "
              f"{r['restore_s_zstd'] / r['restore_s_off']:.2f}x |")
    if args.out:
        Path(args.out).write_text(json.dumps({"codec": rows, "checkpointer": saves}, indent=1))


def model_state(mb: int, dtype: torch.dtype) -> dict[str, Any]:
    """Weights of ``mb`` MB in 8 matrices, N(0, 0.02), and AdamW after 5 steps (moments in the weights' dtype)."""
    torch.manual_seed(0)
    side = int(((mb << 20) // dtype.itemsize // 8) ** 0.5)
    model = torch.nn.ParameterList([torch.nn.Parameter((torch.randn(side, side) * 0.02).to(dtype)) for _ in range(8)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(5):
        for p in model:
            p.grad = (torch.randn(side, side) * 1e-3).to(dtype)
        opt.step()
    return {"model": model, "optimizer": opt}


def end_to_end(tmp: Path, kind: str, dtype: torch.dtype, mb: int, reps: int) -> dict[str, Any]:
    import savegame

    state = model_state(mb, dtype)
    row: dict[str, Any] = {"kind": kind, "raw_MB": 0.0}
    for label, comp in (("off", None), ("zstd", "zstd")):
        run = tmp / f"{kind[:4]}-{label}"
        with savegame.Checkpointer(run, state, compression=comp, keep_last=1) as ckpt:
            times = []
            for step in range(reps):
                t0 = time.perf_counter()
                ckpt.save(step)
                ckpt.wait()
                times.append(time.perf_counter() - t0)
            path = Path(ckpt.path_of("latest") or "")
        row[f"save_s_{label}"] = statistics.median(times)
        row[f"bytes_{label}"] = sum(f.stat().st_size for f in path.iterdir())
        restores = []
        with savegame.Checkpointer(run, state) as ckpt:
            for _ in range(reps):
                t0 = time.perf_counter()
                ckpt.restore()
                restores.append(time.perf_counter() - t0)
        row[f"restore_s_{label}"] = statistics.median(restores)
    row["raw_MB"] = row["bytes_off"] / 1e6
    return row


if __name__ == "__main__":
    main()
