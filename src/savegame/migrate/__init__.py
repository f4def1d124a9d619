"""Importers of foreign checkpoint layouts, and safe reading of foreign pickles.

Loading never runs code from the file: torch files are read with
``torch.load(weights_only=True)`` plus a short allowlist, after a dry run that
bounds what they may allocate; plain pickles with a restricted unpickler. See
docs/migrate.md.
"""

from __future__ import annotations

from savegame.migrate.importer import LAYOUTS, import_checkpoint, input_bytes
from savegame.migrate.restricted_unpickler import restricted_unpickle
from savegame.migrate.result import ForeignCheckpoint
from savegame.migrate.safe_load import safe_torch_load

__all__ = ["LAYOUTS", "ForeignCheckpoint", "import_checkpoint", "input_bytes", "restricted_unpickle", "safe_torch_load"]
