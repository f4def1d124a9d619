"""Every name and constant that appears on disk, in one place."""

from __future__ import annotations

FORMAT_NAME = "savegame"
FORMAT_VERSION = 2           # what a single process writes
SHARDED_FORMAT_VERSION = 3   # what a distributed job writes: chunked tensors and per-rank trees
PACKED_FORMAT_VERSION = 4    # what an incremental save writes: entries in the run's content store (packs)
COMPRESSED_FORMAT_VERSION = 5  # a single process's save with compressed entries (compression="zstd")
READABLE_VERSION = COMPRESSED_FORMAT_VERSION  # the newest version this savegame reads

MANIFEST = "manifest.json"
TENSOR_FILE = "tensors-{index:05d}.safetensors"  # index 100000 and up: more digits, never fewer than five

# Inside a run directory.
CHECKPOINT_PREFIX = "step-"
CHECKPOINT_NAME = "step-{step:010d}"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
LOCK_FILE = ".savegame.lock"
LEASE_FILE = ".savegame.lease"       # the writer's lease on object stores (no file lock there)
ALIAS_SUFFIX = ".alias.json"
HISTORY_FILE = "metrics.jsonl"
SETTINGS_FILE = "retention.json"    # the retention settings of the run's last writer (for prune)
ABANDONED_DIR = "abandoned"         # checkpoints of a continuation given up by restoring an older one
DATA_DIR = "data"                   # the content store: pack files shared by incremental checkpoints (v4)
PACK_FILE = DATA_DIR + "/{pack}.safetensors"  # pack: 32 lowercase hex digits, random

# Entry codecs (v5): how an entry's stored bytes become its tensor's bytes.
CODEC_RAW = "raw"                  # stored as is
CODEC_ZSTD = "zstd"                # one zstd frame of the bytes
CODEC_ZSTD_GROUPED = "zstd+bytegroup"  # one zstd frame of the bytes grouped by place: byte 0 of every element, then byte 1...
CODECS = (CODEC_RAW, CODEC_ZSTD, CODEC_ZSTD_GROUPED)

# Top-level keys of the state tree.
TREE_STATE = "state"
TREE_RNG = "rng"
TREE_RUN = "run"
TREE_TYPES = "types"  # {name: "module.Class"} of every object; absent in migrated checkpoints

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
M_SEQ = "seq"                          # optional: the save's commit sequence in its run directory
M_TREE = "tree"
M_TENSORS = "tensors"
M_ENTRIES = "entries"
M_FILES = "files"
M_CHECKSUM_ALGO = "checksum"          # the algorithm of every other checksum (v2: "xxh3_64")
M_FILE_CHECKSUMS = "file_checksums"    # of each tensor file's length prefix and header (v2)
M_HEADER_CRCS = "header_crc32"         # v1 name of file_checksums (CRC-32)
M_CHECKSUM = "manifest_crc32"          # the manifest's own CRC-32, always its last member
M_WORLD = "world_size"                 # v3: the number of ranks that wrote the checkpoint
M_RANKS = "ranks"                      # v3: per rank, {"rng": ..., "state": {per-rank objects}} (refs into tensors)

# Columns of the manifest's entry and tensor tables (v2).
E_FILE, E_DTYPE, E_SHAPE, E_START, E_END, E_SUM = "file", "dtype", "shape", "start", "end", "checksum"
E_CODEC, E_RAW = "codec", "raw"  # v5: each entry's codec, and its size before compression (bytes)
E_CONTENT = "content"  # v5 with packs: each entry's content identity, the xxh3-128 of its bytes before compression
T_ENTRY, T_DEVICE, T_VIEWS = "entry", "device", "views"
T_KEY, T_CHUNKS = "key", "chunks"  # v3: each tensor's key in the job, and the records of tensors stored in chunks


def tensor_file(index: int) -> str:
    """The name of tensor file ``index`` of a checkpoint (``tensors-00000.safetensors``, ...)."""
    return TENSOR_FILE.format(index=index)


def tensor_file_index(name: str) -> int | None:
    """The index of a tensor file name that :func:`tensor_file` writes, else None (no other spelling)."""
    digits = name.removeprefix("tensors-").removesuffix(".safetensors")
    if not (len(name) == len(digits) + 20 and digits.isascii() and digits.isdigit()):
        return None
    index = int(digits)
    return index if tensor_file(index) == name else None


def pack_file(pack: str) -> str:
    """The name a v4 manifest gives pack ``pack`` (32 hex digits): ``data/<pack>.safetensors``."""
    return PACK_FILE.format(pack=pack)


def is_pack_file(name: str) -> bool:
    """Whether ``name`` is exactly a pack name :func:`pack_file` writes (no other spelling, no traversal)."""
    pack = name.removeprefix(DATA_DIR + "/").removesuffix(".safetensors")
    return len(pack) == 32 and all(c in "0123456789abcdef" for c in pack) and pack_file(pack) == name


def run_of(checkpoint: str) -> str:
    """The run directory (relative to the same root) of the checkpoint at ``checkpoint``: its parent, or for
    one moved to ``abandoned/<folder>/``, the folder above ``abandoned``."""
    parts = checkpoint.split("/")[:-1]
    if len(parts) >= 2 and parts[-2] == ABANDONED_DIR:
        parts = parts[:-2]
    return "/".join(parts)


def file_path(checkpoint: str, file: str) -> str:
    """Where data file ``file`` of the checkpoint at ``checkpoint`` lies: in the checkpoint's directory, or a
    pack (v4) in its run directory's content store."""
    if is_pack_file(file):
        run = run_of(checkpoint)
        return f"{run}/{file}" if run else file
    return f"{checkpoint}/{file}"
