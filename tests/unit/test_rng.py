"""RNG capture/restore: every generator continues exactly; device and view quirks are handled."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch

from savegame import rng
from savegame.errors import IncompatibleStateError


def draws() -> tuple:
    return random.random(), np.random.rand(2).tolist(), torch.rand(2).tolist()


def test_capture_restore_continues_all_generators():
    state = rng.capture()
    expected = draws()
    draws()
    rng.restore(state)
    assert draws() == expected


def test_torch_state_given_as_a_view_into_a_larger_buffer_restores_correctly():
    # Tensors read from a checkpoint are views into one file buffer; torch.set_rng_state ignores a
    # view's storage offset (it crashed the interpreter before rng cloned the state).
    state = rng.capture()
    expected = draws()
    buffer = torch.zeros(4096 + state["torch"].numel(), dtype=torch.uint8)
    buffer[4096:] = state["torch"]
    state["torch"] = buffer[4096:]
    draws()
    rng.restore(state)
    assert draws() == expected


def test_a_cuda_saved_state_restores_on_a_cpu_only_machine(caplog):
    # Stand-in for a checkpoint written on a CUDA machine: the torch state arrives as a non-CPU-typed
    # tensor (here int16-viewed, as after a careless map_location) and CUDA states are present.
    state = rng.capture()
    expected = draws()
    state["torch"] = state["torch"].view(torch.int16).view(torch.uint8)
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8)]
    draws()
    with caplog.at_level(logging.INFO, logger="savegame.rng"):
        if not torch.cuda.is_available():
            rng.restore(state)
            assert "no CUDA here" in caplog.text
            assert draws() == expected


def test_malformed_state_is_a_clear_error():
    state = rng.capture()
    state["python"] = ("nope",)
    with pytest.raises(IncompatibleStateError, match="RNG"):
        rng.restore(state)


@pytest.mark.cuda
def test_cuda_rng_round_trips_through_a_checkpoint_and_cpu(tmp_path):
    import savegame

    torch.cuda.init()
    torch.cuda.manual_seed_all(5)
    with savegame.Checkpointer(tmp_path, {"m": torch.nn.Linear(1, 1).cuda()}) as ckpt:
        ckpt.save(0)
        ckpt.wait()
        expected = torch.rand(4, device="cuda").tolist()
        torch.cuda.manual_seed_all(99)
        ckpt.restore(map_location="cuda")  # RNG tensors land on the GPU and must go back to the CPU
    assert torch.rand(4, device="cuda").tolist() == expected
