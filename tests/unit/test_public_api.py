"""The public API is exactly what savegame/__init__.py promises, and every name in it resolves."""

from __future__ import annotations

import savegame
from savegame import errors


def test_every_public_name_resolves():
    for name in savegame.__all__:
        assert getattr(savegame, name) is not None, name


def test_issue_contract_names_are_public():
    for name in ("Checkpointer", "RestoreInfo", "Stateful", "load", "EarlyStopping", "DataLoader",
                 "ResumableSampler", "MultiLoader", "errors", "SavegameError", "list_checkpoints", "CheckpointEntry"):
        assert name in savegame.__all__, name


def test_error_hierarchy_is_closed_under_savegame_error():
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.SavegameError), name
