"""Optimizers and schedulers: several of them, exactly; and a wrong one is refused, not loaded."""

from __future__ import annotations

import pytest
import torch

import savegame
from savegame.errors import IncompatibleStateError


def stepped(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], steps: int = 2) -> None:
    for _ in range(steps):
        opt.zero_grad()
        sum(p.pow(2).sum() for p in params).backward()  # type: ignore[union-attr]
        opt.step()


def test_two_optimizers_and_two_schedulers_each_under_its_own_name_resume_exactly(tmp_path):
    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        body = torch.optim.SGD(model[0].parameters(), lr=0.1, momentum=0.9, nesterov=True)
        head = torch.optim.Adam(model[2].parameters(), lr=0.01, amsgrad=True)
        return {"model": model, "body": body, "head": head,
                "body_lr": torch.optim.lr_scheduler.StepLR(body, step_size=3, gamma=0.5),
                "head_lr": torch.optim.lr_scheduler.CosineAnnealingLR(head, T_max=10)}

    def train(state, steps):
        losses = []
        for _ in range(steps):
            x = torch.randn(8, 4)
            loss = state["model"](x).pow(2).mean()
            for name in ("body", "head"):
                state[name].zero_grad()
            loss.backward()
            for name in ("body", "head", "body_lr", "head_lr"):
                state[name].step()
            losses.append(loss.item())
        return losses

    a = build()
    train(a, 5)
    with savegame.Checkpointer(tmp_path, a) as ckpt:
        ckpt.save(5)
    expected = train(a, 6)
    b = build()  # fresh objects, different RNG position
    with savegame.Checkpointer(tmp_path, b) as ckpt:
        ckpt.restore()
    assert train(b, 6) == expected
    for name in ("body", "head", "body_lr", "head_lr"):
        assert str(a[name].state_dict()) == str(b[name].state_dict()), name
    types = savegame.load(tmp_path)["types"]
    assert types["body"] == "torch.optim.sgd.SGD" and types["head"] == "torch.optim.adam.Adam"


@pytest.mark.parametrize("saved,given", [
    (lambda ps: torch.optim.Adam(ps), lambda ps: torch.optim.SGD(ps, lr=0.1)),   # SGD would fail at step()
    (lambda ps: torch.optim.Adam(ps), lambda ps: torch.optim.AdamW(ps)),          # AdamW would train as Adam
], ids=["adam-into-sgd", "adam-into-adamw"])
def test_another_optimizer_class_is_refused_before_anything_loads(tmp_path, saved, given):
    model = torch.nn.Linear(4, 4)
    opt = saved(list(model.parameters()))
    stepped(opt, list(model.parameters()))
    with savegame.Checkpointer(tmp_path, {"model": model, "optimizer": opt}) as ckpt:
        ckpt.save(1)
    model2 = torch.nn.Linear(4, 4)
    before = model2.weight.detach().clone()
    opt2 = given(list(model2.parameters()))
    with savegame.Checkpointer(tmp_path, {"model": model2, "optimizer": opt2}) as ckpt:
        with pytest.raises(IncompatibleStateError, match=r"holds a torch\.optim\.adam\.Adam optimizer state, but a "
                                                         rf"torch\.optim\.\w+\.{type(opt2).__name__} was given"):
            ckpt.restore()
        assert torch.equal(model2.weight, before)  # refused before a byte reached the model
        info = ckpt.restore(strict=False)  # the model loads; the optimizer keeps its own state
    assert torch.equal(model2.weight, model.weight)
    assert info.reports["optimizer"].incompatible and not opt2.state
    stepped(opt2, list(model2.parameters()), 1)  # and it still works


def test_a_scheduler_of_another_class_is_refused(tmp_path):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    with savegame.Checkpointer(tmp_path, {"opt": opt, "sched": sched}) as ckpt:
        ckpt.save(1)
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=5)
    with savegame.Checkpointer(tmp_path, {"opt": opt2, "sched": cosine}) as ckpt, \
            pytest.raises(IncompatibleStateError, match="StepLR scheduler state, but a .*CosineAnnealingLR"):
        ckpt.restore()


def test_moments_of_a_parameter_whose_shape_changed_are_refused_or_started_fresh(tmp_path):
    old = [torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(3))]
    opt = torch.optim.Adam(old, lr=0.1)
    stepped(opt, old)
    with savegame.Checkpointer(tmp_path, {"optimizer": opt}) as ckpt:
        ckpt.save(1)
    new = [torch.nn.Parameter(torch.randn(5, 4)), torch.nn.Parameter(torch.randn(3))]
    opt2 = torch.optim.Adam(new, lr=0.1)
    with savegame.Checkpointer(tmp_path, {"optimizer": opt2}) as ckpt:
        with pytest.raises(IncompatibleStateError, match=r"state\[0\]\.exp_avg \(4, 4\) in checkpoint, "
                                                         r"parameter \(5, 4\)"):
            ckpt.restore()
        assert not opt2.state
        info = ckpt.restore(strict=False)
    assert "state[0].exp_avg (4, 4) in checkpoint, parameter (5, 4)" in info.reports["optimizer"].mismatched
    assert new[0] not in opt2.state  # starts fresh
    assert torch.equal(opt2.state[new[1]]["exp_avg"], opt.state[old[1]]["exp_avg"])  # the rest is restored
    stepped(opt2, new, 1)


def test_the_same_restore_through_a_model_whose_layer_grew(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters())
    stepped(opt, list(model.parameters()))
    with savegame.Checkpointer(tmp_path, {"model": model, "optimizer": opt}) as ckpt:
        ckpt.save(1)
    grown = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 2))
    opt2 = torch.optim.AdamW(grown.parameters())
    with savegame.Checkpointer(tmp_path, {"model": grown, "optimizer": opt2}) as ckpt:
        info = ckpt.restore(strict=False)
    report = info.reports["optimizer"]
    assert len(report.mismatched) == 2 * 3  # exp_avg and exp_avg_sq of the three parameters that grew
    last_bias = grown[1].bias
    assert list(opt2.state) == [last_bias]  # the one that kept its shape keeps its moments
    assert torch.equal(opt2.state[last_bias]["exp_avg"], opt.state[model[1].bias]["exp_avg"])
    stepped(opt2, list(grown.parameters()), 1)  # the next step works instead of failing on a shape


@pytest.mark.skipif(not hasattr(torch.optim, "Adafactor"), reason="torch.optim.Adafactor needs torch >= 2.5")
def test_factored_and_flat_optimizer_states_are_not_mistaken_for_mismatches(tmp_path):
    # Adafactor keeps (rows, 1) and (1, cols) moments; LBFGS keeps flat vectors of all parameters.
    params = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(4, 6))]
    ada = torch.optim.Adafactor(params, lr=0.01)
    lbfgs = torch.optim.LBFGS(params, lr=0.1, max_iter=2)
    stepped(ada, params)

    def closure():
        lbfgs.zero_grad()
        loss = sum(p.pow(2).sum() for p in params)
        loss.backward()
        return loss

    lbfgs.step(closure)
    with savegame.Checkpointer(tmp_path, {"ada": ada, "lbfgs": lbfgs}) as ckpt:
        ckpt.save(1)
    ada2 = torch.optim.Adafactor(params, lr=0.01)
    lbfgs2 = torch.optim.LBFGS(params, lr=0.1, max_iter=2)
    with savegame.Checkpointer(tmp_path, {"ada": ada2, "lbfgs": lbfgs2}) as ckpt:
        info = ckpt.restore()
    assert not any(info.reports.values())
    assert torch.equal(ada2.state[params[1]]["row_var"], ada.state[params[1]]["row_var"])
