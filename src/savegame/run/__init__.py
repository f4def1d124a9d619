"""The run directory: listing, lock, bookkeeping (retention, best, early stopping, history, aliases), lineage."""
