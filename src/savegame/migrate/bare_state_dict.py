"""A bare model state dict: ``torch.save(model.state_dict(), path)`` (or a .safetensors file),
or a whole model, ``torch.save(model, path)``, loaded with ``trust=True``: its ``state_dict()``.

Keys lose ``_orig_mod.`` segments (torch.compile) and a ``module.`` prefix that
all of them share (DataParallel / DDP). There is no step, RNG or optimizer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from savegame.migrate.builder import Draft

LAYOUT = "state-dict"
COUNTS_EPOCHS = False


def matches(checkpoint: Mapping[Any, Any]) -> bool:
    return bool(checkpoint) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                    for k, v in checkpoint.items())


def convert(checkpoint: Mapping[str, Any]) -> Draft:
    draft = Draft()
    draft.model("(the whole file)", checkpoint)
    return draft


def convert_module(module: torch.nn.Module) -> Draft:
    """A whole module (``torch.save(model)``), which only ``trust=True`` loads: its state dict is the import."""
    draft = Draft()
    draft.model(f"(the whole file: a {type(module).__name__}).state_dict()", module.state_dict())
    return draft
