"""Canonical model keys and key-mismatch reports.

``torch.compile`` inserts ``_orig_mod.`` and DataParallel/DDP prepend
``module.``. Checkpoints store keys without them, and loading maps the
canonical keys onto whatever the target module calls them, so compiled,
wrapped and plain models load each other's checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from savegame.errors import ConfigurationError, IncompatibleStateError

_COMPILE = "_orig_mod"
_WRAPPER = "module."


def canonical_keys(keys: Iterable[str]) -> dict[str, str]:
    """Map each key to its canonical form: no ``_orig_mod`` segments, no common ``module.`` prefix."""
    keys = list(keys)
    if not any(_COMPILE in k for k in keys) and not (keys and all(k.startswith(_WRAPPER) for k in keys)):
        return {k: k for k in keys}  # the common case, without splitting every key
    stripped = {k: ".".join(p for p in k.split(".") if p != _COMPILE) for k in keys}
    while stripped and all(v.startswith(_WRAPPER) for v in stripped.values()):
        stripped = {k: v[len(_WRAPPER):] for k, v in stripped.items()}
    return stripped


def canonical_state(state: Mapping[str, Any]) -> dict[str, Any]:
    mapping = canonical_keys(state)
    return {mapping[k]: v for k, v in state.items()}


@dataclass
class KeyReport:
    """What did not match when a model state was loaded."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    incompatible: list[str] = field(default_factory=list)  # e.g. another optimizer class: nothing loaded

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched or self.incompatible)

    def bad(self) -> set[str]:
        """The canonical keys whose shapes differ."""
        return {m.split(" ", 1)[0] for m in self.mismatched}

    def describe(self, name: str) -> str:
        parts = []
        for label, items in (("missing", self.missing), ("unexpected", self.unexpected),
                             ("shape mismatch", self.mismatched), ("incompatible", self.incompatible)):
            if items:
                shown = ", ".join(items[:20]) + (f", ... ({len(items) - 20} more)" if len(items) > 20 else "")
                parts.append(f"{label} ({len(items)}): {shown}")
        return f"state {name!r} does not match the checkpoint: " + "; ".join(parts)


def match_module(module: torch.nn.Module, saved_shapes: Mapping[str, Sequence[int] | None], *, name: str,
                 strict: bool, assign: bool) -> dict[str, torch.Tensor]:
    """Check a checkpoint's model keys and shapes against ``module`` before anything is read.

    ``saved_shapes`` maps the checkpoint's (canonical) keys to tensor shapes (None
    for non-tensor values). Raises IncompatibleStateError when ``strict`` and they
    differ; returns the module's own tensors (parameters and buffers themselves)
    by canonical key, for every key whose bytes can go straight into them.
    """
    own = module.state_dict(keep_vars=True)
    _check_assign(own, name, assign)
    report, canon_to_own, _ = _match(own, canonical_state(saved_shapes), lambda v: None if v is None else list(v))
    if strict and report:
        raise IncompatibleStateError(report.describe(name) + "; pass strict=False to load what matches")
    bad = report.bad()
    return {c: own[k] for c, k in canon_to_own.items()
            if c in saved_shapes and c not in bad and isinstance(own[k], torch.Tensor)}


def load_module(module: torch.nn.Module, saved: Mapping[str, Any], *, name: str, strict: bool,
                assign: bool = False) -> KeyReport:
    """Load ``saved`` (any key style) into ``module``; raise or report mismatches."""
    own = module.state_dict(keep_vars=True)
    _check_assign(own, name, assign)
    incoming = canonical_state(saved)
    report, canon_to_own, ties = _match(own, incoming,
                                        lambda v: list(v.shape) if isinstance(v, torch.Tensor) else None)
    if strict and report:
        raise IncompatibleStateError(report.describe(name) + "; pass strict=False to load what matches")
    bad = report.bad()
    matched = {canon_to_own[c]: v for c, v in incoming.items() if c in canon_to_own and c not in bad}
    matched.update((canon_to_own[c], incoming[partner]) for c, partner in ties.items() if partner not in bad)
    module.load_state_dict(matched, strict=not report, assign=assign)
    return report


def _match(own: Mapping[str, Any], incoming: Mapping[str, Any],
           shape_of: Callable[[Any], list[int] | None]) -> tuple[KeyReport, dict[str, str], dict[str, str]]:
    """(mismatches, canonical key -> own key, tied keys absent from ``incoming`` -> a present partner).

    A key the checkpoint lacks is not missing when the model ties it to a key the
    checkpoint has (the same tensor under two names, as Hugging Face's
    ``save_pretrained`` writes tied embeddings only once).
    """
    own_to_canon = canonical_keys(own)
    canon_to_own = {c: k for k, c in own_to_canon.items()}
    ties = _ties(own, own_to_canon, incoming)
    report = KeyReport(
        missing=[c for c in canon_to_own if c not in incoming and c not in ties],
        unexpected=[c for c in incoming if c not in canon_to_own],
    )
    for canon, value in incoming.items():
        target = own.get(canon_to_own.get(canon, ""))
        shape = shape_of(value)
        if not isinstance(target, torch.Tensor):
            continue
        if shape is None:  # the checkpoint has a str, a number ... where the model has a tensor
            report.mismatched.append(f"{canon} (checkpoint holds no tensor, model {tuple(target.shape)})")
        elif shape != list(target.shape):
            report.mismatched.append(f"{canon} (checkpoint {tuple(shape)}, model {tuple(target.shape)})")
    return report, canon_to_own, ties


def _ties(own: Mapping[str, Any], own_to_canon: Mapping[str, str], incoming: Mapping[str, Any]) -> dict[str, str]:
    groups: dict[int, list[str]] = {}
    for key, value in own.items():
        if isinstance(value, torch.Tensor):
            groups.setdefault(id(value), []).append(own_to_canon[key])
    ties: dict[str, str] = {}
    for names in groups.values():
        present = [c for c in names if c in incoming]
        if present and len(present) < len(names):
            ties.update((c, present[0]) for c in names if c not in incoming)
    return ties


def _check_assign(own: Mapping[str, Any], name: str, assign: bool) -> None:
    if not assign and any(isinstance(v, torch.Tensor) and v.is_meta for v in own.values()):
        raise ConfigurationError(
            f"state {name!r} is a model on the meta device: it has no memory to load into. "
            "Pass assign=True to restore() so its tensors are replaced by the checkpoint's"
        )
