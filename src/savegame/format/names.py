"""Every name and constant that appears on disk, in one place."""

from __future__ import annotations

FORMAT_NAME = "savegame"
FORMAT_VERSION = 1

MANIFEST = "manifest.json"
TENSOR_FILE = "tensors-{index:05d}.safetensors"
CHECKSUM_ALGO = "crc32"

# Inside a run directory.
CHECKPOINT_PREFIX = "step-"
CHECKPOINT_NAME = "step-{step:010d}"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
LOCK_FILE = ".savegame.lock"
ALIAS_SUFFIX = ".alias.json"
HISTORY_FILE = "metrics.jsonl"

# Top-level keys of the state tree.
TREE_STATE = "state"
TREE_RNG = "rng"
TREE_RUN = "run"

# Manifest keys.
M_FORMAT = "format"
M_VERSION = "format_version"
M_SAVEGAME_VERSION = "savegame_version"
M_TORCH_VERSION = "torch_version"
M_STEP = "step"
M_EPOCH = "epoch"
M_METRICS = "metrics"
M_EXTRA = "extra"
M_TIME = "time"
M_PINNED = "pinned"
M_TREE = "tree"
M_TENSORS = "tensors"
M_ENTRIES = "entries"
M_FILES = "files"
M_HEADER_CRCS = "header_crc32"
M_CHECKSUM = "manifest_crc32"
