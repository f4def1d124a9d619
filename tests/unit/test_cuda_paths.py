"""CUDA paths: pinned staging, restore into GPU models, meta models assigned onto the GPU.

These run on a machine with a CUDA device and skip, with the reason printed, elsewhere.
"""

from __future__ import annotations

import pytest
import torch

import savegame

pytestmark = pytest.mark.cuda


def test_staging_buffers_are_pinned_and_reused_across_saves(tmp_path):
    model = torch.nn.Linear(512, 512).cuda()
    with savegame.Checkpointer(tmp_path, {"model": model}) as ckpt:
        ckpt.save(1)
        ckpt.wait()
        buffers = list(ckpt._staging._buffers.values())  # type: ignore[union-attr]
        assert buffers and all(b.is_pinned() for b in buffers)
        addresses = [b.data_ptr() for b in buffers]
        ckpt.save(2)
        ckpt.wait()
        assert [b.data_ptr() for b in ckpt._staging._buffers.values()] == addresses  # type: ignore[union-attr]


def test_a_gpu_model_and_optimizer_restore_exactly(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64)).cuda()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(8, 64, device="cuda")).sum().backward()
    opt.step()
    with savegame.Checkpointer(tmp_path, {"model": model, "opt": opt}) as ckpt:
        ckpt.save(1)
    fresh = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64)).cuda()
    fresh_opt = torch.optim.AdamW(fresh.parameters())
    with savegame.Checkpointer(tmp_path, {"model": fresh, "opt": fresh_opt}) as ckpt:
        ckpt.restore()
    for key, value in model.state_dict().items():
        assert fresh.state_dict()[key].is_cuda and torch.equal(fresh.state_dict()[key], value), key
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_a_cpu_checkpoint_restores_into_a_gpu_model_and_back(tmp_path):
    cpu_model = torch.nn.Linear(16, 16)
    with savegame.Checkpointer(tmp_path, {"model": cpu_model}) as ckpt:
        ckpt.save(1)
    gpu_model = torch.nn.Linear(16, 16).cuda()
    with savegame.Checkpointer(tmp_path, {"model": gpu_model}) as ckpt:
        ckpt.restore()
    assert torch.equal(gpu_model.weight.cpu(), cpu_model.weight.detach())
    tree = savegame.load(tmp_path, map_location="cuda:0")
    assert tree["state"]["model"]["weight"].is_cuda


def test_a_meta_model_is_assigned_the_checkpoint_on_the_gpu(tmp_path):
    source = torch.nn.Linear(32, 32)
    with savegame.Checkpointer(tmp_path, {"model": source}) as ckpt:
        ckpt.save(1)
    with torch.device("meta"):
        target = torch.nn.Linear(32, 32)
    with savegame.Checkpointer(tmp_path, {"model": target}) as ckpt:
        ckpt.restore(map_location="cuda", assign=True)
    assert target.weight.is_cuda and torch.equal(target.weight.cpu(), source.weight.detach())
