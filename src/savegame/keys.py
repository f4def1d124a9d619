"""Canonical model keys and key-mismatch reports.

``torch.compile`` inserts ``_orig_mod.`` and DataParallel/DDP prepend
``module.``. Checkpoints store keys without them, and loading maps the
canonical keys onto whatever the target module calls them, so compiled,
wrapped and plain models load each other's checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from savegame.errors import IncompatibleStateError

_COMPILE = "_orig_mod"
_WRAPPER = "module."


def canonical_keys(keys: Iterable[str]) -> dict[str, str]:
    """Map each key to its canonical form: no ``_orig_mod`` segments, no common ``module.`` prefix."""
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

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched)

    def describe(self, name: str) -> str:
        parts = []
        for label, items in (("missing", self.missing), ("unexpected", self.unexpected),
                             ("shape mismatch", self.mismatched)):
            if items:
                shown = ", ".join(items[:20]) + (f", ... ({len(items) - 20} more)" if len(items) > 20 else "")
                parts.append(f"{label} ({len(items)}): {shown}")
        return f"state {name!r} does not match the checkpoint: " + "; ".join(parts)


def load_module(module: torch.nn.Module, saved: Mapping[str, Any], *, name: str, strict: bool,
                assign: bool = False) -> KeyReport:
    """Load ``saved`` (any key style) into ``module``; raise or report mismatches."""
    own = module.state_dict()
    own_to_canon = canonical_keys(own)
    canon_to_own = {c: k for k, c in own_to_canon.items()}
    incoming = canonical_state(saved)
    report = KeyReport(
        missing=[c for c in canon_to_own if c not in incoming],
        unexpected=[c for c in incoming if c not in canon_to_own],
    )
    for canon, value in incoming.items():
        target = own.get(canon_to_own.get(canon, ""))
        if isinstance(value, torch.Tensor) and isinstance(target, torch.Tensor) and value.shape != target.shape:
            report.mismatched.append(f"{canon} (checkpoint {tuple(value.shape)}, model {tuple(target.shape)})")
    if strict and report:
        raise IncompatibleStateError(report.describe(name) + "; pass strict=False to load what matches")
    bad = {m.split(" ", 1)[0] for m in report.mismatched}
    matched = {canon_to_own[c]: v for c, v in incoming.items() if c in canon_to_own and c not in bad}
    module.load_state_dict(matched, strict=not report, assign=assign)
    return report
