"""The content of the golden checkpoints in data/ (built by make_golden.py, checked by test_golden.py).

Values are deterministic (no RNG), so the test can rebuild what the file must hold.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def expected_state() -> dict:
    weight = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7
    return {
        "model": {"w": weight, "tied": weight, "row": weight[1], "b": torch.arange(3, dtype=torch.bfloat16),
                  "half": torch.tensor([1.5, -2.0], dtype=torch.float16), "flag": torch.tensor(True),
                  "c": torch.tensor([1 + 2j], dtype=torch.complex128)},
        "user": {"tuple": (1, "two", 3.0), "big": 2**100, "inf": math.inf, "none": None, 7: "int key",
                 "arr": np.arange(5, dtype=np.uint32), "np": np.float64(0.5), "dtype": torch.float16,
                 "bytes": b"\x00\x01", "set": {3, 1}},
    }


def expected_compressed_state() -> dict:
    """The v5 golden state: :func:`expected_state` plus tensors large enough to be stored compressed (a
    smooth fp32 ramp, byte-grouped; repeated int64 ids; a bf16 ramp) and one that is not (uniform noise)."""
    noise = np.random.default_rng(0).integers(0, 256, 8192, dtype=np.uint8)  # PCG64: the same on every version
    return {
        **expected_state(),
        "big": {"ramp": torch.arange(4096, dtype=torch.float32) / 7,
                "ids": torch.arange(2048, dtype=torch.int64) % 50,
                "half": (torch.arange(4096, dtype=torch.float32) / 1000).to(torch.bfloat16),
                "noise": torch.from_numpy(noise), "mask": (torch.arange(8192) % 3).to(torch.uint8)},
    }
