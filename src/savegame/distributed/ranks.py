"""Which states each rank saves for itself rather than once for the whole job."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from savegame.data import DataLoader, MultiLoader, ResumableSampler
from savegame.engine.capture import PlainLoaderState
from savegame.errors import ConfigurationError

# Each rank reads its own shard of the data: its loader's position is its own.
_ALWAYS_PER_RANK = (DataLoader, MultiLoader, ResumableSampler, PlainLoaderState, torch.utils.data.DataLoader,
                    torch.utils.data.Sampler)  # torch's loaders include torchdata's StatefulDataLoader


def per_rank_names(objects: Mapping[str, Any], named: Sequence[str]) -> frozenset[str]:
    """The states saved per rank: every data loader and sampler, and those ``per_rank=`` names."""
    unknown = [k for k in named if k not in objects]
    if unknown:
        raise ConfigurationError(f"per_rank names {unknown}, which are not keys of state ({sorted(objects)})")
    auto = {k for k, obj in objects.items() if isinstance(obj, _ALWAYS_PER_RANK)}
    return frozenset(named) | auto
