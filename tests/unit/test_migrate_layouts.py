"""Every foreign layout of docs/migrate.md: built the way its tool builds it, imported, restored exactly.

Each test trains real objects a few steps, saves them in the foreign layout,
imports the file, loads ``tree["state"]`` into fresh objects and checks exact
equality; RNG states must reproduce the draws the saved generators would make.
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import random
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from savegame import EarlyStopping
from savegame.engine import rng as sg_rng
from savegame.errors import (
    CheckpointNotFoundError,
    ConfigurationError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
)
from savegame.format import codec
from savegame.migrate import ForeignCheckpoint, import_checkpoint
from savegame.policies import update_best
from tests.helpers import Net, make_state, train_steps

# importing torch.compile's machinery warns about torch.jit internals; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


# --- builders -------------------------------------------------------------------------

def trained(seed: int = 0, steps: int = 3) -> dict[str, Any]:
    state = make_state(seed)
    train_steps(state, steps)
    return state


class Rng:
    """The global generators' states at save time and the draws they lead to."""

    def __init__(self, seed: int = 1234) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        random.random(), np.random.randn(), torch.rand(1)  # leave each mid-stream, with a cached gaussian
        self.python, self.numpy, self.torch = random.getstate(), np.random.get_state(), torch.get_rng_state()
        self.draws = self._draw()
        random.seed(0), np.random.seed(0), torch.manual_seed(0)  # scramble: the import must restore

    @staticmethod
    def _draw() -> tuple[Any, ...]:
        return random.random(), np.random.randn(3).tolist(), np.random.randint(0, 2**31), torch.rand(4)

    def check(self, result: ForeignCheckpoint, kinds: tuple[str, ...] = ("python", "numpy", "torch")) -> None:
        rng = result.tree["rng"]
        assert set(kinds) <= set(rng)
        if "python" in kinds:
            assert rng["python"] == self.python and isinstance(rng["python"], tuple)
        if "numpy" in kinds:
            name, words, pos, has_gauss, gauss = rng["numpy"]
            assert name == "MT19937" and words.dtype == np.uint32 and words.shape == (624,)
            assert type(words) is np.ndarray and type(pos) is int and type(has_gauss) is int and type(gauss) is float
            assert np.array_equal(words, self.numpy[1]) and (pos, has_gauss, gauss) == tuple(self.numpy[2:])
        if "torch" in kinds:
            assert rng["torch"].dtype == torch.uint8 and rng["torch"].device.type == "cpu"
        sg_rng.restore(rng)
        draws = self._draw()
        for kind, got, want in zip(("python", "numpy", "numpy", "torch"), draws, self.draws):
            if kind in kinds:
                assert (torch.equal(got, want) if isinstance(got, torch.Tensor) else got == want), kind


def save(obj: Any, path: Path) -> Path:
    torch.save(obj, path)
    return path


def as_if_saved_on_cuda(path: Path) -> Path:
    """Re-tag every storage in a torch.save file as "cuda:0", as a file saved from a GPU is.

    Such a file does not load on a CPU-only machine without map_location (user report 000).
    """
    with zipfile.ZipFile(path) as zf:
        members = [(info.filename, zf.read(info)) for info in zf.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members:
            if name.endswith("data.pkl"):  # the location string is pickled once, then memoized
                assert data.count(b"X\x03\x00\x00\x00cpu") == 1
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            zf.writestr(name, data)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)
    return path


# --- checks ---------------------------------------------------------------------------

def load_into(objects: dict[str, Any], result: ForeignCheckpoint) -> None:
    for name, obj in objects.items():
        state = result.tree["state"][name]
        if isinstance(obj, torch.nn.Module):
            obj.load_state_dict(state, strict=True)
        else:
            obj.load_state_dict(state)


def assert_equal_objects(a: dict[str, Any], b: dict[str, Any]) -> None:
    for name, obj in a.items():
        sa, sb = obj.state_dict(), b[name].state_dict()
        if isinstance(obj, torch.nn.Module):
            assert list(sa) == list(sb)
            for key in sa:
                assert torch.equal(sa[key], sb[key]), (name, key)
        elif isinstance(obj, torch.optim.Optimizer):
            assert sa["param_groups"] == sb["param_groups"]
            assert sa["state"].keys() == sb["state"].keys()
            for i in sa["state"]:
                for key, value in sa["state"][i].items():
                    assert torch.equal(torch.as_tensor(value), torch.as_tensor(sb["state"][i][key])), (name, i, key)
        else:
            assert sa == sb, name


def restore_check(saved: dict[str, Any], result: ForeignCheckpoint, seed: int = 7) -> None:
    fresh = make_state(seed)
    subset = {k: fresh[k] for k in saved}
    load_into(subset, result)
    assert_equal_objects(saved, subset)


def storable(result: ForeignCheckpoint) -> None:
    """The tree is one savegame's codec can store exactly."""
    tensors: list[torch.Tensor] = []

    def sink(tensor: torch.Tensor, path: str) -> int:
        tensors.append(tensor)
        return len(tensors) - 1

    codec.encode(result.tree, sink)


def all_keys_reported(checkpoint: dict[str, Any], result: ForeignCheckpoint) -> None:
    reported = [line.split(" -> ")[0] for line in result.mapped] + result.left_out
    for key in checkpoint:
        assert any(r == key or r.startswith((f"{key}.", f"{key}[", f"{key} (")) for r in reported), key


# --- a. user report 000: nested rng_state ----------------------------------------------

def test_nested_rng_dict(tmp_path: Path) -> None:
    objs = trained()
    rng = Rng()
    # set_rng_state needs a plain CPU ByteTensor; a checkpoint may hold a view (here: offset 7)
    torch_state = torch.cat([torch.zeros(7, dtype=torch.uint8), rng.torch])[7:]
    cuda_states = [torch.zeros(16, dtype=torch.uint8), torch.arange(16, dtype=torch.uint8)]
    ckpt = {"step": 323, "epoch": 0, "model": objs["model"].state_dict(), "optimizer": objs["optimizer"].state_dict(),
            "scheduler": objs["scheduler"].state_dict(), "scaler": objs["scaler"].state_dict(),
            "train_loss": 0.61, "val_loss": np.float32(0.5), "best_val_loss": 0.45, "config": {"lr": 0.01},
            "rng_state": {"python": rng.python, "numpy": rng.numpy, "torch": torch_state, "torch_cuda": cuda_states}}
    result = import_checkpoint(as_if_saved_on_cuda(save(ckpt, tmp_path / "latest.pt")))
    assert result.layout == "dict-nested-rng" and result.step == 323 and result.epoch == 0
    restore_check(objs, result)
    rng.check(result)
    cuda = result.tree["rng"]["cuda"]
    assert len(cuda) == 2 and all(t.device.type == "cpu" and t.dtype == torch.uint8 for t in cuda)
    assert all(torch.equal(a, b) for a, b in zip(cuda, cuda_states))
    assert result.metrics == {"train_loss": 0.61, "val_loss": float(np.float32(0.5))}
    assert result.tree["run"]["best"] == {"val_loss": {"mode": "min", "entries": [[0.45, 323]]}}
    assert result.tree["run"]["early_stopping"] is None
    assert "model -> state.model" in result.mapped and "rng_state.torch_cuda -> rng.cuda" in result.mapped
    assert result.left_out == ["config"]
    all_keys_reported(ckpt, result)
    storable(result)


@pytest.mark.cuda
def test_nested_rng_dict_saved_from_a_real_gpu(tmp_path: Path) -> None:
    objs, rng = trained(), Rng()
    cuda_states = torch.cuda.get_rng_state_all()
    ckpt = {"step": 1, "model": {k: v.cuda() for k, v in objs["model"].state_dict().items()},
            "rng_state": {"python": rng.python, "numpy": rng.numpy, "torch": rng.torch.cuda(),
                          "torch_cuda": cuda_states}}
    result = import_checkpoint(save(ckpt, tmp_path / "latest.pt"))
    assert all(v.device.type == "cpu" for v in result.tree["state"]["model"].values())
    rng.check(result)
    cuda = result.tree["rng"]["cuda"]
    assert len(cuda) == len(cuda_states) and all(torch.equal(a, b.cpu()) for a, b in zip(cuda, cuda_states))


# --- b. user report 001: flat RNG keys, best tracking, args ----------------------------

def flat_checkpoint(objs: dict[str, Any], rng: Rng, with_args: bool) -> dict[str, Any]:
    ckpt = {"model": objs["model"].state_dict(), "optimizer": objs["optimizer"].state_dict(),
            "lr_scheduler": objs["scheduler"].state_dict(), "epoch": 9,
            "train_stats": {"loss": 0.4}, "val_stats": {"loss": 0.3, "pck": 0.7},
            "best_val_loss": 0.25, "best_pck": 0.8, "epochs_without_improvement": 3,
            "rng_state": rng.torch, "np_rng_state": rng.numpy, "py_rng_state": rng.python}
    if with_args:
        ckpt["args"] = argparse.Namespace(epochs=300, batch_size=2, output_dir="./outputs/cape_run1")
    return ckpt


def check_flat(result: ForeignCheckpoint, objs: dict[str, Any], rng: Rng) -> None:
    assert result.layout == "dict-flat-rng" and result.step == 9 and result.epoch == 9
    restore_check({k: objs[k] for k in ("model", "optimizer", "scheduler")}, result)
    rng.check(result)
    assert "cuda" not in result.tree["rng"]
    assert result.metrics == {"train_loss": 0.4, "val_loss": 0.3, "pck": 0.7}
    run = result.tree["run"]
    assert run["best"] == {"val_loss": {"mode": "min", "entries": [[0.25, 9]]},
                           "pck": {"mode": "max", "entries": [[0.8, 9]]}}
    es = run["early_stopping"]
    assert {k: es[k] for k in ("metric", "mode", "best", "best_step", "bad_epochs", "smoothed", "stopped")} == {
        "metric": "pck", "mode": "max", "best": 0.8, "best_step": 9, "bad_epochs": 3, "smoothed": None,
        "stopped": False}


def test_flat_rng_dict_without_args(tmp_path: Path) -> None:
    objs, rng = trained(), Rng()
    ckpt = flat_checkpoint(objs, rng, with_args=False)
    result = import_checkpoint(save(ckpt, tmp_path / "checkpoint_e009.pth"))
    check_flat(result, objs, rng)
    assert result.left_out == []
    all_keys_reported(ckpt, result)
    storable(result)


def test_flat_rng_dict_args_refused_unless_opted_in(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    objs, rng = trained(), Rng()
    path = save(flat_checkpoint(objs, rng, with_args=True), tmp_path / "checkpoint_e009.pth")
    with pytest.raises(UnsafeCheckpointError, match=r"argparse\.Namespace.*\['args'\].*drop_unsafe=True"):
        import_checkpoint(path)

    dropped = import_checkpoint(path, drop_unsafe=True)
    check_flat(dropped, objs, Rng())
    assert dropped.left_out[0] == "args" and "argparse.Namespace" in dropped.left_out[1]

    with caplog.at_level(logging.WARNING, logger="savegame.migrate"):
        trusted = import_checkpoint(path, trust=True)
    check_flat(trusted, objs, Rng())
    assert trusted.left_out == ["args"]
    assert any("argparse.Namespace" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_early_stopping_and_best_continue_in_savegame(tmp_path: Path) -> None:
    """The imported run state is what savegame's own EarlyStopping and best tracking continue from."""
    objs, rng = trained(), Rng()
    result = import_checkpoint(save(flat_checkpoint(objs, rng, with_args=False), tmp_path / "c.pth"))
    es = EarlyStopping("pck", mode="max", patience=5)
    es.load_state_dict(result.tree["run"]["early_stopping"])
    assert not es.update(0.75, 10) and es.update(0.79, 11)  # two more bad epochs: 3 + 2 = patience
    best, improved = update_best(result.tree["run"]["best"], {"val_loss": 0.3}, 10, {"val_loss": "min"})
    assert improved == {"val_loss": False} and best["val_loss"]["entries"] == [[0.25, 9]]


# --- c. user reports 002/003: *_state_dict keys, torch.compile / DDP prefixes ---------

@pytest.mark.parametrize("wrap", ["compile", "data_parallel"])
def test_state_dict_keys_dict(tmp_path: Path, wrap: str) -> None:
    objs, rng = trained(), Rng()
    wrapped = torch.compile(objs["model"]) if wrap == "compile" else torch.nn.DataParallel(objs["model"])
    prefix = "_orig_mod." if wrap == "compile" else "module."
    assert all(k.startswith(prefix) for k in wrapped.state_dict())
    ckpt = {"epoch": 5, "model_state_dict": wrapped.state_dict(),
            "optimizer_state_dict": objs["optimizer"].state_dict(), "scheduler_state_dict": objs["scheduler"].state_dict(), "loss": 0.123,
            "rng_state": rng.torch, "cuda_rng_state": None}
    result = import_checkpoint(save(ckpt, tmp_path / "pretrain.pth"))
    assert result.layout == "dict-state-dicts" and result.step == 5 and result.epoch == 5
    assert list(result.tree["state"]["model"]) == list(objs["model"].state_dict())
    restore_check({k: objs[k] for k in ("model", "optimizer", "scheduler")}, result)
    rng.check(result, kinds=("torch",))
    assert result.tree["rng"]["cuda"] == [] and set(result.tree["rng"]) == {"torch", "cuda"}
    assert result.metrics == {"loss": 0.123} and result.left_out == []
    assert "model_state_dict -> state.model" in result.mapped
    storable(result)


# --- d. user report 004: format v1 --------------------------------------------------------

@dataclass
class ResumeState:  # stands for model_training_framework's own class
    phase: str = "TRAIN_RUNNING"
    batch_idx: int = 17


def two_optimizer_state(seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = Net()
    opt1 = torch.optim.AdamW(model.fc1.parameters(), lr=1e-2)
    opt2 = torch.optim.SGD([*model.bn.parameters(), *model.fc2.parameters()], lr=0.1, momentum=0.9)
    return {"model": model, "optimizer": opt1, "optimizer_1": opt2,
            "scheduler": torch.optim.lr_scheduler.StepLR(opt1, step_size=2, gamma=0.5),
            "scheduler_1": torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=10),
            "scaler": torch.amp.GradScaler("cpu", init_scale=512.0)}


def train_two(objs: dict[str, Any], steps: int) -> None:
    for _ in range(steps):
        loss = objs["model"](torch.randn(16, 4)).pow(2).mean()
        for name in ("optimizer", "optimizer_1"):
            objs[name].zero_grad()
        loss.backward()
        for name in ("optimizer", "optimizer_1", "scheduler", "scheduler_1"):
            objs[name].step()


def format_v1_checkpoint(objs: dict[str, Any], rng: Rng, resume_state: Any) -> dict[str, Any]:
    return {
        "format_version": 1, "is_multi_dataloader_only": True, "save_timestamp": 1730000000.5,
        "epoch": 2, "global_step": 1234, "model_state_dict": objs["model"].state_dict(),
        "optimizer_state_dicts": [objs["optimizer"].state_dict(), objs["optimizer_1"].state_dict()],
        "scheduler_state_dicts": [objs["scheduler"].state_dict(), objs["scheduler_1"].state_dict()],
        "amp_scaler_state": objs["scaler"].state_dict(),
        "rng_states": {"python_random": rng.python, "numpy_random": rng.numpy, "torch_cpu": rng.torch,
                       "torch_cuda": None},
        "dataloader_manager_state": {"choice_rng_state": {"seed": 3},
                                     "choice_rng": np.random.RandomState(3).get_state(),
                                     "train_iterator_state": {"schedule_position": 5, "loader_states": [],
                                                              "total_batches": 5, "loader_cycles": {0: 1},
                                                              "prefetched_batches": 0},
                                     "val_iterator_state": None},
        "choice_rng_state": np.random.RandomState(4).get_state(),
        "resume_state": resume_state,
        "metrics_history": {"train_loss": [0.9, 0.7, 0.6], "val_loss": [0.8, 0.65]},
        "config_snapshot": {"optimizer": {"lr": 0.01}},
    }


def check_format_v1(result: ForeignCheckpoint, objs: dict[str, Any], rng: Rng) -> None:
    assert result.layout == "mtf-format-v1" and result.step == 1234 and result.epoch == 2
    assert set(result.tree["state"]) == {"model", "optimizer", "optimizer_1", "scheduler", "scheduler_1", "scaler"}
    fresh = two_optimizer_state(seed=5)
    load_into(fresh, result)
    assert_equal_objects(objs, fresh)
    rng.check(result)
    assert result.tree["rng"]["cuda"] == []
    assert result.metrics == {"train_loss": 0.6, "val_loss": 0.65}
    for key in ("is_multi_dataloader_only", "save_timestamp", "dataloader_manager_state", "choice_rng_state",
                "resume_state"):
        assert key in result.left_out
    assert result.extra == {"config_snapshot": {"optimizer": {"lr": 0.01}}}


def test_format_v1(tmp_path: Path) -> None:
    objs = two_optimizer_state()
    train_two(objs, 3)
    rng = Rng()
    ckpt = format_v1_checkpoint(objs, rng, resume_state={"phase": "TRAIN_RUNNING", "batch_idx": 17})
    result = import_checkpoint(save(ckpt, tmp_path / "checkpoint.pt"))
    check_format_v1(result, objs, rng)
    all_keys_reported(ckpt, result)
    storable(result)


def test_format_v1_with_framework_resume_state_object(tmp_path: Path) -> None:
    objs = two_optimizer_state()
    train_two(objs, 2)
    rng = Rng()
    path = save(format_v1_checkpoint(objs, rng, resume_state=ResumeState()), tmp_path / "checkpoint.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"ResumeState.*\['resume_state'\]"):
        import_checkpoint(path)
    result = import_checkpoint(path, drop_unsafe=True)
    check_format_v1(result, objs, rng)
    assert any("ResumeState" in line and "never loaded" in line for line in result.left_out)


# --- e. bare state dicts ------------------------------------------------------------------

@pytest.mark.parametrize("wrap", ["plain", "module", "compiled", "safetensors"])
def test_bare_state_dict(tmp_path: Path, wrap: str) -> None:
    model = trained()["model"]
    state = {"plain": model.state_dict, "safetensors": model.state_dict,
             "module": torch.nn.DataParallel(model).state_dict,
             "compiled": lambda: {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}}[wrap]()
    if wrap == "safetensors":
        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
    else:
        path = save(state, tmp_path / "model.pt")
    result = import_checkpoint(path)
    assert result.layout == "state-dict" and result.step == 0 and result.epoch is None
    assert result.tree["rng"] == {} and result.tree["run"] == {"best": {}, "early_stopping": None}
    restore_check({"model": model}, result)
    storable(result)


# --- f. PyTorch Lightning ------------------------------------------------------------------

class LitModule(torch.nn.Module):  # what a LightningModule with ``self.model = Net()`` holds
    def __init__(self) -> None:
        super().__init__()
        self.model = Net()


MC_KEY = ("ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min', 'every_n_train_steps': 0, "
          "'every_n_epochs': 1, 'train_time_interval': None}")
ES_KEY = "EarlyStopping{'monitor': 'val_loss', 'mode': 'min'}"


def test_lightning_ckpt(tmp_path: Path) -> None:
    objs = trained()
    lit = LitModule()
    lit.model.load_state_dict(objs["model"].state_dict())
    ckpt = {
        "epoch": 3, "global_step": 400, "pytorch-lightning_version": "2.4.0",
        "state_dict": lit.state_dict(),
        "loops": {"fit_loop": {"state_dict": {}, "epoch_loop.state_dict": {"_batches_that_stepped": 400}}},
        "callbacks": {
            MC_KEY: {"monitor": "val_loss", "best_model_score": torch.tensor(0.21),
                     "best_model_path": "/ck/epoch=2-step=300.ckpt", "current_score": torch.tensor(0.3),
                     "dirpath": "/ck", "best_k_models": {"/ck/epoch=1-step=200.ckpt": torch.tensor(0.25),
                                                         "/ck/epoch=2-step=300.ckpt": torch.tensor(0.21)},
                     "kth_best_model_path": "/ck/epoch=1-step=200.ckpt", "kth_value": torch.tensor(0.25),
                     "last_model_path": ""},
            ES_KEY: {"wait_count": 1, "stopped_epoch": 0, "best_score": torch.tensor(0.21), "patience": 3},
            "LearningRateMonitor": {"lrs": {"lr-AdamW": [0.01]}},
        },
        "optimizer_states": [objs["optimizer"].state_dict()],
        "lr_schedulers": [objs["scheduler"].state_dict()],
        "MixedPrecision": objs["scaler"].state_dict(),
        "hparams_name": "kwargs", "hyper_parameters": {"lr": 0.01},
    }
    result = import_checkpoint(save(ckpt, tmp_path / "epoch=3-step=400.ckpt"))
    assert result.layout == "lightning" and result.step == 400 and result.epoch == 3
    assert all(k.startswith("model.") for k in result.tree["state"]["model"])
    fresh_lit = LitModule()
    fresh_lit.load_state_dict(result.tree["state"]["model"])
    fresh = make_state(7)
    fresh["model"] = fresh_lit.model
    load_into({k: fresh[k] for k in ("optimizer", "scheduler", "scaler")}, result)
    assert_equal_objects({k: objs[k] for k in ("model", "optimizer", "scheduler", "scaler")}, fresh)
    s21, s25 = torch.tensor(0.21).item(), torch.tensor(0.25).item()
    assert result.tree["run"]["best"] == {"val_loss": {"mode": "min", "entries": [[s21, 300], [s25, 200]]}}
    es = result.tree["run"]["early_stopping"]
    assert (es["metric"], es["mode"], es["best"], es["best_step"], es["bad_epochs"], es["config"]["patience"]) == (
        "val_loss", "min", s21, 300, 1, 3)
    assert result.metrics == {"val_loss": torch.tensor(0.3).item()}
    assert result.tree["rng"] == {}
    assert result.extra == {"hyper_parameters": {"lr": 0.01}}  # plain JSON: kept as the checkpoint's extra
    for key in ("loops", "hparams_name", "callbacks['LearningRateMonitor']"):
        assert key in result.left_out
    storable(result)


# --- g. Hugging Face Trainer checkpoint directory -------------------------------------------

TRAINER_STATE = {
    "best_global_step": 400, "best_metric": 0.31, "best_model_checkpoint": "out/checkpoint-400", "epoch": 1.5,
    "eval_steps": 200, "global_step": 500, "is_hyper_param_search": False, "is_local_process_zero": True,
    "is_world_process_zero": True,
    "log_history": [
        {"epoch": 0.6, "grad_norm": 1.2, "learning_rate": 4e-05, "loss": 0.9, "step": 200},
        {"epoch": 0.6, "eval_loss": 0.4, "eval_runtime": 1.0, "step": 200},
        {"epoch": 1.2, "eval_loss": 0.31, "eval_runtime": 1.1, "step": 400},
        {"epoch": 1.5, "grad_norm": 0.8, "learning_rate": 2.5e-05, "loss": 0.5, "step": 500},
    ],
    "logging_steps": 100, "max_steps": 1000, "num_input_tokens_seen": 0, "num_train_epochs": 3, "save_steps": 500,
    "stateful_callbacks": {
        "EarlyStoppingCallback": {"args": {"early_stopping_patience": 3, "early_stopping_threshold": 0.0},
                                  "attributes": {"early_stopping_patience_counter": 1}},
        "TrainerControl": {"args": {"should_training_stop": False}, "attributes": {}},
    },
    "total_flos": 0, "train_batch_size": 8, "trial_name": None, "trial_params": None,
}


class Sentinel:
    """A pickled object that, if it were ever unpickled, would create ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> Any:
        return (exec, (f"open({self.path!r}, 'w').close()",))


def hf_trainer_dir(tmp: Path, objs: dict[str, Any], rng: Rng, *, safetensors: bool, cuda: Any) -> Path:
    out = tmp / "checkpoint-500"
    out.mkdir()
    weights = objs["model"].state_dict()
    if safetensors:
        save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(weights, out / "pytorch_model.bin")
    torch.save(objs["optimizer"].state_dict(), out / "optimizer.pt")
    torch.save(objs["scheduler"].state_dict(), out / "scheduler.pt")
    torch.save(objs["scaler"].state_dict(), out / "scaler.pt")
    rng_states = {"python": rng.python, "numpy": rng.numpy, "cpu": rng.torch}
    if cuda is not None:
        rng_states["cuda"] = cuda
    torch.save(rng_states, out / "rng_state.pth")
    (out / "trainer_state.json").write_text(json.dumps(TRAINER_STATE, indent=2))
    torch.save(Sentinel(tmp / "training_args_was_unpickled"), out / "training_args.bin")
    (out / "config.json").write_text("{}")
    return out


@pytest.mark.parametrize("safetensors,cuda", [(True, None), (False, "one"), (True, "list")])
def test_hf_trainer_directory(tmp_path: Path, safetensors: bool, cuda: str | None) -> None:
    objs, rng = trained(), Rng()
    cuda_state = {None: None, "one": rng.torch.clone(), "list": [rng.torch.clone(), rng.torch.clone()]}[cuda]
    out = hf_trainer_dir(tmp_path, objs, rng, safetensors=safetensors, cuda=cuda_state)
    result = import_checkpoint(out)
    assert not (tmp_path / "training_args_was_unpickled").exists()
    assert result.layout == "hf-trainer" and result.step == 500 and result.epoch == 1
    restore_check(objs, result)
    rng.check(result)
    assert len(result.tree["rng"].get("cuda", [])) == {None: 0, "one": 1, "list": 2}[cuda]
    assert result.tree["run"]["best"] == {"eval_loss": {"mode": "min", "entries": [[0.31, 400]]}}
    es = result.tree["run"]["early_stopping"]
    assert (es["metric"], es["mode"], es["best"], es["best_step"], es["bad_epochs"], es["config"]["patience"]) == (
        "eval_loss", "min", 0.31, 400, 1, 3)
    assert result.metrics == {"grad_norm": 0.8, "learning_rate": 2.5e-05, "loss": 0.5}
    assert "training_args.bin (a pickled TrainingArguments; never read)" in result.left_out
    assert result.extra == {"config.json": {}} and "trainer_state.json:total_flos" in result.left_out
    storable(result)


def test_hf_trainer_sharded_weights(tmp_path: Path) -> None:
    objs, rng = trained(), Rng()
    out = hf_trainer_dir(tmp_path, objs, rng, safetensors=True, cuda=None)
    (out / "model.safetensors").unlink()
    weights = objs["model"].state_dict()
    keys = list(weights)
    shards = {"model-00001-of-00002.safetensors": keys[:3], "model-00002-of-00002.safetensors": keys[3:]}
    for shard, names in shards.items():
        save_file({k: weights[k] for k in names}, str(out / shard), metadata={"format": "pt"})
    index = {"metadata": {"total_size": 0}, "weight_map": {k: s for s, names in shards.items() for k in names}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    result = import_checkpoint(out)
    restore_check({"model": objs["model"]}, result)
    assert not any(line.startswith("model-0000") for line in result.left_out)
    index["weight_map"]["extra.weight"] = "model-00001-of-00002.safetensors"
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpointError, match="extra.weight"):
        import_checkpoint(out)


def test_hf_trainer_best_metric_name_unknown(tmp_path: Path) -> None:
    objs, rng = trained(), Rng()
    out = hf_trainer_dir(tmp_path, objs, rng, safetensors=True, cuda=None)
    state = dict(TRAINER_STATE, best_metric=0.123)  # no logged eval_* value matches
    (out / "trainer_state.json").write_text(json.dumps(state))
    result = import_checkpoint(out)
    assert result.tree["run"] == {"best": {}, "early_stopping": None}
    assert any(line.startswith("trainer_state.json:best_metric") for line in result.left_out)


# --- h. Accelerate save_state directory -------------------------------------------------------

@pytest.mark.parametrize("rng_format", ["torch.save", "pickle"])
def test_accelerate_directory(tmp_path: Path, rng_format: str) -> None:
    objs, other, rng = trained(0), trained(1, steps=2), Rng()
    out = tmp_path / "checkpoint_3"
    out.mkdir()
    save_file(objs["model"].state_dict(), str(out / "model.safetensors"), metadata={"format": "pt"})
    save_file(other["model"].state_dict(), str(out / "model_1.safetensors"), metadata={"format": "pt"})
    torch.save(objs["optimizer"].state_dict(), out / "optimizer.bin")
    torch.save(other["optimizer"].state_dict(), out / "optimizer_1.bin")
    torch.save(objs["scheduler"].state_dict(), out / "scheduler.bin")
    torch.save(objs["scaler"].state_dict(), out / "scaler.pt")
    torch.save({"epoch": 0, "iteration": 0}, out / "sampler.bin")
    torch.save(Sentinel(tmp_path / "custom_was_unpickled"), out / "custom_checkpoint_0.pkl")
    states = {"step": 42, "random_state": rng.python, "numpy_random_seed": rng.numpy,
              "torch_manual_seed": rng.torch, "torch_cuda_manual_seed": []}
    if rng_format == "pickle":
        (out / "random_states_0.pkl").write_bytes(pickle.dumps(states))
    else:
        torch.save(states, out / "random_states_0.pkl")
    result = import_checkpoint(out)
    assert not (tmp_path / "custom_was_unpickled").exists()
    # the step is the optimizer's step count; the RNG file's "step" counts gradient accumulation
    assert result.layout == "accelerate" and result.step == 3 and result.epoch is None
    assert any(line.startswith("random_states_0.pkl:step (42: ") for line in result.left_out)
    assert set(result.tree["state"]) == {"model", "model_1", "optimizer", "optimizer_1", "scheduler", "scaler"}
    restore_check(objs, result)
    fresh = make_state(9)
    load_into({"model": fresh["model"], "optimizer": fresh["optimizer"]},
              ForeignCheckpoint(**{**result.__dict__, "tree": {"state": {
                  "model": result.tree["state"]["model_1"], "optimizer": result.tree["state"]["optimizer_1"]}}}))
    assert_equal_objects({"model": other["model"], "optimizer": other["optimizer"]}, fresh)
    rng.check(result)
    assert result.tree["rng"]["cuda"] == []
    assert "sampler.bin (never read)" in result.left_out
    assert "custom_checkpoint_0.pkl (never read)" in result.left_out
    storable(result)


# --- errors -------------------------------------------------------------------------------------

def test_unknown_layout_lists_keys(tmp_path: Path) -> None:
    path = save({"weights": {"a": 1}, "meta": "x"}, tmp_path / "odd.pt")
    with pytest.raises(ConfigurationError, match=r"'meta', 'weights'"):
        import_checkpoint(path)


def test_unknown_directory_lists_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ConfigurationError, match="notes.txt"):
        import_checkpoint(tmp_path)


def test_not_a_dict(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="holds a Tensor"):
        import_checkpoint(save(torch.ones(3), tmp_path / "t.pt"))


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError):
        import_checkpoint(tmp_path / "nope.pt")


def test_malformed_rng_state_names_the_key(tmp_path: Path) -> None:
    objs = trained()
    ckpt = {"model": objs["model"].state_dict(), "np_rng_state": ("MT19937", np.zeros(10, np.uint32), 0, 0, 0.0)}
    with pytest.raises(CorruptCheckpointError, match="np_rng_state"):
        import_checkpoint(save(ckpt, tmp_path / "c.pth"))


def test_numpy_state_in_dict_form(tmp_path: Path) -> None:
    rng = Rng()
    generator = np.random.RandomState()
    generator.set_state(rng.numpy)
    objs = trained()
    ckpt = {"model": objs["model"].state_dict(), "np_rng_state": generator.get_state(legacy=False),
            "py_rng_state": list(rng.python)}
    result = import_checkpoint(save(ckpt, tmp_path / "c.pth"))
    rng.check(result, kinds=("python", "numpy"))


def test_hf_trainer_state_of_unexpected_shape(tmp_path: Path) -> None:
    objs, rng = trained(), Rng()
    out = hf_trainer_dir(tmp_path, objs, rng, safetensors=True, cuda=None)
    odd = dict(TRAINER_STATE, stateful_callbacks={"EarlyStoppingCallback": {"args": 3, "attributes": []}})
    (out / "trainer_state.json").write_text(json.dumps(odd))
    result = import_checkpoint(out)
    assert result.tree["run"]["early_stopping"] is None
    (out / "trainer_state.json").write_text(json.dumps(dict(TRAINER_STATE, global_step="500")))
    with pytest.raises(CorruptCheckpointError, match="global_step"):
        import_checkpoint(out)
    (out / "trainer_state.json").write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match="JSON"):
        import_checkpoint(out)


def test_dropped_object_needed_by_a_mapped_key(tmp_path: Path) -> None:
    objs = trained()
    ckpt = {"model": objs["model"].state_dict(), "optimizer": ResumeState(), "epoch": 1}
    with pytest.raises(UnsafeCheckpointError, match="ResumeState"):
        import_checkpoint(save(ckpt, tmp_path / "c.pth"), drop_unsafe=True)


def test_trust_must_be_a_bool(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="trust"):
        import_checkpoint(tmp_path, trust="yes")  # type: ignore[arg-type]
