"""Small shared builders for tests (a tiny model + optimizer + scheduler)."""

from __future__ import annotations

import torch


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(4, 8)
        self.bn = torch.nn.BatchNorm1d(8)
        self.drop = torch.nn.Dropout(0.5)
        self.fc2 = torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


def make_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    return {"model": model, "optimizer": opt, "scheduler": sched, "scaler": scaler}


def train_steps(state: dict, steps: int) -> list[float]:
    model, opt, sched = state["model"], state["optimizer"], state["scheduler"]
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 4)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def assert_same_state(a: dict, b: dict) -> None:
    for (ka, va), (kb, vb) in zip(a["model"].state_dict().items(), b["model"].state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    sa, sb = a["optimizer"].state_dict(), b["optimizer"].state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for i in sa["state"]:
        for key in sa["state"][i]:
            assert torch.equal(torch.as_tensor(sa["state"][i][key]), torch.as_tensor(sb["state"][i][key]))
    assert a["scheduler"].state_dict() == b["scheduler"].state_dict()
    assert a["scaler"].state_dict() == b["scaler"].state_dict()
