"""Pure decisions over checkpoint records: retention, best-k tracking, early stopping.

Nothing here touches storage, clocks or loggers. Every function takes plain values
and returns new ones without mutating its arguments, so the Checkpointer may call
them from any thread and the tests drive them with hypothesis. All state is
JSON-able: ``json.loads(json.dumps(state))`` is an equivalent state.

Ordering conventions shared by every function:
- "newest" is the highest ``(step, seq, time, name)`` (``seq``: the commit sequence, when
  recorded); "oldest first" sorts by the same key.
- "best" ranks finite values only (NaN, inf, None and missing never rank); among equal
  values the earlier step wins (:func:`rank_best`, the one ranking).
- a step saved more than once counts once: its newest save is current, the older
  ones are superseded (:func:`superseded`).
"""

from savegame.policies._common import MODES, CheckpointRecord, Policy, RetentionPolicy
from savegame.policies.aliases import alias_targets
from savegame.policies.best import best_from_records, is_better, update_best
from savegame.policies.early_stopping import (
                                              EarlyStopping,
                                              EarlyStoppingConfig,
                                              EarlyStoppingState,
                                              early_stopping_step,
                                              initial_early_stopping_state,
)
from savegame.policies.retention import (
                                              RetentionPlan,
                                              ahead_of,
                                              keep_best,
                                              keep_every,
                                              keep_last,
                                              keep_pinned,
                                              latest_saves,
                                              plan_retention,
                                              rank_best,
                                              select_keep,
                                              superseded,
                                              to_delete,
)
from savegame.policies.spec import parse_best_spec
from savegame.policies.window import Window, next_window, scope

__all__ = [
    "MODES", "CheckpointRecord", "EarlyStopping", "EarlyStoppingConfig", "EarlyStoppingState", "Policy",
    "RetentionPlan", "RetentionPolicy", "Window", "ahead_of", "alias_targets", "best_from_records", "early_stopping_step",
    "initial_early_stopping_state", "is_better", "keep_best", "keep_every", "keep_last", "keep_pinned",
    "latest_saves", "next_window", "parse_best_spec", "plan_retention", "rank_best", "scope", "select_keep",
    "superseded", "to_delete", "update_best",
]
