"""The resumable data pipeline: exact mid-epoch resume without touching the model's random streams.

* :class:`DataLoader` - a drop-in ``torch.utils.data.DataLoader`` with ``state_dict()``/``load_state_dict()``.
* :class:`ResumableSampler` - a seeded, distributed-aware sampler that resumes mid-epoch.
* :class:`MultiLoader` - several loaders mixed by weight, round robin or in sequence, resumable.

See docs/data.md for the guarantees.
"""

from savegame.data.loader import DataLoader
from savegame.data.multi import MultiLoader
from savegame.data.sampler import ResumableSampler

__all__ = ["DataLoader", "MultiLoader", "ResumableSampler"]
