"""Would lossless compression (zstd, optionally after byte grouping) pay for checkpoints? Measured, not built.

For fp32 and bf16 weights (a trained-like init, N(0, 0.02)), AdamW moments after 50
steps of random gradients, and an int64 token buffer: the compression ratio and single-core
compress / decompress speed of zstd levels 1 and 3, on the raw bytes and after byte
grouping (byte k of every element together, which puts the exponent bytes side by
side), against writing the raw bytes to this disk with fsync. "end to end" is
(compress + write the compressed bytes) / (write the raw bytes): below 1 pays.

    python benchmarks/bench_zstd.py            # 64 MB per kind
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
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
