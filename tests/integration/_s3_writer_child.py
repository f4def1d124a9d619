"""Child of test_s3_kills: saves a small checkpoint, then a large one that the parent kills mid-upload."""

from __future__ import annotations

import sys

import torch

import savegame

url, lease = sys.argv[1], float(sys.argv[2])
model = torch.nn.Module()
model.register_buffer("big", torch.full((48 << 18,), 1.0))  # 48 MB: several parts and files
with savegame.Checkpointer(url, state={"blob": model}, shard_bytes=20 << 20,
                           storage_options={"lease_seconds": lease}) as ckpt:
    ckpt.save(1)
    ckpt.wait()
    print("saved 1", flush=True)
    model.big.add_(1.0)
    ckpt.save(2)
    print("saving 2", flush=True)
    ckpt.wait()
    print("saved 2", flush=True)
