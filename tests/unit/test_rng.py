"""RNG capture/restore: every generator continues exactly; device and view quirks are handled."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch

from savegame.engine import rng
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


def test_a_checkpoint_with_cuda_rng_states_restores_on_a_cpu_only_machine(tmp_path, caplog):
    # A checkpoint written on a CUDA machine holds CUDA generator states. Built here with the real
    # CPU state plus a stand-in CUDA state (16 bytes, as torch's CUDA generators have), written
    # through the ordinary writer, then restored by a Checkpointer on this machine.
    import savegame
    from savegame.engine.offline import write_tree

    if torch.cuda.is_available():
        pytest.skip("this test stands in for a CPU-only machine; test_cuda_rng_round_trips_* covers CUDA")
    model = torch.nn.Linear(2, 2)
    state = rng.capture()
    state["cuda"] = [torch.arange(16, dtype=torch.uint8), torch.arange(16, dtype=torch.uint8)]
    write_tree(tmp_path, {"state": {"model": model.state_dict()}, "rng": state, "run": {}}, step=3)
    expected = draws()
    draws()
    with caplog.at_level(logging.INFO, logger="savegame.engine.rng"):
        with savegame.Checkpointer(tmp_path, {"model": model}) as ckpt:
            info = ckpt.restore()
    assert info is not None and info.step == 3
    assert draws() == expected
    assert "2 CUDA RNG state(s); no CUDA here" in caplog.text


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


@pytest.mark.cuda
def test_a_checkpoint_saved_on_a_gpu_restores_in_a_process_without_cuda(tmp_path):
    import subprocess
    import sys

    import savegame
    from tests.integration.procs import child_env

    model = torch.nn.Linear(3, 3).cuda()
    with savegame.Checkpointer(tmp_path, {"m": model}) as ckpt:
        ckpt.save(0)
    expected = model.weight.detach().cpu().tolist()
    code = (
        "import sys, torch, savegame\n"
        "assert not torch.cuda.is_available()\n"
        "m = torch.nn.Linear(3, 3)\n"
        "with savegame.Checkpointer(sys.argv[1], {'m': m}) as c:\n"
        "    c.restore()\n"
        "print(m.weight.tolist())\n"
    )
    env = {**child_env(), "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120,
                         env=env, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(expected)
