"""Write the golden Lightning, HF Trainer and Accelerate checkpoints with the real tools.

Each tool trains a tiny model (built from code or a config object; no model hub)
and saves a checkpoint the way a user's run would. Beside each checkpoint the
script writes what its import must give (tests/compat/expected.py): the saved
objects' states taken from the live objects at save time, the RNG states, and
the step, epoch, best values and early stopping the run really had, counted by
this script, not read back from the tool's files.

Written with (the versions the files come from; keep them in the commit message):

    torch 2.13.0+cpu, lightning 2.6.6, transformers 5.24.0, accelerate 1.16.0

in a separate environment, never savegame's own (these packages are not test
dependencies)::

    python3 -m venv /tmp/venv-tools
    /tmp/venv-tools/bin/pip install torch==2.13.0 lightning==2.6.6 transformers==5.24.0 accelerate==1.16.0 numpy
    /tmp/venv-tools/bin/python -m tests.compat.make_real_tools            # refuses to overwrite
    /tmp/venv-tools/bin/python -m tests.compat.make_real_tools --force    # only for a reviewed change

then update SHA256SUMS with ``python -m tests.compat.make_foreign --sums``.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tests.compat.expected import write_expected
from tests.compat.make_foreign import GOLDEN, REAL_TOOL_LAYOUTS

VERSIONS = {"torch": "2.13.0+cpu", "lightning": "2.6.6", "transformers": "5.24.0", "accelerate": "1.16.0"}


def _check_versions() -> None:
    from importlib.metadata import version

    found = {name: version(name) for name in VERSIONS}
    if found != VERSIONS:
        sys.exit(f"these golden files come from {VERSIONS}; this environment has {found}")


def _rng_states() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --- Lightning --------------------------------------------------------------------------

#: val_loss per epoch: best at epoch 1 (step 4), worse after, so early stopping waits 2 evaluations.
LIGHTNING_VAL = (0.5, 0.3, 0.4, 0.45)


def lightning(out: Path) -> None:
    """Trainer.fit with ModelCheckpoint(top 2 by val_loss) and EarlyStopping, then Trainer.save_checkpoint."""
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    evaluations: list[tuple[float, int]] = []
    saved: dict[str, Any] = {}

    class Module(L.LightningModule):
        def __init__(self, lr: float = 0.01, hidden: int = 4) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.model = torch.nn.Sequential(torch.nn.Linear(3, hidden), torch.nn.BatchNorm1d(hidden),
                                             torch.nn.Linear(hidden, 2))

        def training_step(self, batch: Any, _: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.mse_loss(self.model(x), y)

        def validation_step(self, batch: Any, _: int) -> None:
            self.log("val_loss", torch.tensor(LIGHTNING_VAL[self.current_epoch]))

        def on_validation_epoch_end(self) -> None:
            if not self.trainer.sanity_checking:
                logged = torch.tensor(LIGHTNING_VAL[self.current_epoch]).item()  # Lightning keeps float32
                evaluations.append((logged, self.global_step))

        def configure_optimizers(self) -> Any:
            opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)}

        def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
            saved.update(model=copy.deepcopy(self.state_dict()),
                         optimizer=copy.deepcopy(self.trainer.optimizers[0].state_dict()),
                         scheduler=copy.deepcopy(self.trainer.lr_scheduler_configs[0].scheduler.state_dict()),
                         step=self.trainer.global_step, epoch=self.trainer.current_epoch)

    _seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 3), torch.randn(8, 2))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    es = EarlyStopping(monitor="val_loss", mode="min", patience=3)
    trainer = L.Trainer(max_epochs=len(LIGHTNING_VAL), accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(out),
                        callbacks=[ModelCheckpoint(dirpath=str(out / "ck"), monitor="val_loss", save_top_k=2), es])
    trainer.fit(Module(), loader, loader)
    name = "last.ckpt"
    trainer.save_checkpoint(out / name)
    shutil.rmtree(out / "ck")

    best_value, best_step = min(evaluations)
    ranked = sorted(evaluations)[:2]
    after_best = [s for _, s in evaluations if s > best_step]
    write_expected(out, {
        "layout": "lightning", "source": name, "step": saved["step"], "epoch": saved["epoch"],
        "state": {"model": saved["model"], "optimizer": saved["optimizer"], "scheduler": saved["scheduler"]},
        "rng": None, "best": {"val_loss": {"mode": "min", "entries": [[v, s] for v, s in ranked]}},
        "early_stopping": {"metric": "val_loss", "mode": "min", "best": best_value, "best_step": best_step,
                           "bad_epochs": len(after_best)},
        "history_steps": [], "hyper_parameters": {"lr": 0.01, "hidden": 4}})


# --- Hugging Face Trainer ---------------------------------------------------------------

def hf_trainer(out: Path) -> None:
    """Trainer.train of a tiny BERT classifier: evaluation and a checkpoint every 2 steps, early stopping."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        EarlyStoppingCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    evaluations: list[tuple[float, int]] = []
    saved: dict[str, Any] = {}

    class Capture(TrainerCallback):
        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
            evaluations.append((metrics["eval_loss"], state.global_step))

        def on_save(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                    lr_scheduler: Any = None, **kwargs: Any) -> None:
            saved.update(model=copy.deepcopy(model.state_dict()), optimizer=copy.deepcopy(optimizer.state_dict()),
                         scheduler=copy.deepcopy(lr_scheduler.state_dict()), rng=_rng_states(),
                         step=state.global_step, epoch=int(state.epoch),
                         patience_counter=stopper.early_stopping_patience_counter)

    class Data(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
        def __init__(self, n: int) -> None:
            g = torch.Generator().manual_seed(n)
            self.ids, self.labels = torch.randint(0, 16, (n, 4), generator=g), torch.randint(0, 2, (n,), generator=g)

        def __len__(self) -> int:
            return len(self.labels)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": self.ids[i], "labels": self.labels[i]}

    _seed(0)
    config = BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=8, max_position_embeddings=8, num_labels=2)
    model = BertForSequenceClassification(config)
    stopper = EarlyStoppingCallback(early_stopping_patience=3)
    args = TrainingArguments(output_dir=str(out / "run"), max_steps=6, per_device_train_batch_size=4,
                             per_device_eval_batch_size=4, eval_strategy="steps", eval_steps=2, save_steps=2,
                             logging_steps=2, learning_rate=5e-2, load_best_model_at_end=True,
                             metric_for_best_model="eval_loss", report_to="none", use_cpu=True, seed=0,
                             disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=Data(8), eval_dataset=Data(4),
            callbacks=[stopper, Capture()]).train()
    last = f"checkpoint-{saved['step']}"
    shutil.move(out / "run" / last, out / last)
    shutil.rmtree(out / "run")

    best_value, best_step = min(evaluations)
    write_expected(out, {
        "layout": "hf-trainer", "source": last, "step": saved["step"], "epoch": saved["epoch"],
        "state": {"model": saved["model"], "optimizer": saved["optimizer"], "scheduler": saved["scheduler"]},
        "rng": saved["rng"], "best": {"eval_loss": {"mode": "min", "entries": [[best_value, best_step]]}},
        "early_stopping": {"metric": "eval_loss", "mode": "min", "best": best_value, "best_step": best_step,
                           "bad_epochs": saved["patience_counter"]},
        "history_steps": sorted({s for _, s in evaluations})})


# --- Accelerate -------------------------------------------------------------------------

def accelerate(out: Path) -> None:
    """A loop under Accelerator.accumulate, 4 batches per epoch, save_state mid-epoch after 6 optimizer steps."""
    from accelerate import Accelerator

    _seed(0)
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.5)
    data = torch.utils.data.TensorDataset(torch.randn(16, 3), torch.randn(16, 2))
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    steps = 0
    for _ in range(2):
        for x, y in loader:
            with accelerator.accumulate(model):
                accelerator.backward(torch.nn.functional.mse_loss(model(x), y))
                opt.step()
                sched.step()
                opt.zero_grad()
            steps += 1
            if steps == 6:
                break
        if steps == 6:
            break
    ckpt = out / "checkpoint_0"
    rng = _rng_states()
    saved = {"model": copy.deepcopy(accelerator.unwrap_model(model).state_dict()),
             "optimizer": copy.deepcopy(opt.optimizer.state_dict()),
             "scheduler": copy.deepcopy(sched.scheduler.state_dict())}
    accelerator.save_state(str(ckpt))
    write_expected(out, {
        "layout": "accelerate", "source": ckpt.name, "step": steps, "epoch": None, "state": saved, "rng": rng,
        "best": {}, "early_stopping": None, "history_steps": [], "accumulation_counter": accelerator.step})


BUILDERS = {"lightning": lightning, "hf-trainer": hf_trainer, "accelerate": accelerate}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="replace existing golden files (review the diff!)")
    parser.add_argument("names", nargs="*", default=list(REAL_TOOL_LAYOUTS))
    args = parser.parse_args(argv)
    _check_versions()
    for name in args.names:
        out = GOLDEN / name
        if out.exists():
            if not args.force:
                print(f"{out} exists: golden files are never regenerated silently (--force to replace them)")
                return 1
            shutil.rmtree(out)
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp) / name
            work.mkdir()
            cwd = os.getcwd()
            os.chdir(work)  # some tools write next to the working directory
            try:
                BUILDERS[name](work)
            finally:
                os.chdir(cwd)
            shutil.copytree(work, out)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
