"""Which checkpoint each alias names: ``latest``, ``best`` and ``best:<metric>``, from the records alone."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from savegame.policies._common import CheckpointRecord
from savegame.policies.retention import latest_saves, rank_best


def alias_targets(records: Iterable[CheckpointRecord], modes: Mapping[str, str]) -> dict[str, CheckpointRecord]:
    """``{alias: record}``: ``latest`` is the newest current save; ``best:<metric>`` the best current save by
    :func:`rank_best` for each metric of ``modes``, and ``best`` that of the first metric.

    An alias whose metric no current save holds (finite) is absent. The same records give the same
    answer, so an alias file that is missing or names a checkpoint that is gone can always be derived
    again; and every target is one :func:`plan_retention` keeps when its policies include
    ``keep_best`` for ``modes`` (or there are none).
    """
    current = latest_saves(records)
    out: dict[str, CheckpointRecord] = {}
    if current:
        out["latest"] = current[-1]
    for i, (metric, mode) in enumerate(modes.items()):
        ranked = rank_best(current, metric, mode)
        if ranked:
            out[f"best:{metric}"] = ranked[0]
            if i == 0:
                out["best"] = ranked[0]
    return out
