"""A bare model state dict: ``torch.save(model.state_dict(), path)`` (or a .safetensors file).

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
