"""savegame: exact, fast and safe resumable PyTorch training.

The whole public API::

    ckpt = savegame.Checkpointer("runs/exp1", state={"model": model, "optimizer": opt})
    info = ckpt.restore()                 # None in an empty run directory
    ckpt.save(step, epoch=epoch, metrics={"val_loss": v})
    tree = savegame.load(path)            # read-only nested dict, no model needed
    savegame.list_checkpoints("runs/exp1")  # every checkpoint: step, metrics, path, aliases ("best:val_loss")
    ckpt.restore("runs/pretrain@best:val_loss", only=["model"])   # another run's best weights

Data loaders that resume mid-epoch: ``savegame.DataLoader`` (drop-in for
``torch.utils.data.DataLoader``), ``savegame.ResumableSampler`` and
``savegame.MultiLoader``.
"""

from savegame import errors
from savegame._version import __version__
from savegame.checkpointer import Checkpointer, RestoreInfo
from savegame.data import DataLoader, MultiLoader, ResumableSampler
from savegame.errors import SavegameError
from savegame.load import load
from savegame.policies import EarlyStopping
from savegame.run.listing import CheckpointEntry, list_checkpoints
from savegame.stateful import Stateful

__all__ = [
    "CheckpointEntry",
    "Checkpointer",
    "DataLoader",
    "EarlyStopping",
    "MultiLoader",
    "RestoreInfo",
    "ResumableSampler",
    "SavegameError",
    "Stateful",
    "__version__",
    "errors",
    "list_checkpoints",
    "load",
]
