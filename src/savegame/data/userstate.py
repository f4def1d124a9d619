"""Calling the state methods of the user's objects: samplers, datasets and their iterators.

One place for the convention torchdata's ``Stateful`` uses (``state_dict()`` and
``load_state_dict()``, both callable), for taking a state the caller may keep
(a deep copy: a ``state_dict()`` that returns its object's own dict would
otherwise change under the caller), and for loading one with a failure
reported as a savegame error naming the object.
"""

from __future__ import annotations

import copy
from typing import Any

from savegame.errors import IncompatibleStateError, SavegameError

_USER_LOAD_ERRORS = (KeyError, ValueError, TypeError, IndexError, AttributeError, RuntimeError)


def is_stateful(obj: object) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def snapshot(obj: Any) -> Any:
    """A deep copy of ``obj.state_dict()``: later changes to ``obj`` do not reach it."""
    return copy.deepcopy(obj.state_dict())


def load_user(obj: Any, state: Any, name: str) -> None:
    """``obj.load_state_dict(state)``, with a failure reported as IncompatibleStateError naming ``name``."""
    try:
        obj.load_state_dict(state)
    except SavegameError:
        raise
    except _USER_LOAD_ERRORS as exc:
        raise IncompatibleStateError(
            f"savegame.DataLoader: the {name} ({type(obj).__name__}) refused the checkpoint's {name} state: {exc}. "
            f"Build the {name} as in the run that saved it"
        ) from exc
