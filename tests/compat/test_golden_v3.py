"""The distributed format (v3) golden checkpoint still loads, with exactly its content, in one process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

import savegame
from savegame.engine import reader
from savegame.storage import LocalStorage
from tests.compat.golden_v3 import flatten

V3 = Path(__file__).with_name("data") / "v3"
CKPT = V3 / "step-0000000007"


def test_golden_v3_loads_exactly_with_every_ranks_own_states():
    tree = savegame.load(CKPT)
    assert tree["step"] == 7 and tree["epoch"] == 1 and tree["metrics"] == {"loss": 0.25}
    assert tree["extra"] == {"golden": True}
    tensors, values = flatten({"state": tree["state"], "ranks": tree["ranks"]})
    expected = load_file(str(V3 / "expected.safetensors"))
    assert sorted(tensors) == sorted(expected)
    for key, value in expected.items():
        assert tensors[key].dtype == value.dtype and torch.equal(tensors[key], value), key
    assert values == json.loads((V3 / "expected.json").read_text())
    assert tree["ranks"][0]["state"]["sampler"]["position"] != tree["ranks"][1]["state"]["sampler"]["position"]


def test_golden_v3_verifies_and_a_flipped_byte_in_either_rank_file_is_caught(tmp_path):
    for rank in (0, 1):
        copy = tmp_path / f"r{rank}"
        shutil.copytree(V3, copy)
        storage = LocalStorage(copy)
        assert reader.verify_checkpoint(storage, "step-0000000007") == []
        data = copy / "step-0000000007" / f"tensors-0000{rank}.safetensors"
        raw = bytearray(data.read_bytes())
        raw[-1] ^= 0xFF
        data.write_bytes(bytes(raw))
        problems = reader.verify_checkpoint(storage, "step-0000000007")
        assert problems and f"tensors-0000{rank}" in problems[0]


def test_golden_v3_restores_into_a_plain_model_in_one_process(tmp_path):
    shutil.copytree(V3, tmp_path / "run")
    (tmp_path / "run" / "expected.json").unlink()
    (tmp_path / "run" / "expected.safetensors").unlink()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(net.parameters(), lr=0.01)
    sampler = savegame.ResumableSampler(10, seed=5, rank=0, world_size=2)
    with savegame.Checkpointer(tmp_path / "run", {"model": net, "optimizer": opt, "sampler": sampler}) as ckpt:
        info = ckpt.restore()
    assert info is not None and info.step == 7
    expected = load_file(str(V3 / "expected.safetensors"))
    for key, value in net.state_dict().items():
        assert torch.equal(value, expected[f"/state/model/{key}"]), key
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], expected["/state/optimizer/state/0/exp_avg"])
    assert sampler.state_dict()["position"] == 2  # rank 0's own position
