"""Registered Stateful objects + RNG -> one state tree, and back."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from savegame.engine import optim_check, reader, rng
from savegame.engine.gcpause import pausing
from savegame.engine.keys import KeyReport, canonical_state, load_module, match_module
from savegame.errors import ConfigurationError, IncompatibleStateError
from savegame.format import codec
from savegame.format import names as n
from savegame.stateful import Stateful

log = logging.getLogger("savegame.engine.capture")


def check_objects(state: Mapping[str, Any]) -> dict[str, Stateful]:
    """Validate the user's ``state`` mapping at construction, naming the offending key."""
    if not isinstance(state, Mapping):
        raise ConfigurationError(f"state must be a mapping of names to objects, got {type(state).__name__}")
    out = {}
    for name, obj in state.items():
        if not isinstance(name, str) or not name or name.startswith((".", "$")):
            raise ConfigurationError(f"state key {name!r} must be a non-empty string not starting with '.' or '$'")
        if isinstance(obj, torch.utils.data.DataLoader) and not isinstance(obj, Stateful):
            obj = PlainLoaderState(obj)
        if not isinstance(obj, Stateful):
            raise ConfigurationError(
                f"state[{name!r}] ({type(obj).__name__}) has no state_dict()/load_state_dict(); "
                "wrap it in a class that provides both"
            )
        out[name] = obj
    return out


class PlainLoaderState:
    """Stands in for a plain ``torch.utils.data.DataLoader``, which has no position to save.

    Such a loader resumes at an epoch boundary. It records whether its newest
    iterator was part-way through an epoch when saved; restoring such a
    checkpoint warns that the rest of that epoch is not replayed, and how to get
    exact mid-epoch resume. Checkpoints taken between epochs restore silently.
    """

    def __init__(self, loader: torch.utils.data.DataLoader) -> None:  # type: ignore[type-arg]
        self.loader = loader
        self._latest: weakref.ref[Any] | None = None
        make = loader._get_iterator

        def tracked() -> Any:  # the loader makes every iterator through this method
            iterator = make()
            self._latest = weakref.ref(iterator)
            return iterator

        loader._get_iterator = tracked  # type: ignore[method-assign]

    def _mid_epoch(self) -> bool:
        iterator = self._latest() if self._latest is not None else None
        if iterator is None:  # persistent workers: an iterator made before this wrapper, reset every epoch
            iterator = getattr(self.loader, "_iterator", None)
        done = getattr(iterator, "_num_yielded", 0)
        if not done:
            return False
        try:
            return bool(done < len(iterator))  # type: ignore[arg-type]
        except TypeError:  # an iterable dataset without a length
            return True

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "torch.utils.data.DataLoader", "batch_size": self.loader.batch_size,
                "mid_epoch": self._mid_epoch()}

    def load_state_dict(self, state: Any) -> None:
        if isinstance(state, Mapping) and state.get("mid_epoch") is False:
            log.info("a plain torch.utils.data.DataLoader was saved between epochs; it resumes there exactly")
            return
        log.warning(
            "a plain torch.utils.data.DataLoader resumes at an epoch boundary: this checkpoint was taken "
            "mid-epoch, so the rest of that epoch is not replayed and the data order differs from an "
            "uninterrupted run. Use savegame.DataLoader (a drop-in replacement) for exact mid-epoch resume."
        )


def capture(objects: Mapping[str, Stateful], run_state: Any) -> dict[str, Any]:
    """The whole state tree: every object's state (model keys canonical), all RNGs, run bookkeeping."""
    states = {}
    for name, obj in objects.items():
        value = obj.state_dict()
        states[name] = canonical_state(value) if isinstance(obj, torch.nn.Module) else value
    return {n.TREE_STATE: states, n.TREE_RNG: rng.capture(), n.TREE_RUN: run_state,
            n.TREE_TYPES: optim_check.recorded_types(objects)}


@pausing
def targets(objects: Mapping[str, Stateful], doc: Mapping[str, Any], *, strict: bool = True,
            assign: bool = False, only: Sequence[str] | None = None) -> dict[int, torch.Tensor]:
    """Check a checkpoint against the objects before reading it; return where bytes can go directly.

    Raises IncompatibleStateError (``strict``) when state names, model keys or
    shapes, or the class or moment shapes of a torch optimizer or scheduler
    differ, so nothing is loaded from a checkpoint that will be refused.
    Returns tensor numbers of the tree mapped to the models' own parameters and
    buffers, which the reader fills in place (no second copy); with ``assign``
    there are none, since the checkpoint's tensors replace the models' own.
    Models are checked first: when the architecture changed, the error names the model's
    keys, not the optimizer moments that changed with them.
    """
    tree = doc.get(n.M_TREE)
    saved = tree.get(n.TREE_STATE) if isinstance(tree, Mapping) else None
    if not isinstance(saved, Mapping):
        raise IncompatibleStateError("the checkpoint holds no object states")
    saved = _only(saved, only)
    _check_names(objects, saved, strict)
    meta = reader.tensor_meta(doc)
    out: dict[int, torch.Tensor] = {}
    for name, obj in objects.items():
        encoded = saved.get(name)
        if not isinstance(obj, torch.nn.Module) or name not in saved:
            continue
        if not isinstance(encoded, Mapping) or any(key.startswith("$") for key in encoded):
            _refuse_module_state(name, encoded, strict)  # a list, a str, a $dict with keys not str ...
            continue
        refs = codec.tensor_refs(encoded, len(meta))
        shapes = {key: (meta[refs[key]][1] if key in refs else None) for key in encoded if not key.startswith("$")}
        own = match_module(obj, shapes, name=name, strict=strict, assign=assign)
        if not assign:
            out.update((refs[key], tensor) for key, tensor in own.items() if key in refs)
    if strict:
        assert isinstance(tree, Mapping)
        _precheck_optimizers(objects, saved, tree.get(n.TREE_TYPES), doc)
    return out


def _only(saved: Mapping[str, Any], only: Sequence[str] | None) -> Mapping[str, Any]:
    """The saved states ``restore(only=...)`` asks for; each must be in the checkpoint."""
    if only is None:
        return saved
    missing = [name for name in only if name not in saved]
    if missing:
        raise IncompatibleStateError(f"the checkpoint has no state {missing} (it has {sorted(saved)}); "
                                     "restore(only=...) names states of the checkpoint")
    return {name: saved[name] for name in only}


def _precheck_optimizers(objects: Mapping[str, Stateful], saved: Mapping[str, Any], types: Any,
                         doc: Mapping[str, Any]) -> None:
    """Refuse a wrong optimizer or scheduler (class, moment shapes) before any byte is read into a model."""
    types = types if isinstance(types, Mapping) else {}
    specs: Sequence[Any] = ()
    for name, obj in objects.items():
        if name in saved and optim_check.checked_kind(obj) is not None:
            specs = specs or reader.tensor_specs(doc)
            shaped = codec.decode(saved[name], specs)  # stand-ins with dtype and shape: no data is read
            optim_check.check(name, obj, shaped, types.get(name), strict=True)


def _refuse_module_state(name: str, value: Any, strict: bool) -> None:
    problem = module_state_problem(value)
    if strict and problem:
        raise IncompatibleStateError(f"state {name!r} is a model, but the checkpoint's {problem}; "
                                     "pass strict=False to leave it as it is")


def module_state_problem(value: Any) -> str | None:
    """Why ``value`` cannot be a model's state dict (a mapping of str keys), or None."""
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return None
    return f"state for it is a {type(value).__name__}, not a mapping of str keys"


def _check_names(objects: Mapping[str, Stateful], saved: Mapping[str, Any], strict: bool) -> None:
    absent = [k for k in objects if k not in saved]
    extra = [k for k in saved if k not in objects]
    if strict and (absent or extra):
        raise IncompatibleStateError(
            f"the checkpoint has states {sorted(saved)} but the Checkpointer was given {sorted(objects)}"
            f" (missing from checkpoint: {absent}, not given: {extra}); pass strict=False to restore the common ones"
        )


@pausing
def apply(objects: Mapping[str, Stateful], tree: Mapping[str, Any], *, strict: bool = True,
          assign: bool = False, restore_rng: bool = True, only: Sequence[str] | None = None) -> dict[str, KeyReport]:
    """Load every object's state from ``tree``, then the RNGs (last, so loading cannot disturb them)."""
    saved = tree.get(n.TREE_STATE)
    if not isinstance(saved, Mapping):
        raise IncompatibleStateError("the checkpoint holds no object states")
    saved = _only(saved, only)
    _check_names(objects, saved, strict)
    types = tree.get(n.TREE_TYPES)
    types = types if isinstance(types, Mapping) else {}
    checked = {name: _check_one(name, obj, saved[name], types.get(name), strict=strict)
               for name, obj in objects.items() if name in saved}  # every refusal before anything loads
    reports = {}
    for name, obj in objects.items():
        if name not in saved:
            log.warning("checkpoint has no state for %r; it keeps its current state", name)
            continue
        state, report = checked[name]
        if report:
            log.warning("%s", report.describe(name))
        reports[name] = report if state is optim_check.SKIP else \
            _apply_one(name, obj, state, strict=strict, assign=assign, report=report)
    if restore_rng and n.TREE_RNG in tree:
        rng.restore(tree[n.TREE_RNG])
    return reports


def _check_one(name: str, obj: Stateful, value: Any, saved_type: Any, *, strict: bool) -> tuple[Any, KeyReport]:
    if isinstance(obj, torch.nn.Module):
        problem = module_state_problem(value)
        if problem:
            _refuse_module_state(name, value, strict)
            return optim_check.SKIP, KeyReport(incompatible=[f"the checkpoint's {problem}"])
    return optim_check.check(name, obj, value, saved_type, strict=strict)


def _apply_one(name: str, obj: Stateful, value: Any, *, strict: bool, assign: bool, report: KeyReport) -> KeyReport:
    if isinstance(obj, torch.nn.Module):
        report = load_module(obj, value, name=name, strict=strict, assign=assign)
        if report:
            log.warning("%s", report.describe(name))
        return report
    try:
        obj.load_state_dict(value)
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:
        raise IncompatibleStateError(f"state {name!r} could not be loaded from the checkpoint: {exc}") from exc
    return report
