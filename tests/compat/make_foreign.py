"""Build every foreign checkpoint layout savegame migrates, the way the tool that writes it does.

Each builder trains small real objects, seeds the global generators, writes the
layout to a directory and returns a :class:`Built`: what `savegame migrate` must
carry over (the saved objects, the RNG draws that must follow a restore, step,
epoch, best values, early stopping) and fresh objects to restore into.

Used by the round-trip tests (tests/integration/test_migrate_roundtrip.py) and,
run as a script, to write the golden files of tests/compat/data/foreign/ once, for
the layouts no installable tool writes (the Lightning, HF Trainer and Accelerate
golden files come from the real tools: make_real_tools.py). Beside each it writes
what the import must give (expected.py), from the objects it saved:

    python -m tests.compat.make_foreign            # refuses to overwrite existing files
    python -m tests.compat.make_foreign --force    # only after a reviewed, intended change
    python -m tests.compat.make_foreign --sums     # only rewrite SHA256SUMS (after make_real_tools.py)

Golden files are never regenerated silently: tests/compat/test_foreign_golden.py
fails when this generator's output no longer has their shape, and when a file no
longer matches SHA256SUMS.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
import pickle
import random
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from tests.compat.expected import write_expected

GOLDEN = Path(__file__).with_name("data") / "foreign"
SUMS = "SHA256SUMS"


# --- what a build promises -------------------------------------------------------------

@dataclass
class Built:
    layout: str
    source: Path                   # the file or directory to migrate
    objects: dict[str, Any]        # the saved objects, by savegame state name
    fresh: Callable[[], dict[str, Any]]  # new objects of the same kinds, to restore into
    step: int
    epoch: int | None
    draws: tuple[Any, ...] | None  # what the global generators draw right after a restore
    best: dict[str, Any] = field(default_factory=dict)
    early_stopping: dict[str, Any] | None = None  # expected fields of the imported early stopping
    flags: tuple[str, ...] = ()    # what `savegame migrate` needs (e.g. --drop-unsafe)
    history_steps: list[int] = field(default_factory=list)  # steps of the foreign history lines
    rng_kinds: tuple[str, ...] = ("python", "numpy", "torch")
    rng_states: dict[str, Any] | None = None  # the generators' states the file saved, by kind

    def expected(self, root: Path) -> dict[str, Any]:
        """What the import of ``source`` (under ``root``) must give, for expected.py."""
        rng = None if self.rng_states is None else {k: self.rng_states[k] for k in self.rng_kinds}
        return {"layout": self.layout, "source": self.source.relative_to(root).as_posix(), "step": self.step,
                "epoch": self.epoch, "state": {name: obj.state_dict() for name, obj in self.objects.items()},
                "rng": rng, "best": self.best, "early_stopping": self.early_stopping,
                "history_steps": self.history_steps}

    def assert_restored(self, objects: dict[str, Any]) -> None:
        """``objects`` (restored from the import) hold exactly the saved objects' state."""
        assert objects.keys() == self.objects.keys()
        for name, obj in self.objects.items():
            assert_same(obj.state_dict(), objects[name].state_dict(), name)

    def assert_draws(self) -> None:
        """The global generators continue exactly as they would have after the save."""
        if self.draws is None:
            return
        got = draw()
        for kind, a, b in zip(("python", "numpy", "torch"), got, self.draws):
            if kind in self.rng_kinds:
                assert a == b, f"{kind} RNG draws differ after restore: {a} != {b}"


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Exact equality of two states: tensors bit for bit, containers element by element."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), (where, list(a), list(b) if isinstance(b, dict) else b)
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), (where, a, b)
    else:
        assert type(a) is type(b) and a == b, (where, a, b)


# --- small real training state ----------------------------------------------------------

class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)
        self.bn = torch.nn.BatchNorm1d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


class TiedLM(torch.nn.Module):
    """An embedding and an output head that share one weight (tie_word_embeddings)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(5, 3)
        self.head = torch.nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


class LitModule(torch.nn.Module):
    """What a LightningModule with ``self.model = Tiny()`` holds."""

    def __init__(self) -> None:
        super().__init__()
        self.model = Tiny()


def trio(model: torch.nn.Module, seed: int) -> dict[str, Any]:
    """model, optimizer, scheduler, scaler for ``model`` (its weights drawn from ``seed``)."""
    torch.manual_seed(seed)
    for p in model.parameters():
        torch.nn.init.normal_(p)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    return {"model": model, "optimizer": opt, "scheduler": torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.5),
            "scaler": torch.amp.GradScaler("cpu", init_scale=256.0)}


def train(objs: dict[str, Any], steps: int = 2) -> None:
    model = objs["model"]
    inputs = torch.randint(0, 5, (4,)) if isinstance(model, TiedLM) else torch.randn(4, 3)
    for _ in range(steps):
        loss = model(inputs).pow(2).mean()
        objs["optimizer"].zero_grad()
        loss.backward()
        objs["optimizer"].step()
        objs["scheduler"].step()


def tiny(seed: int = 0, trained: bool = True) -> dict[str, Any]:
    objs = trio(Tiny(), seed)
    if trained:
        train(objs)
    return objs


class Rng:
    """Seed the global generators, keep their states, and the draws that follow those states."""

    def __init__(self, seed: int = 1234) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        random.random(), np.random.randn(), torch.rand(1)  # mid-stream, with a cached gaussian
        self.python, self.numpy, self.torch = random.getstate(), np.random.get_state(), torch.get_rng_state()
        self.draws = draw()
        self.states = {"python": self.python, "numpy": self.numpy, "torch": self.torch}
        random.seed(0), np.random.seed(0), torch.manual_seed(0)  # a restore must bring the states back


def draw() -> tuple[Any, ...]:
    return random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist()


def es(metric: str, mode: str, best: float, best_step: int, bad: int) -> dict[str, Any]:
    return {"metric": metric, "mode": mode, "best": best, "best_step": best_step, "bad_epochs": bad}


# --- the layouts ------------------------------------------------------------------------

def nested_rng(out: Path) -> Built:
    """User report 000: model/optimizer/scheduler, step and epoch, one nested rng_state dict."""
    objs, rng = tiny(), Rng()
    ckpt = {"model": objs["model"].state_dict(), "optimizer": objs["optimizer"].state_dict(),
            "scheduler": objs["scheduler"].state_dict(), "step": 323, "epoch": 0, "train_loss": 0.61,
            "val_loss": 0.5, "rng_state": {"python": rng.python, "numpy": rng.numpy, "torch": rng.torch,
                                           "torch_cuda": None}}
    torch.save(ckpt, out / "latest.pt")
    return Built("dict-nested-rng", out / "latest.pt", _pick(objs, "model", "optimizer", "scheduler"),
                 lambda: _pick(tiny(7, False), "model", "optimizer", "scheduler"), 323, 0, rng.draws,
                 rng_states=rng.states)


def flat_rng(out: Path, *, with_args: bool = False, legacy: bool = False) -> Built:
    """User report 001: model/optimizer/lr_scheduler, flat RNG keys, best tracking, early stopping."""
    objs, rng = tiny(), Rng()
    ckpt: dict[str, Any] = {
        "model": objs["model"].state_dict(), "optimizer": objs["optimizer"].state_dict(),
        "lr_scheduler": objs["scheduler"].state_dict(), "epoch": 9, "train_stats": {"loss": 0.4},
        "val_stats": {"loss": 0.3, "pck": 0.7}, "best_val_loss": 0.25, "best_pck": 0.8,
        "epochs_without_improvement": 3, "rng_state": rng.torch, "np_rng_state": rng.numpy,
        "py_rng_state": rng.python}
    if with_args:
        ckpt["args"] = argparse.Namespace(epochs=300, batch_size=2, output_dir="./outputs/cape_run1")
    name = "checkpoint_e009_legacy.pth" if legacy else "checkpoint_e009.pth"
    torch.save(ckpt, out / name, _use_new_zipfile_serialization=not legacy)
    return Built("dict-flat-rng", out / name, _pick(objs, "model", "optimizer", "scheduler"),
                 lambda: _pick(tiny(7, False), "model", "optimizer", "scheduler"), 9, 9, rng.draws,
                 best={"val_loss": {"mode": "min", "entries": [[0.25, 9]]},
                       "pck": {"mode": "max", "entries": [[0.8, 9]]}},
                 early_stopping=es("pck", "max", 0.8, 9, 3), flags=("--drop-unsafe",) if with_args else (),
                 rng_states=rng.states)


def state_dicts(out: Path) -> Built:
    """User reports 002/003: *_state_dict keys, a torch.compile-d model (``_orig_mod.`` keys)."""
    objs, rng = tiny(), Rng()
    compiled = {f"_orig_mod.{k}": v for k, v in objs["model"].state_dict().items()}  # torch.compile's keys
    ckpt = {"epoch": 5, "model_state_dict": compiled, "optimizer_state_dict": objs["optimizer"].state_dict(),
            "scheduler_state_dict": objs["scheduler"].state_dict(), "loss": 0.123, "rng_state": rng.torch,
            "cuda_rng_state": None}
    torch.save(ckpt, out / "pretrain.pth")
    return Built("dict-state-dicts", out / "pretrain.pth", _pick(objs, "model", "optimizer", "scheduler"),
                 lambda: _pick(tiny(7, False), "model", "optimizer", "scheduler"), 5, 5, rng.draws,
                 rng_kinds=("torch",), rng_states=rng.states)


class ResumeState:
    """Stands for model_training_framework's own resume-state class (a refused global)."""

    def __init__(self) -> None:
        self.phase, self.batch_idx = "TRAIN_RUNNING", 17


def two_optimizers(seed: int, trained: bool = True) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = Tiny()
    opt1 = torch.optim.AdamW(model.fc.parameters(), lr=0.01)
    opt2 = torch.optim.SGD(model.bn.parameters(), lr=0.1, momentum=0.9)
    objs = {"model": model, "optimizer": opt1, "optimizer_1": opt2,
            "scheduler": torch.optim.lr_scheduler.StepLR(opt1, 2, gamma=0.5),
            "scheduler_1": torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=10),
            "scaler": torch.amp.GradScaler("cpu", init_scale=512.0)}
    for _ in range(2 if trained else 0):
        loss = model(torch.randn(4, 3)).pow(2).mean()
        opt1.zero_grad(), opt2.zero_grad()
        loss.backward()
        for name in ("optimizer", "optimizer_1", "scheduler", "scheduler_1"):
            objs[name].step()
    return objs


def format_v1(out: Path) -> Built:
    """User report 004: checkpoint format v1 (lists of optimizers and schedulers, a framework object)."""
    objs, rng = two_optimizers(0), Rng()
    ckpt = {
        "format_version": 1, "is_multi_dataloader_only": True, "save_timestamp": 1730000000.5, "epoch": 2,
        "global_step": 1234, "model_state_dict": objs["model"].state_dict(),
        "optimizer_state_dicts": [objs["optimizer"].state_dict(), objs["optimizer_1"].state_dict()],
        "scheduler_state_dicts": [objs["scheduler"].state_dict(), objs["scheduler_1"].state_dict()],
        "amp_scaler_state": objs["scaler"].state_dict(),
        "rng_states": {"python_random": rng.python, "numpy_random": rng.numpy, "torch_cpu": rng.torch,
                       "torch_cuda": None},
        "dataloader_manager_state": {"choice_rng": np.random.RandomState(3).get_state(),
                                     "train_iterator_state": None, "val_iterator_state": None},
        "choice_rng_state": np.random.RandomState(4).get_state(), "resume_state": ResumeState(),
        "metrics_history": {"train_loss": [0.9, 0.7, 0.6], "val_loss": [0.8, 0.65, 0.62]},
        "config_snapshot": {"optimizer": {"lr": 0.01}},
    }
    torch.save(ckpt, out / "checkpoint.pt")
    return Built("mtf-format-v1", out / "checkpoint.pt", objs, lambda: two_optimizers(5, False), 1234, 2,
                 rng.draws, flags=("--drop-unsafe",), history_steps=[411, 823, 1234], rng_states=rng.states)


def bare_state_dict(out: Path, *, safetensors: bool = False) -> Built:
    """``torch.save(model.state_dict())`` of a DataParallel model, or a .safetensors file."""
    objs = tiny()
    if safetensors:
        source = out / "model.safetensors"
        save_file(objs["model"].state_dict(), str(source), metadata={"format": "pt"})
    else:
        source = out / "model.pt"
        torch.save({f"module.{k}": v for k, v in objs["model"].state_dict().items()}, source)
    return Built("state-dict", source, _pick(objs, "model"), lambda: _pick(tiny(7, False), "model"), 0, None, None)


MC_KEY = ("ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min', 'every_n_train_steps': 0, "
          "'every_n_epochs': 1, 'train_time_interval': None}")
ES_KEY = "EarlyStopping{'monitor': 'val_loss', 'mode': 'min'}"


def lit_objects(seed: int, trained: bool = True) -> dict[str, Any]:
    objs = trio(LitModule(), seed)
    if trained:
        for _ in range(2):
            loss = objs["model"].model(torch.randn(4, 3)).pow(2).mean()
            objs["optimizer"].zero_grad()
            loss.backward()
            objs["optimizer"].step()
            objs["scheduler"].step()
    return objs


def lightning(out: Path) -> Built:
    """PyTorch Lightning Trainer.save_checkpoint: a .ckpt with callbacks and loops."""
    objs = lit_objects(0)
    ckpt = {
        "epoch": 3, "global_step": 400, "pytorch-lightning_version": "2.4.0", "state_dict": objs["model"].state_dict(),
        "loops": {"fit_loop": {"epoch_loop.state_dict": {"_batches_that_stepped": 400}}},
        "callbacks": {  # in Lightning's order: it moves checkpoint callbacks last
            ES_KEY: {"wait_count": 1, "stopped_epoch": 0, "best_score": torch.tensor(0.25), "patience": 3},
            MC_KEY: {"monitor": "val_loss", "best_model_score": torch.tensor(0.25), "current_score": torch.tensor(0.3),
                     "best_model_path": "/ck/epoch=2-step=300.ckpt", "dirpath": "/ck",
                     "best_k_models": {"/ck/epoch=2-step=300.ckpt": torch.tensor(0.25)}},
        },
        "optimizer_states": [objs["optimizer"].state_dict()], "lr_schedulers": [objs["scheduler"].state_dict()],
        "MixedPrecision": objs["scaler"].state_dict(), "hparams_name": "kwargs", "hyper_parameters": {"lr": 0.01},
    }
    torch.save(ckpt, out / "epoch=3-step=400.ckpt")
    return Built("lightning", out / "epoch=3-step=400.ckpt", objs, lambda: lit_objects(7, False), 400, 3, None,
                 best={"val_loss": {"mode": "min", "entries": [[torch.tensor(0.25).item(), 300]]}},
                 early_stopping=es("val_loss", "min", torch.tensor(0.25).item(), 300, 1))


TRAINER_STATE = {
    "best_global_step": 400, "best_metric": 0.31, "best_model_checkpoint": "out/checkpoint-400", "epoch": 1.5,
    "global_step": 500, "log_history": [
        {"epoch": 0.6, "learning_rate": 4e-05, "loss": 0.9, "step": 200},
        {"epoch": 0.6, "eval_loss": 0.4, "step": 200},
        {"epoch": 1.2, "eval_loss": 0.31, "step": 400},
        {"epoch": 1.5, "learning_rate": 2.5e-05, "loss": 0.5, "step": 500}],
    "max_steps": 1000, "stateful_callbacks": {
        "EarlyStoppingCallback": {"args": {"early_stopping_patience": 3},
                                  "attributes": {"early_stopping_patience_counter": 1}}},
    "train_batch_size": 8,
}


class TrainingArguments:
    """Stands for transformers.TrainingArguments in training_args.bin (never read)."""


def hf_trainer(out: Path, *, tied: bool = False) -> Built:
    """A Hugging Face Trainer checkpoint-500/ directory (save_pretrained writes the weights)."""
    if tied:
        objs = trio(TiedLM(), 0)
        train(objs)
    else:
        objs = tiny()
    rng = Rng()
    ckpt = out / "checkpoint-500"
    ckpt.mkdir()
    weights = objs["model"].state_dict()
    if tied:  # save_pretrained keeps one name of a tied weight: safetensors cannot store it twice
        weights = {k: v for k, v in weights.items() if k != "head.weight"}
    save_file({k: v.contiguous() for k, v in weights.items()}, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    (ckpt / "config.json").write_text(json.dumps({"model_type": "tiny", "tie_word_embeddings": tied}))
    torch.save(objs["optimizer"].state_dict(), ckpt / "optimizer.pt")
    torch.save(objs["scheduler"].state_dict(), ckpt / "scheduler.pt")
    torch.save(objs["scaler"].state_dict(), ckpt / "scaler.pt")
    torch.save({"python": rng.python, "numpy": rng.numpy, "cpu": rng.torch}, ckpt / "rng_state.pth")
    (ckpt / "trainer_state.json").write_text(json.dumps(TRAINER_STATE, indent=2))
    torch.save(TrainingArguments(), ckpt / "training_args.bin")
    fresh = (lambda: trio(TiedLM(), 7)) if tied else (lambda: tiny(7, False))
    return Built("hf-trainer", ckpt, objs, fresh, 500, 1, rng.draws,
                 best={"eval_loss": {"mode": "min", "entries": [[0.31, 400]]}},
                 early_stopping=es("eval_loss", "min", 0.31, 400, 1), history_steps=[200, 400, 500],
                 rng_states=rng.states)


def accelerate(out: Path, *, pickled_rng: bool = False) -> Built:
    """A Hugging Face Accelerate save_state directory."""
    objs, rng = tiny(), Rng()
    ckpt = out / "checkpoint_3"
    ckpt.mkdir()
    save_file(objs["model"].state_dict(), str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    torch.save(objs["optimizer"].state_dict(), ckpt / "optimizer.bin")
    torch.save(objs["scheduler"].state_dict(), ckpt / "scheduler.bin")
    torch.save(objs["scaler"].state_dict(), ckpt / "scaler.pt")
    torch.save({"epoch": 0, "iteration": 0}, ckpt / "sampler.bin")
    states = {"step": 42, "random_state": rng.python, "numpy_random_seed": rng.numpy,
              "torch_manual_seed": rng.torch, "torch_cuda_manual_seed": []}
    if pickled_rng:
        (ckpt / "random_states_0.pkl").write_bytes(pickle.dumps(states, protocol=2))
    else:
        torch.save(states, ckpt / "random_states_0.pkl")
    # step 2: the optimizer's step count (the RNG file's "step" is the gradient-accumulation counter)
    return Built("accelerate", ckpt, objs, lambda: tiny(7, False), 2, None, rng.draws, rng_states=rng.states)


def _pick(objs: dict[str, Any], *names: str) -> dict[str, Any]:
    return {name: objs[name] for name in names}


#: Every layout and variant, by the name of its directory under data/foreign/.
BUILDERS: dict[str, Callable[[Path], Built]] = {
    "000-nested-rng": nested_rng,
    "001-flat-rng": flat_rng,
    "001-flat-rng-args": lambda out: flat_rng(out, with_args=True),
    "001-flat-rng-legacy": lambda out: flat_rng(out, legacy=True),
    "003-state-dicts-compiled": state_dicts,
    "004-format-v1": format_v1,
    "state-dict-ddp": bare_state_dict,
    "state-dict-safetensors": lambda out: bare_state_dict(out, safetensors=True),
    "lightning": lightning,
    "hf-trainer": hf_trainer,
    "hf-trainer-tied": lambda out: hf_trainer(out, tied=True),
    "accelerate": accelerate,
    "accelerate-pickled-rng": lambda out: accelerate(out, pickled_rng=True),
}


#: The layouts this script keeps as golden files: one per layout and file format no installable tool writes
#: (RNG states make each 10-30 KB). Lightning, HF Trainer and Accelerate: see REAL_TOOL_LAYOUTS.
GOLDEN_LAYOUTS = ("000-nested-rng", "001-flat-rng-args", "001-flat-rng-legacy", "003-state-dicts-compiled",
                  "004-format-v1", "state-dict-ddp", "state-dict-safetensors")
#: The golden files make_real_tools.py writes with the tools themselves.
REAL_TOOL_LAYOUTS = ("lightning", "hf-trainer", "accelerate")


def build(name: str, root: Path) -> Built:
    """Build layout ``name`` into ``root/name`` (created)."""
    out = root / name
    out.mkdir(parents=True)
    return BUILDERS[name](out)


def sha256sums(root: Path) -> str:
    lines = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != SUMS):
        lines.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.relative_to(root).as_posix()}")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="replace existing golden files (review the diff!)")
    parser.add_argument("--sums", action="store_true", help=f"only rewrite {SUMS} (after make_real_tools.py)")
    args = parser.parse_args(argv)
    GOLDEN.mkdir(parents=True, exist_ok=True)
    if not args.sums:
        existing = [GOLDEN / name for name in GOLDEN_LAYOUTS if (GOLDEN / name).exists()]
        if existing and not args.force:
            print(f"{existing[0]} exists: golden files are never regenerated silently (--force to replace them)")
            return 1
        for path in existing:
            shutil.rmtree(path)
        # Build through the package module, not __main__: pickled classes must be named as the tests import them.
        make_foreign = importlib.import_module("tests.compat.make_foreign")
        for name in make_foreign.GOLDEN_LAYOUTS:
            built = make_foreign.build(name, GOLDEN)
            write_expected(GOLDEN / name, built.expected(GOLDEN / name))
        print(f"wrote {len(GOLDEN_LAYOUTS)} foreign layouts to {GOLDEN}")
    (GOLDEN / SUMS).write_text(sha256sums(GOLDEN))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
